//! `pods/exec`: runs a command in the simulated container's env and working
//! dir, over the remote-command channel protocol ([`crate::remote_command`]:
//! v5/v4.channel.k8s.io, frames, status). The status frame of a command that
//! failed is `NonZeroExitCode` with the exit code in
//! `details.causes[reason=ExitCode]`.
//!
//! Faults: the fault rules refuse an exec (`500`, `403`) or delay its upgrade
//! like any request (they run before routing); [`crate::KubeSim::drop_exec_connections`]
//! cuts every open exec stream mid-command without a close handshake, the
//! way a lost node or proxy does. The command keeps running (its fate is
//! unknown to the client), and dies with its container.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::kubelet::ExecTarget;
use crate::remote_command::{
    CLOSE, Handshake, Params, STATUS, STDERR, STDIN, STDOUT, StreamKind, exit_status, frame,
};
use crate::shared::Shared;
use crate::status::ApiError;

/// `GET|POST /api/v1/namespaces/{ns}/pods/{name}/exec`.
pub(crate) async fn exec(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    mut req: Request,
) -> Response {
    match upgrade(&shared, &ns, &name, query.as_deref(), &headers, &mut req) {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn upgrade(
    shared: &Arc<Shared>,
    ns: &str,
    name: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    req: &mut Request,
) -> Result<Response, ApiError> {
    let p = Params::parse(query);
    if p.command.is_empty() {
        return Err(ApiError::bad_request("you must specify at least 1 command"));
    }
    p.require_a_stream()?;
    let handshake = Handshake::negotiate(headers, "exec")?;
    if !shared.store.contains(crate::store::Kind::Pod, ns, name) {
        return Err(ApiError::not_found(crate::store::Kind::Pod, name));
    }
    let target = shared
        .kubelet
        .exec_target(ns, name)
        .ok_or_else(|| crate::remote_command::not_running(name))?;
    let v5 = handshake.v5();
    let shared_for_stream = shared.clone();
    Ok(
        handshake.accept(shared, StreamKind::Exec, req, move |ws, cut| {
            serve(shared_for_stream, ws, target, p, v5, cut)
        }),
    )
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
