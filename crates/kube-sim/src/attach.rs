//! `pods/attach`: connects a client to the running container's own stdin and
//! output, over the remote-command channel protocol
//! ([`crate::remote_command`]: v5/v4.channel.k8s.io, frames, status).
//!
//! What is modelled, as a kubelet does it:
//! - A container whose spec says `stdin: true` gets a pipe as its stdin, whose
//!   write end the kubelet keeps for the container's whole life. Each stdin
//!   frame (channel 0) of an attach is written whole, one frame after another
//!   across concurrent attaches. A v5 close of the stdin channel, or the
//!   client going away, ends only this attach's stdin: the container's stdin
//!   stays open for the next attach. With `stdinOnce: true` the first attach
//!   whose stdin ends closes the container's stdin (EOF) for good.
//! - Output: from the moment of the attach on, what the container writes goes
//!   to the client as well as to the pod log; nothing written before is
//!   replayed (that is what `pods/log` is for). The runtime here keeps stdout
//!   and stderr as one stream, so an attach with `stdout=true` gets both on
//!   channel 1 (also with `stderr=true`); one with only `stderr=true` gets
//!   them on channel 2. An attach that falls far behind the container loses
//!   the output it missed: a slow client never holds up the container or the
//!   log.
//! - When the container ends, each attach gets the rest of the output, then
//!   a `Success` status and a close, whatever the exit code: a real kubelet
//!   reports the end of the attach, not the container's exit (that is in the
//!   pod's `containerStatuses`).
//! - Errors: 404 for a missing pod; 400 for a container that is not running
//!   or not in the pod, for no stream requested, for `stdin=true` on a
//!   container without `stdin: true`, and for a request that is not a
//!   WebSocket upgrade with a known subprotocol.
//! - Faults: fault rules apply as to any request (they run before routing);
//!   [`crate::KubeSim::drop_exec_connections`] cuts attach streams too, with
//!   no close frame or status; the container runs on.
//!
//! Not modelled: TTYs (`tty=true` is ignored, resize frames are dropped);
//! separate stdout and stderr streams; attaching to any container but the
//! pod's first (the only one kube-sim runs). A real runtime may silently
//! ignore `stdin=true` on a container without `stdin: true`; kube-sim
//! refuses it so that the mistake shows in tests.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream::SplitSink;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::kubelet::{ContainerStdin, ExecTarget};
use crate::remote_command::{
    CLOSE, Handshake, Params, STATUS, STDERR, STDIN, STDOUT, Socket, StreamKind, exit_status,
    frame, not_running,
};
use crate::shared::Shared;
use crate::status::ApiError;
use crate::store::Kind;

/// How long an attach waits, once the container has ended, for the rest of
/// its output (the pump drains the pipe; a process the container left
/// behind may hold it open).
const DRAIN: Duration = Duration::from_secs(2);

/// `GET|POST /api/v1/namespaces/{ns}/pods/{name}/attach`.
pub(crate) async fn attach(
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
    p.require_a_stream()?;
    let handshake = Handshake::negotiate(headers, "attach")?;
    let pod = shared
        .store
        .get(Kind::Pod, ns, name)
        .ok_or_else(|| ApiError::not_found(Kind::Pod, name))?;
    if let Some(c) = &p.container {
        let in_spec = pod
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(|x| x.get("name") == Some(&json!(c))));
        if !in_spec {
            return Err(ApiError::bad_request(format!(
                "container {c} is not valid for pod {name}"
            )));
        }
    }
    let target = shared
        .kubelet
        .exec_target(ns, name)
        .filter(|t| p.container.as_ref().is_none_or(|c| *c == t.container))
        .ok_or_else(|| not_running(name))?;
    if p.stdin && target.io.stdin.is_none() {
        return Err(ApiError::bad_request(format!(
            "stdin is not enabled for container {}: its spec does not set stdin: true",
            target.container
        )));
    }
    // Subscribed before the upgrade is answered: whatever the container
    // writes once the client holds its attach reaches the client.
    let output = (p.stdout || p.stderr)
        .then(|| target.io.subscribe())
        .flatten();
    let v5 = handshake.v5();
    Ok(
        handshake.accept(shared, StreamKind::Attach, req, move |ws, cut| {
            serve(ws, target, p, output, v5, cut)
        }),
    )
}

