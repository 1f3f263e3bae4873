//! `pods/exec`: the WebSocket upgrade and the Kubernetes channel protocol,
//! running the command in the simulated container's env and working dir.
//!
//! Subprotocol: `v5.channel.k8s.io` when the client offers it (it adds the
//! close channel, 255, so a client can end stdin and still read the exit
//! status), `v4.channel.k8s.io` otherwise; older ones are refused. Every
//! binary frame starts with its channel: 0 stdin, 1 stdout, 2 stderr,
//! 3 status (a `Status` object; `NonZeroExitCode` carries the exit code in
//! `details.causes[reason=ExitCode]`), 4 resize (ignored: no TTY here).
//!
//! Faults: the fault rules refuse an exec (`500`, `403`) or delay its upgrade
//! like any request (they run before routing); [`crate::KubeSim::drop_exec_connections`]
//! cuts every open exec stream mid-command without a close handshake, the
//! way a lost node or proxy does. The command keeps running (its fate is
//! unknown to the client), and dies with its container.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt as _, StreamExt as _};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;

use crate::kubelet::ExecTarget;
use crate::shared::Shared;
use crate::status::ApiError;

/// The exec stream's WebSocket settings: a 16 KiB read buffer instead of
/// tungstenite's 128 KiB. tungstenite zero-fills the whole read buffer's
/// spare room before every read, so with 128 KiB each read of a few-byte
/// frame (stdin, a resize, a close) wrote 128 KiB of zeros: a burst of
/// execs spent a few percent of kube-sim's CPU in memset and fresh pages.
/// Larger frames (a file written through stdin) are read in 16 KiB steps.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(16 * 1024)
}

const V5: &str = "v5.channel.k8s.io";
const V4: &str = "v4.channel.k8s.io";
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const CLOSE: u8 = 255;

/// Open exec streams, and the switch that cuts them.
#[derive(Default)]
pub(crate) struct ExecStreams {
    open: AtomicUsize,
    cut: std::sync::Mutex<CancellationToken>,
}

impl ExecStreams {
    /// How many exec streams are open now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Drops every open exec stream (no close frame, no status).
    pub(crate) fn cut_all(&self) {
        let mut cut = self.cut.lock().unwrap_or_else(|p| p.into_inner());
        cut.cancel();
        *cut = CancellationToken::new();
    }

    fn token(&self) -> CancellationToken {
        self.cut.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct OpenGuard(Arc<Shared>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.execs.open.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Params {
    command: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
}

fn params(raw: Option<&str>) -> Params {
    let mut p = Params {
        command: Vec::new(),
        stdin: false,
        stdout: false,
        stderr: false,
    };
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let on = v == "true" || v == "1";
        match &*k {
            "command" => p.command.push(v.into_owned()),
            "stdin" => p.stdin = on,
            "stdout" => p.stdout = on,
            "stderr" => p.stderr = on,
            _ => {}
        }
    }
    p
}

/// `GET|POST /api/v1/namespaces/{ns}/pods/{name}/exec`.
pub(crate) async fn exec(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    mut req: Request,
) -> Response {
    match upgrade(shared, &ns, &name, query.as_deref(), &headers, &mut req) {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn upgrade(
    shared: Arc<Shared>,
    ns: &str,
    name: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    req: &mut Request,
) -> Result<Response, ApiError> {
    let p = params(query);
    if p.command.is_empty() {
        return Err(ApiError::bad_request("you must specify at least 1 command"));
    }
    if !(p.stdin || p.stdout || p.stderr) {
        return Err(ApiError::bad_request(
            "you must specify at least one of stdin, stdout, stderr",
        ));
    }
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_owned())
        .collect();
    let protocol = if offered.iter().any(|p| p == V5) {
        V5
    } else if offered.iter().any(|p| p == V4) {
        V4
    } else {
        return Err(ApiError::bad_request(
            "kube-sim serves exec over WebSocket with v5.channel.k8s.io or v4.channel.k8s.io only",
        ));
    };
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| ApiError::bad_request("exec needs a WebSocket upgrade"))?
        .as_bytes()
        .to_owned();
    if !shared.store.contains(crate::store::Kind::Pod, ns, name) {
        return Err(ApiError::not_found(crate::store::Kind::Pod, name));
    }
    let target = shared.kubelet.exec_target(ns, name).ok_or_else(|| {
        ApiError::bad_request(format!(
            "container sandbox is not valid for pod {name}: the container is not running"
        ))
    })?;
    let on_upgrade = hyper::upgrade::on(&mut *req);
    let cut = shared.execs.token();
    shared.execs.open.fetch_add(1, Ordering::SeqCst);
    let guard = OpenGuard(shared.clone());
    let v5 = protocol == V5;
    tokio::spawn(async move {
        let _guard = guard;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("kube-sim exec upgrade failed: {e}");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(ws_config()),
        )
        .await;
        serve(shared, ws, target, p, v5, cut).await;
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(&key))
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
    );
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(protocol),
    );
    Ok(response)
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::binary(v)
}

