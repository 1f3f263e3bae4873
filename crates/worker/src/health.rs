//! `/healthz`, `/readyz` and `/metrics` on one HTTP port (`worker.http_addr`).
//!
//! `/healthz` answers 200 while the process serves HTTP at all. `/readyz`
//! answers 200 only while the broker is connected, the circuit breaker is not
//! open, the Kubernetes API grants every permission the worker needs and the
//! worker is not draining; otherwise 503 with the reasons, one per line. Kubernetes takes a not-ready worker out of nothing (it has no Service
//! traffic), but the signal shows up in dashboards and rollouts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The readiness inputs, set by the parts that know them.
#[derive(Debug, Default)]
pub struct Health {
    broker_connected: AtomicBool,
    breaker_open: AtomicBool,
    draining: AtomicBool,
    executor_syncing: AtomicBool,
    /// One line per permission the API refused.
    denied: Mutex<Vec<String>>,
}

impl Health {
    /// Not ready until the broker connects.
    pub fn new() -> Self {
        Health::default()
    }

    /// Records whether the broker connection is up.
    pub fn set_broker_connected(&self, up: bool) {
        self.broker_connected.store(up, Ordering::Relaxed);
    }

    /// Records whether the Kubernetes API breaker is open.
    pub fn set_breaker_open(&self, open: bool) {
        self.breaker_open.store(open, Ordering::Relaxed);
    }

    /// Records whether the executor is still starting (the Kubernetes
    /// executor's watchers have not listed Jobs and Pods yet).
    pub fn set_executor_syncing(&self, syncing: bool) {
        self.executor_syncing.store(syncing, Ordering::Relaxed);
    }

    /// Records the permissions the Kubernetes API refuses (empty: none), as
    /// lines for `/readyz`.
    pub fn set_denied(&self, lines: Vec<String>) {
        *self.denied.lock().unwrap_or_else(|p| p.into_inner()) = lines;
    }

    /// Records that shutdown has begun.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// `Ok` when ready, or the reasons it is not.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut why = Vec::new();
        if !self.broker_connected.load(Ordering::Relaxed) {
            why.push("broker not connected".to_owned());
        }
        if self.breaker_open.load(Ordering::Relaxed) {
            why.push("kubernetes API circuit breaker open".to_owned());
        }
        why.extend(
            self.denied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        if self.executor_syncing.load(Ordering::Relaxed) {
            why.push("executor watchers not synced yet".to_owned());
        }
        if self.draining.load(Ordering::Relaxed) {
            why.push("draining for shutdown".to_owned());
        }
        if why.is_empty() { Ok(()) } else { Err(why) }
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// The router with the three endpoints.
pub fn router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(AppState { health, metrics })
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    match s.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", why.join("\n")),
        ),
    }
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// Binds `addr` and serves until `shutdown` fires; returns the bound address
/// (useful with port 0) and the server task.
pub async fn bind(
    addr: &str,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(health, metrics);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    Ok((local, task))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        let status = buf[9..12].parse().unwrap();
        (status, buf)
    }

    #[tokio::test]
    async fn readiness_follows_broker_and_breaker() {
        let health = Arc::new(Health::new());
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let (addr, task) = bind("127.0.0.1:0", health.clone(), metrics, stop.clone())
            .await
            .unwrap();
        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("broker not connected"));
        health.set_broker_connected(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        health.set_breaker_open(true);
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("circuit breaker open"));
        health.set_breaker_open(false);
        health.set_denied(vec![
            "forbidden: create jobs.batch in namespace \"x\"".into(),
        ]);
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(
            body.contains("forbidden: create jobs.batch in namespace \"x\""),
            "{body}"
        );
        health.set_denied(Vec::new());
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("sandfleet_breaker_state"));
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}
