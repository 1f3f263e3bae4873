//! `/healthz`, `/readyz`, `/metrics` and `/tasks` on one HTTP port
//! (`worker.http_addr`).
//!
//! `/healthz` answers 200 while the process serves HTTP at all. `/readyz`
//! answers 200 only while the broker is connected, the circuit breaker is not
//! open, the Kubernetes API grants every permission the worker needs, the
//! cancellations stream has been read up to its tail and the worker is not
//! draining; otherwise 503 with the reasons, one per line. Kubernetes takes
//! a not-ready worker out of nothing (it has no Service traffic), but the signal shows up in dashboards and rollouts.
//!
//! `/tasks` lists the attempts running now (task, attempt, sandbox,
//! repository, start time) as JSON: what the operator console shows as
//! in flight. The gauge in `/metrics` counts them; this says which they are.

use std::collections::BTreeMap;
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
    cancels_syncing: AtomicBool,
    /// One line per permission the API refused.
    denied: Mutex<Vec<String>>,
    /// The attempts running now, by `(task, attempt)`.
    running: Mutex<BTreeMap<(sandfleet_proto::TaskId, u32), RunningTask>>,
}

/// One attempt running on this worker, as `/tasks` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunningTask {
    /// The task.
    pub task_id: sandfleet_proto::TaskId,
    /// The attempt number.
    pub attempt: u32,
    /// The sandbox's name: the attempt's Job name (deterministic from task
    /// and attempt, the name `kubectl get jobs` shows on Kubernetes).
    pub sandbox: String,
    /// The repository the task builds.
    pub repository: String,
    /// When this worker started (or adopted) the attempt.
    pub started_at: chrono::DateTime<chrono::Utc>,
}

/// Removes its attempt from `/tasks` when dropped, so every way out of a
/// run (finished, lost, abandoned, panicked) forgets it.
#[derive(Debug)]
pub struct RunningGuard {
    health: Arc<Health>,
    key: (sandfleet_proto::TaskId, u32),
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.health
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
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

    /// Records whether the cancellations stream is still being read up to
    /// its tail (no task is taken until it has been).
    pub fn set_cancels_syncing(&self, syncing: bool) {
        self.cancels_syncing.store(syncing, Ordering::Relaxed);
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

    /// Records that `task`'s attempt `attempt` runs here until the guard drops.
    pub fn track_running(
        self: &Arc<Self>,
        task: &sandfleet_proto::Task,
        attempt: u32,
    ) -> RunningGuard {
        let key = (task.id, attempt);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                key,
                RunningTask {
                    task_id: task.id,
                    attempt,
                    sandbox: sandfleet_sandbox::job::job_name(task.id, attempt),
                    repository: task.source.repository.clone(),
                    started_at: chrono::Utc::now(),
                },
            );
        RunningGuard {
            health: self.clone(),
            key,
        }
    }

    /// The attempts running now, oldest task id first.
    pub fn running(&self) -> Vec<RunningTask> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
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
        if self.cancels_syncing.load(Ordering::Relaxed) {
            why.push("cancellations stream not read up to its tail yet".to_owned());
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
        .route("/tasks", get(tasks_handler))
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

async fn tasks_handler(State(s): State<AppState>) -> impl IntoResponse {
    axum::Json(s.health.running())
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
    async fn tasks_lists_the_attempts_running_until_their_guard_drops() {
        let health = Arc::new(Health::new());
        let stop = CancellationToken::new();
        let (addr, task) = bind(
            "127.0.0.1:0",
            health.clone(),
            Arc::new(Metrics::new()),
            stop.clone(),
        )
        .await
        .unwrap();
        let t = sandfleet_proto::Task::fix_attempt(
            sandfleet_proto::Source {
                provider: sandfleet_proto::Provider::Api,
                repository: "octo-org/octo-repo".to_owned(),
                commit: "3484a3fb816e0859fd6e1cea078d76385ff50625".to_owned(),
                git_ref: None,
                ci_run_id: None,
                pull_request: None,
                url: None,
            },
            sandfleet_proto::SandboxSpec {
                image: "alpine:3.20".to_owned(),
                resources: Default::default(),
                env: Default::default(),
                deadline_secs: 60,
                pending_timeout_secs: 60,
            },
        );
        let guard = health.track_running(&t, 2);
        let (status, body) = get(addr, "/tasks").await;
        assert_eq!(status, 200);
        let json = &body[body.find("\r\n\r\n").unwrap() + 4..];
        let listed: Vec<RunningTask> = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].task_id, listed[0].attempt), (t.id, 2));
        assert_eq!(listed[0].sandbox, sandfleet_sandbox::job::job_name(t.id, 2));
        assert_eq!(listed[0].repository, "octo-org/octo-repo");
        drop(guard);
        assert!(
            health.running().is_empty(),
            "a finished attempt is forgotten"
        );
        stop.cancel();
        task.await.unwrap().unwrap();
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
