//! What `pods/exec` and `pods/attach` share: the Kubernetes remote-command
//! channel protocol over a WebSocket (subprotocol negotiation, the upgrade,
//! frames, the status object), their query parameters, and the count of open
//! streams with the switch that cuts them.
//!
//! Subprotocol: `v5.channel.k8s.io` when the client offers it (it adds the
//! close channel, 255, so a client can end stdin and still read the status),
//! `v4.channel.k8s.io` otherwise; older ones are refused. Every binary frame
//! starts with its channel: 0 stdin, 1 stdout, 2 stderr, 3 status (a `Status`
//! object), 4 resize (ignored: no TTY here).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;

use crate::shared::Shared;
use crate::status::ApiError;

const V5: &str = "v5.channel.k8s.io";
const V4: &str = "v4.channel.k8s.io";
pub(crate) const STDIN: u8 = 0;
pub(crate) const STDOUT: u8 = 1;
pub(crate) const STDERR: u8 = 2;
pub(crate) const STATUS: u8 = 3;
pub(crate) const CLOSE: u8 = 255;

/// The server side of an upgraded remote-command connection.
pub(crate) type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// The stream's WebSocket settings: a 16 KiB read buffer instead of
/// tungstenite's 128 KiB. tungstenite zero-fills the whole read buffer's
/// spare room before every read, so with 128 KiB each read of a few-byte
/// frame (stdin, a resize, a close) wrote 128 KiB of zeros: a burst of
/// execs spent a few percent of kube-sim's CPU in memset and fresh pages.
/// Larger frames (a file written through stdin) are read in 16 KiB steps.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(16 * 1024)
}

/// One frame on `channel`.
pub(crate) fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::binary(v)
}

/// The status frame's object for a command that exited with `code`:
/// `NonZeroExitCode` carries the code in `details.causes[reason=ExitCode]`.
pub(crate) fn exit_status(code: i32) -> Value {
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

/// The query of an exec or attach request (`tty` is ignored: no TTY here).
pub(crate) struct Params {
    /// `command`, repeated (exec only).
    pub(crate) command: Vec<String>,
    /// `container`; `None` means the pod's only container.
    pub(crate) container: Option<String>,
    pub(crate) stdin: bool,
    pub(crate) stdout: bool,
    pub(crate) stderr: bool,
}

impl Params {
    pub(crate) fn parse(raw: Option<&str>) -> Self {
        let mut p = Self {
            command: Vec::new(),
            container: None,
            stdin: false,
            stdout: false,
            stderr: false,
        };
        for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            let on = v == "true" || v == "1";
            match &*k {
                "command" => p.command.push(v.into_owned()),
                "container" if !v.is_empty() => p.container = Some(v.into_owned()),
                "stdin" => p.stdin = on,
                "stdout" => p.stdout = on,
                "stderr" => p.stderr = on,
                _ => {}
            }
        }
        p
    }

    /// Real API servers refuse a stream with no channel at all.
    pub(crate) fn require_a_stream(&self) -> Result<(), ApiError> {
        if self.stdin || self.stdout || self.stderr {
            Ok(())
        } else {
            Err(ApiError::bad_request(
                "you must specify at least one of stdin, stdout, stderr",
            ))
        }
    }
}

/// Which subresource a stream serves; each kind has its own open count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamKind {
    Exec,
    Attach,
}

/// Open exec and attach streams, and the switch that cuts them all.
#[derive(Default)]
pub(crate) struct Streams {
    exec: AtomicUsize,
    attach: AtomicUsize,
    cut: std::sync::Mutex<CancellationToken>,
}

impl Streams {
    /// How many streams of `kind` are open now.
    pub(crate) fn open(&self, kind: StreamKind) -> usize {
        self.count(kind).load(Ordering::SeqCst)
    }

    /// Drops every open exec and attach stream (no close frame, no status).
    pub(crate) fn cut_all(&self) {
        let mut cut = self.cut.lock().unwrap_or_else(|p| p.into_inner());
        cut.cancel();
        *cut = CancellationToken::new();
    }

    fn token(&self) -> CancellationToken {
        self.cut.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn count(&self, kind: StreamKind) -> &AtomicUsize {
        match kind {
            StreamKind::Exec => &self.exec,
            StreamKind::Attach => &self.attach,
        }
    }
}

/// Counts one stream as open until dropped.
struct OpenGuard(Arc<Shared>, StreamKind);

impl OpenGuard {
    fn new(shared: Arc<Shared>, kind: StreamKind) -> Self {
        shared.streams.count(kind).fetch_add(1, Ordering::SeqCst);
        Self(shared, kind)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.streams.count(self.1).fetch_sub(1, Ordering::SeqCst);
    }
}

/// A negotiated WebSocket upgrade, not yet answered.
pub(crate) struct Handshake {
    protocol: &'static str,
    accept: HeaderValue,
}

impl Handshake {
    /// Picks the subprotocol and checks the WebSocket key; `what` names the
    /// subresource in the refusal (`exec`, `attach`).
    pub(crate) fn negotiate(headers: &HeaderMap, what: &str) -> Result<Self, ApiError> {
        let offered: Vec<&str> = headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let protocol = if offered.contains(&V5) {
            V5
        } else if offered.contains(&V4) {
            V4
        } else {
            return Err(ApiError::bad_request(format!(
                "kube-sim serves {what} over WebSocket with {V5} or {V4} only"
            )));
        };
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or_else(|| ApiError::bad_request(format!("{what} needs a WebSocket upgrade")))?;
        let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(Self { protocol, accept })
    }

    /// Whether the client speaks v5 (the close channel).
    pub(crate) fn v5(&self) -> bool {
        self.protocol == V5
    }

    /// Answers `101 Switching Protocols` and spawns `serve` on the upgraded
    /// connection, counted as an open stream of `kind` until it returns.
    /// `serve` gets the cut token of [`Streams::cut_all`]: when it fires, it
    /// must drop the socket without a close frame.
    pub(crate) fn accept<F, Fut>(
        self,
        shared: &Arc<Shared>,
        kind: StreamKind,
        req: &mut Request,
        serve: F,
    ) -> Response
    where
        F: FnOnce(Socket, CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = hyper::upgrade::on(&mut *req);
        let cut = shared.streams.token();
        let guard = OpenGuard::new(shared.clone(), kind);
        tokio::spawn(async move {
            let _guard = guard;
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!("kube-sim {kind:?} upgrade failed: {e}");
                    return;
                }
            };
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(ws_config()),
            )
            .await;
            serve(ws, cut).await;
        });
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept);
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(self.protocol),
        );
        response
    }
}

/// The 400 a real API server gives when the pod's container is not running.
pub(crate) fn not_running(pod: &str) -> ApiError {
    ApiError::bad_request(format!(
        "container sandbox is not valid for pod {pod}: the container is not running"
    ))
}
