//! The HTTP layer: routes, handlers and the serve loop.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sandfleet_proto::{Provider, Task};
use sandfleet_settings::GatewaySettings;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::allowlist::Allowlist;
use crate::dedup::{Claim, DeliveryDedup};
use crate::event::{self, CiFailure, Intake};
use crate::metrics::{Metrics, ProviderLabels, RequestLabels, RouteLabels};
use crate::signature;
use crate::sink::{SinkError, TaskSink};
use crate::template::build_task;

/// How long a delivery id is remembered. GitHub and GitLab retry failed
/// deliveries within minutes; a day also covers manual "redeliver" clicks.
pub const DEDUP_TTL: Duration = Duration::from_secs(24 * 3600);
/// Bound on remembered delivery ids (about 100 bytes each).
pub const DEDUP_MAX_ENTRIES: usize = 200_000;
/// Seconds a 503 asks the caller to wait (`Retry-After`).
const RETRY_AFTER_SECS: &str = "5";

/// Why the gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("gateway server failed: {0}")]
    Serve(#[source] std::io::Error),
}

impl GatewayError {
    /// True when retrying start-up may help (the address may be freed).
    pub fn is_transient(&self) -> bool {
        matches!(self, GatewayError::Bind { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse)
    }
}

/// A configured gateway: settings, the task sink and per-process state.
/// Cheap to clone (shared state behind an `Arc`).
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    settings: GatewaySettings,
    allowlist: Allowlist,
    sink: Arc<dyn TaskSink>,
    dedup: DeliveryDedup,
    metrics: Metrics,
}

impl Gateway {
    /// A gateway that enqueues into `sink`.
    pub fn new(settings: GatewaySettings, sink: Arc<dyn TaskSink>) -> Gateway {
        if settings.github_secret.is_none()
            && settings.gitlab_token.is_none()
            && settings.api_tokens.is_empty()
        {
            tracing::warn!(
                "no github_secret, gitlab_token or api_tokens configured: every intake route answers 404"
            );
        }
        if settings.allowed_repositories.is_empty() {
            tracing::warn!(
                "gateway.allowed_repositories is empty: every webhook event will be ignored"
            );
        }
        Gateway {
            inner: Arc::new(Inner {
                allowlist: Allowlist::new(&settings.allowed_repositories),
                settings,
                sink,
                dedup: DeliveryDedup::new(DEDUP_TTL, DEDUP_MAX_ENTRIES),
                metrics: Metrics::default(),
            }),
        }
    }

    /// The Prometheus exposition of this gateway's metrics.
    pub fn metrics_text(&self) -> String {
        self.inner.metrics.encode()
    }

    /// The axum router (all routes, body limit, request metrics).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/webhooks/github", post(github))
            .route("/webhooks/gitlab", post(gitlab))
            .route("/v1/tasks", post(api_task))
            .route("/v1/tasks/{id}/cancel", post(api_cancel))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .layer(DefaultBodyLimit::max(self.inner.settings.max_body_bytes))
            .layer(middleware::from_fn_with_state(self.clone(), count_requests))
            .with_state(self.clone())
    }

    /// Binds `settings.listen_addr` and serves until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        let addr = self.inner.settings.listen_addr.clone();
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| GatewayError::Bind { addr, source })?;
        self.serve(listener, shutdown).await
    }

    /// Serves on `listener` until `shutdown` fires; requests in progress are
    /// finished (their enqueue confirmed) before it returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), GatewayError> {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "gateway listening");
        }
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(GatewayError::Serve)
    }
}

async fn count_requests(State(gw): State<Gateway>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "other".to_owned());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    gw.inner
        .metrics
        .request_duration
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    gw.inner
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    reply(status, json!({ "error": msg.to_string() }))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn readyz(State(gw): State<Gateway>) -> Response {
    if gw.inner.sink.is_ready().await {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable").into_response()
    }
}

async fn metrics(State(gw): State<Gateway>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        gw.metrics_text(),
    )
        .into_response()
}