fn exit_status(code: i32) -> Value {
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!("command terminated with non-zero exit code: exit status {code}"),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
}

async fn serve<S>(
    shared: Arc<Shared>,
    ws: WebSocketStream<S>,
    target: ExecTarget,
    p: Params,
    v5: bool,
    cut: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, mut rx) = ws.split();
    let argv: Vec<String> = p.command.iter().map(|a| target.paths.remap(a)).collect();
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(target.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&target.cwd)
        .stdin(if p.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(if p.stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(if p.stderr {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let status = json!({
                "metadata": {}, "status": "Failure", "reason": "InternalError",
                "message": format!("exec: {:?}: {e}", argv[0]),
            });
            let _ = tx.send(frame(STATUS, status.to_string().as_bytes())).await;
            let _ = tx.close().await;
            return;
        }
    };
    let pgid = child.id().unwrap_or(0);
    shared.kubelet.track_group(pgid, true);
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(32);
    let mut pumps = Vec::new();
    for (channel, reader) in [
        (
            STDOUT,
            child
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ),
        (
            STDERR,
            child
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ),
    ] {
        let Some(mut reader) = reader else { continue };
        let out_tx = out_tx.clone();
        pumps.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if out_tx.send((channel, buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }));
    }
    drop(out_tx);
    let mut stdin = child.stdin.take();
    let mut client_open = true;
    let mut outputs_open = true;
    // Relay until the outputs end; then the exit status goes out last.
    while outputs_open {
        tokio::select! {
            () = cut.cancelled() => {
                // Gone without a close frame; the command runs on, unobserved.
                tracing::debug!("kube-sim cut an exec stream mid-command");
                let wait = async move {
                    let _ = child.wait().await;
                    shared.kubelet.track_group(pgid, false);
                };
                let ended = target.ended.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = wait => {}
                        () = ended.cancelled() => kill_group(pgid),
                    }
                });
                return;
            }
            () = target.ended.cancelled() => {
                kill_group(pgid);
                let _ = child.wait().await;
                shared.kubelet.track_group(pgid, false);
                let _ = tx.send(frame(STATUS, exit_status(137).to_string().as_bytes())).await;
                let _ = tx.close().await;
                return;
            }
            chunk = out_rx.recv() => match chunk {
                Some((channel, data)) => {
                    if client_open && tx.send(frame(channel, &data)).await.is_err() {
                        client_open = false;
                    }
                }
                None => outputs_open = false,
            },
            msg = rx.next(), if client_open => match msg {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => match b[0] {
                    STDIN => {
                        if let Some(w) = stdin.as_mut()
                            && w.write_all(&b[1..]).await.is_err()
                        {
                            stdin = None;
                        }
                    }
                    CLOSE if v5 && b.get(1) == Some(&STDIN) => {
                        if let Some(mut w) = stdin.take() {
                            let _ = w.shutdown().await;
                        }
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    // The client went away (v4 closes the socket to end stdin).
                    client_open = false;
                    stdin = None;
                }
                Some(Ok(_)) => {}
            },
        }
    }
    drop(stdin);
    let code = tokio::select! {
        s = child.wait() => s.ok().map(|s| {
            use std::os::unix::process::ExitStatusExt as _;
            s.code().or_else(|| s.signal().map(|sig| 128 + sig)).unwrap_or(1)
        }).unwrap_or(1),
        () = target.ended.cancelled() => { kill_group(pgid); 137 }
    };
    shared.kubelet.track_group(pgid, false);
    for p in pumps {
        let _ = tokio::time::timeout(Duration::from_secs(1), p).await;
    }
    if client_open {
        let _ = tx
            .send(frame(STATUS, exit_status(code).to_string().as_bytes()))
            .await;
        let _ = tx.close().await;
    }
}

fn kill_group(pgid: u32) {
    crate::kubelet::signal_group(pgid, rustix::process::Signal::KILL);
}
