//! The HTTP/1.1 server: an accept loop we own (so the listener can be closed and
//! reopened on the same port, and single connections reset), request logging, and
//! fault injection in front of the axum router.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response};
use axum::response::IntoResponse as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::faults::FaultAction;
use crate::request_log::RequestRecord;
use crate::shared::Shared;
use crate::status::ApiError;
use crate::watch::WatchFault;

struct Listening {
    /// Cancelled to close the listener and every open connection.
    generation: CancellationToken,
    accept_task: Option<JoinHandle<()>>,
}

/// The server of one [`crate::KubeSim`].
pub(crate) struct Server {
    shared: Arc<Shared>,
    router: Router,
    addr: SocketAddr,
    listening: Mutex<Option<Listening>>,
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Reopening on the same port must work while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl Server {
    /// Binds `addr` and starts accepting.
    pub(crate) fn start(shared: Arc<Shared>, addr: SocketAddr) -> io::Result<Arc<Self>> {
        let listener = bind(addr)?;
        let addr = listener.local_addr()?;
        let server = Arc::new(Self {
            router: crate::api::router(shared.clone()),
            shared,
            addr,
            listening: Mutex::new(None),
        });
        server.listen_on(listener);
        Ok(server)
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Listening>> {
        self.listening.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn listen_on(self: &Arc<Self>, listener: TcpListener) {
        let generation = self.shared.shutdown.child_token();
        let server = self.clone();
        let gen_for_task = generation.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = gen_for_task.cancelled() => return,
                    a = listener.accept() => a,
                };
                match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(
                            server
                                .clone()
                                .serve_connection(stream, gen_for_task.child_token()),
                        );
                    }
                    Err(e) => tracing::debug!("kube-sim accept failed: {e}"),
                }
            }
        });
        *self.lock() = Some(Listening {
            generation,
            accept_task: Some(accept_task),
        });
    }

    /// Closes the listener and all connections (`true`), or reopens the listener on the
    /// same port (`false`).
    pub(crate) async fn refuse_connections(self: &Arc<Self>, refuse: bool) -> io::Result<()> {
        if refuse {
            let task = self.lock().as_mut().and_then(|l| {
                l.generation.cancel();
                l.accept_task.take()
            });
            if let Some(t) = task {
                // The listener is dropped when the task ends: only then is the port closed.
                let _ = t.await;
            }
            *self.lock() = None;
            Ok(())
        } else {
            if self.lock().is_some() {
                return Ok(());
            }
            let listener = bind(self.addr)?;
            self.listen_on(listener);
            Ok(())
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        closed: CancellationToken,
    ) {
        let reset = CancellationToken::new();
        let server = self.clone();
        let reset_for_svc = reset.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let server = server.clone();
            let reset = reset_for_svc.clone();
            async move { Ok::<_, Infallible>(server.handle(req, reset).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service)
            // `pods/exec` upgrades to a WebSocket.
            .with_upgrades();
        // Dropping the connection future closes the socket mid-request (a reset as the
        // client sees it) or with watches still streaming (listener closed).
        tokio::select! {
            _ = conn => {}
            () = reset.cancelled() => {}
            () = closed.cancelled() => {}
        }
    }

    async fn handle(&self, req: Request<Incoming>, reset: CancellationToken) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => bytes::Bytes::new(),
        };
        let method = parts.method.as_str().to_owned();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or("").to_owned();
        let record = RequestRecord::new(&method, &path, &query, &bytes);
        let is_watch = record.verb() == "watch";
        let index = self.shared.requests.push(record);

        let mut watch_fault = WatchFault::None;
        match self.shared.faults.take(&method, &path, &query, is_watch) {
            Some(FaultAction::Status {
                code,
                retry_after_secs,
            }) => {
                let response = ApiError::injected(code, retry_after_secs).into_response();
                self.shared
                    .requests
                    .set_status(index, response.status().as_u16());
                return response;
            }
            Some(FaultAction::Delay(d)) => tokio::time::sleep(d).await,
            Some(FaultAction::ResetConnection) => {
                reset.cancel();
                // The connection task drops this future along with the socket.
                return std::future::pending().await;
            }
            Some(FaultAction::WatchGone) => watch_fault = WatchFault::Gone,
            Some(FaultAction::WatchEndEarly) => watch_fault = WatchFault::EndEarly,
            Some(FaultAction::WatchGoneAfter(d)) => watch_fault = WatchFault::GoneAfter(d),
            None => {}
        }

        let mut req = Request::from_parts(parts, Body::from(bytes));
        req.extensions_mut().insert(watch_fault);
        let response = match self.router.clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        self.shared
            .requests
            .set_status(index, response.status().as_u16());
        response
    }
}