async fn github(State(gw): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    // An empty secret would let anyone sign: treated as not configured.
    let Some(secret) = gw
        .inner
        .settings
        .github_secret
        .as_deref()
        .filter(|s| !s.is_empty())
    else {
        return error(
            StatusCode::NOT_FOUND,
            "GitHub intake is disabled (gateway.github_secret is not set)",
        );
    };
    if let Err(e) = signature::verify_github(
        secret.as_bytes(),
        &body,
        header_str(&headers, "x-hub-signature-256"),
    ) {
        return error(StatusCode::UNAUTHORIZED, e);
    }
    let Some(event) = header_str(&headers, "x-github-event") else {
        return error(StatusCode::BAD_REQUEST, "missing X-GitHub-Event header");
    };
    let intake = match event::parse_github(event, &body) {
        Ok(i) => i,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let delivery = header_str(&headers, "x-github-delivery").map(str::to_owned);
    handle_intake(&gw, intake, "github", delivery, &body).await
}

async fn gitlab(State(gw): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(token) = gw
        .inner
        .settings
        .gitlab_token
        .as_deref()
        .filter(|s| !s.is_empty())
    else {
        return error(
            StatusCode::NOT_FOUND,
            "GitLab intake is disabled (gateway.gitlab_token is not set)",
        );
    };
    if let Err(e) = signature::verify_gitlab(token, header_str(&headers, "x-gitlab-token")) {
        return error(StatusCode::UNAUTHORIZED, e);
    }
    let intake = match event::parse_gitlab(header_str(&headers, "x-gitlab-event"), &body) {
        Ok(i) => i,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    // GitLab 17.4+ sends `Idempotency-Key`, the same on every retry of a
    // delivery; older versions only `X-Gitlab-Event-UUID` (per event).
    let delivery = header_str(&headers, "idempotency-key")
        .or_else(|| header_str(&headers, "x-gitlab-event-uuid"))
        .map(str::to_owned);
    handle_intake(&gw, intake, "gitlab", delivery, &body).await
}

async fn handle_intake(
    gw: &Gateway,
    intake: Intake,
    provider: &str,
    delivery: Option<String>,
    body: &[u8],
) -> Response {
    let failure: CiFailure = match intake {
        Intake::Ping => return reply(StatusCode::OK, json!({ "status": "pong" })),
        Intake::Ignored(reason) => {
            return reply(
                StatusCode::OK,
                json!({ "status": "ignored", "reason": reason }),
            );
        }
        Intake::Failure(f) => f,
    };
    if !gw.inner.allowlist.allows(&failure.repository) {
        let reason = format!(
            "repository {:?} is not in gateway.allowed_repositories",
            failure.repository
        );
        return reply(
            StatusCode::OK,
            json!({ "status": "ignored", "reason": reason }),
        );
    }
    // Without a delivery id, the body's digest identifies the delivery: a
    // provider's retry resends the same bytes.
    let delivery = delivery.unwrap_or_else(|| {
        use sha2::Digest;
        format!("sha256-{}", hex::encode(sha2::Sha256::digest(body)))
    });
    let key = format!("{provider}:{delivery}");
    let mut task = build_task(&gw.inner.settings.template, &failure, key.clone());
    // Newer work for the same branch or merge request makes this task's
    // predecessors moot: the sink cancels them once this one is confirmed.
    task.supersede_key = sandfleet_proto::supersede_key_for(&task.source);
    enqueue_once(gw, &key, task, failure.provider).await
}

async fn api_task(State(gw): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    if gw.inner.settings.api_tokens.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "the task API is disabled (gateway.api_tokens is empty)",
        );
    }
    if let Err(e) = signature::verify_bearer(
        &gw.inner.settings.api_tokens,
        header_str(&headers, "authorization"),
    ) {
        let mut resp = error(StatusCode::UNAUTHORIZED, e);
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    let task: Task = match serde_json::from_slice(&body) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("malformed task: {e}")),
    };
    let key = format!("api:{}", task.idempotency_key);
    enqueue_once(&gw, &key, task, Provider::Api).await
}