async fn serve(
    ws: Socket,
    target: ExecTarget,
    p: Params,
    mut output: Option<broadcast::Receiver<Bytes>>,
    v5: bool,
    cut: CancellationToken,
) {
    let (mut tx, mut rx) = ws.split();
    let out_channel = if p.stdout { STDOUT } else { STDERR };
    let mut stdin = match (&target.io.stdin, p.stdin) {
        (Some(pipe), true) => Some(stdin_writer(
            pipe.clone(),
            target.io.stdin_once,
            target.ended.clone(),
        )),
        _ => None,
    };
    let ended = target.ended.clone();
    drop(target);
    loop {
        tokio::select! {
            () = cut.cancelled() => {
                tracing::debug!("kube-sim cut an attach stream");
                return;
            }
            () = ended.cancelled() => break,
            chunk = next_output(&mut output) => match chunk {
                Ok(data) => {
                    if !send(&mut tx, frame(out_channel, &data), &cut).await {
                        return;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::debug!("kube-sim attach fell behind and lost {n} output chunks");
                }
                // The container closed its output and runs on.
                Err(RecvError::Closed) => output = None,
            },
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => match b.first() {
                    Some(&STDIN) => {
                        if let Some(w) = &stdin {
                            // A full queue waits for the container to read;
                            // the cut and the container's end still count.
                            tokio::select! {
                                r = w.send(b.slice(1..)) => if r.is_err() { stdin = None },
                                () = cut.cancelled() => return,
                                () = ended.cancelled() => break,
                            }
                        }
                    }
                    Some(&CLOSE) if v5 && b.get(1) == Some(&STDIN) => stdin = None,
                    _ => {}
                },
                Some(Ok(Message::Close(_))) => {
                    // Detached (a v4 client also ends its stdin this way).
                    tokio::select! {
                        _ = tx.close() => {}
                        () = cut.cancelled() => {}
                    }
                    return;
                }
                // The client is gone: this attach ends, the container runs on.
                None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
    // The container ended: the rest of its output, then the status.
    drop(stdin);
    let drained = tokio::time::sleep(DRAIN);
    tokio::pin!(drained);
    while output.is_some() {
        tokio::select! {
            () = cut.cancelled() => return,
            () = &mut drained => break,
            chunk = next_output(&mut output) => match chunk {
                Ok(data) => {
                    if !send(&mut tx, frame(out_channel, &data), &cut).await {
                        return;
                    }
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => output = None,
            },
        }
    }
    // Success whatever the container's exit code: the attach ended as it should.
    let status = exit_status(0);
    if send(&mut tx, frame(STATUS, status.to_string().as_bytes()), &cut).await {
        tokio::select! {
            _ = tx.close() => {}
            () = cut.cancelled() => {}
        }
    }
}

/// The next output chunk; never ready without a subscription.
async fn next_output(output: &mut Option<broadcast::Receiver<Bytes>>) -> Result<Bytes, RecvError> {
    match output {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends one frame; false when the client is gone or the stream was cut.
async fn send(tx: &mut SplitSink<Socket, Message>, msg: Message, cut: &CancellationToken) -> bool {
    tokio::select! {
        r = tx.send(msg) => r.is_ok(),
        () = cut.cancelled() => false,
    }
}

/// Spawns the writer of one attach's stdin: each frame sent to the returned
/// queue is written whole to the container's stdin, under the lock. The
/// writer ends when the queue's sender drops (this attach's stdin ended;
/// frames already queued are still written) or the container ends. With
/// `once` (`stdinOnce`), its end closes the container's stdin.
fn stdin_writer(pipe: ContainerStdin, once: bool, ended: CancellationToken) -> mpsc::Sender<Bytes> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let write_all = async {
            while let Some(data) = rx.recv().await {
                let mut w = pipe.lock().await;
                // Closed (stdinOnce) or broken (the container closed its
                // stdin): the frame goes nowhere, as on a real node.
                if let Some(pipe) = w.as_mut()
                    && pipe.write_all(&data).await.is_err()
                {
                    tracing::debug!("kube-sim: the container no longer reads its stdin");
                }
            }
            if once {
                // Dropping the kubelet's write end is the container's EOF.
                pipe.lock().await.take();
            }
        };
        // The container's end may cut a frame short: nobody reads it any more.
        tokio::select! {
            () = write_all => {}
            () = ended.cancelled() => {}
        }
    });
    tx
}