/// `POST /v1/tasks/{id}/cancel` (bearer token), optional body
/// `{"reason": "...", "by": "..."}`: 202 recorded, 409 already finished,
/// 404 unknown task, 503 broker unavailable.
async fn api_cancel(
    State(gw): State<Gateway>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if gw.inner.settings.api_tokens.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "the task API is disabled (gateway.api_tokens is empty)",
        );
    }
    if let Err(e) = signature::verify_bearer(
        &gw.inner.settings.api_tokens,
        header_str(&headers, "authorization"),
    ) {
        let mut resp = error(StatusCode::UNAUTHORIZED, e);
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    let Ok(task_id) = id.parse::<sandfleet_proto::TaskId>() else {
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown task {id:?}: not a task id"),
        );
    };
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct CancelBody {
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        by: Option<String>,
    }
    let req: CancelBody = if body.is_empty() {
        CancelBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("malformed cancel: {e}")),
        }
    };
    let by = req.by.unwrap_or_else(|| "task-api".to_owned());
    let reason = req
        .reason
        .unwrap_or_else(|| "cancelled through the task API".to_owned());
    match gw.inner.sink.cancel(task_id, &by, &reason).await {
        Ok(crate::sink::CancelAnswer::Recorded(cancel_id)) => {
            tracing::info!(%task_id, %cancel_id, by, "cancel recorded");
            reply(
                StatusCode::ACCEPTED,
                json!({ "status": "recorded", "task_id": task_id, "cancel_id": cancel_id }),
            )
        }
        Ok(crate::sink::CancelAnswer::AlreadyFinished(outcome)) => reply(
            StatusCode::CONFLICT,
            json!({ "status": "already_finished", "task_id": task_id, "outcome": outcome }),
        ),
        Ok(crate::sink::CancelAnswer::Unknown(why)) => error(StatusCode::NOT_FOUND, why),
        Err(e @ SinkError::Invalid(_)) => error(StatusCode::BAD_REQUEST, e),
        Err(e @ SinkError::Unavailable(_)) => {
            let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, e);
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
            resp
        }
    }
}

/// Enqueues `task` unless `key` was already enqueued by this process; answers
/// 202 with the task id only after the broker confirmed.
async fn enqueue_once(gw: &Gateway, key: &str, task: Task, provider: Provider) -> Response {
    match gw.inner.dedup.claim(key) {
        Claim::Done(id) => {
            return reply(
                StatusCode::ACCEPTED,
                json!({ "status": "duplicate", "task_id": id }),
            );
        }
        Claim::InFlight => {
            let mut resp = error(
                StatusCode::CONFLICT,
                "the same delivery is being enqueued right now; retry",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return resp;
        }
        Claim::Claimed => {}
    }
    // Release the claim if this future is dropped mid-enqueue (client hung up),
    // so the provider's retry is not refused forever.
    let guard = ReleaseOnDrop {
        dedup: &gw.inner.dedup,
        key,
        armed: true,
    };
    // The span whose trace context travels with the task (traceparent header
    // → Job annotation → result).
    let span = tracing::info_span!("gateway.enqueue", task_id = %task.id, idempotency_key = key);
    let result = gw.inner.sink.enqueue(&task).instrument(span).await;
    match result {
        Ok(()) => {
            guard.disarm();
            gw.inner.dedup.complete(key, task.id);
            let provider = serde_json::to_value(provider)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            gw.inner
                .metrics
                .enqueued
                .get_or_create(&ProviderLabels { provider })
                .inc();
            tracing::info!(task_id = %task.id, key, repository = %task.source.repository, "task enqueued");
            reply(
                StatusCode::ACCEPTED,
                json!({ "status": "accepted", "task_id": task.id }),
            )
        }
        Err(e @ SinkError::Invalid(_)) => error(StatusCode::BAD_REQUEST, e),
        Err(e @ SinkError::Unavailable(_)) => {
            tracing::warn!(error = %e, key, "enqueue failed; answering 503");
            let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, e);
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
            resp
        }
    }
}

struct ReleaseOnDrop<'a> {
    dedup: &'a DeliveryDedup,
    key: &'a str,
    armed: bool,
}

impl ReleaseOnDrop<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.dedup.release(self.key);
        }
    }
}
