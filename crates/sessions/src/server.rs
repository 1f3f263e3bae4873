//! The HTTP server: routes, authentication, limits, and the reaper.
//!
//! Every handler authenticates the bearer token, checks that the session
//! belongs to it (another token's session is a 404, so ids reveal nothing),
//! applies the [`Limits`], and calls the [`Backend`] (Kubernetes or local).
//! Ownership is read from the session's record (on Kubernetes, the Job's
//! labels) once per replica and cached: it never changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use futures::StreamExt as _;
use sandfleet_sandbox::session::kubernetes::{SessionMeta, SessionRecord};
use sandfleet_sandbox::session::{
    KubeSessions, LocalSessions, OutputChunk, RunOptions, SessionBackend, SessionId, SessionSpec,
};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::{ANNOTATION_OWNER, LABEL_OWNER, Owner, Tokens};
use crate::backend::{Backend, LocalBackend};
use crate::error::ApiError;
use crate::limits::{Limits, Starts};
use crate::metrics::Metrics;
use crate::pool::{PoolInfo, Pools};
use crate::wire::{RunRequest, SessionInfo, StreamLine, TRUNCATED_HEADER};
use sandfleet_sandbox::session::pool::{LABEL_POOL_STATE, MemberState, PoolTemplate};

/// The sessions service. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    tokens: Tokens,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// The warm pools (Kubernetes only; none configured: an empty set).
    pools: Option<Arc<Pools>>,
    /// Session → owner hash, for sessions this replica has checked.
    owners: Mutex<HashMap<SessionId, String>>,
    /// The per-token count's starts under way on this replica.
    starts: Starts,
    ready: AtomicBool,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("tokens", &self.inner.tokens.len())
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

type Result<T, E = ApiError> = std::result::Result<T, E>;

fn info(r: &SessionRecord) -> SessionInfo {
    use sandfleet_sandbox::session::kubernetes::ANNOTATION_WORKING_DIR;
    use sandfleet_sandbox::session::kubernetes::pod::{ANNOTATION_IDLE_SECS, ANNOTATION_IMAGE};
    let a = |k: &str| r.annotations.get(k).cloned().unwrap_or_default();
    SessionInfo {
        id: r.id.0.clone(),
        image: a(ANNOTATION_IMAGE),
        working_dir: a(ANNOTATION_WORKING_DIR),
        idle_timeout_secs: a(ANNOTATION_IDLE_SECS).parse().unwrap_or(0),
        created: r.created.clone(),
        ended: r.ended,
    }
}

impl Service {
    /// A service over `backend`, accepting `tokens`, within `limits`.
    pub fn new(backend: KubeSessions, tokens: Tokens, limits: Limits) -> Service {
        Service::with_pools(backend, tokens, limits, Vec::new())
    }

    /// A service whose sessions run on this host (see [`crate::backend`]):
    /// the same routes, tokens, limits, reaper and metrics, no warm pools.
    pub fn local(sessions: LocalSessions, tokens: Tokens, limits: Limits) -> Service {
        Service::build(
            Backend::Local(LocalBackend::new(sessions)),
            tokens,
            limits,
            None,
        )
    }

    /// A service that also keeps the warm pools `pools` full and serves
    /// `pool: NAME` creates from them.
    pub fn with_pools(
        backend: KubeSessions,
        tokens: Tokens,
        limits: Limits,
        pools: Vec<PoolTemplate>,
    ) -> Service {
        let pools = Arc::new(Pools::new(
            backend.clone(),
            pools,
            limits.max_lifetime,
            limits.claims_in_flight,
        ));
        Service::build(Backend::Kubernetes(backend), tokens, limits, Some(pools))
    }

    fn build(
        backend: Backend,
        tokens: Tokens,
        limits: Limits,
        pools: Option<Arc<Pools>>,
    ) -> Service {
        Service {
            inner: Arc::new(Inner {
                pools,
                backend,
                tokens,
                limits,
                metrics: Arc::new(Metrics::default()),
                owners: Mutex::default(),
                starts: Starts::default(),
                ready: AtomicBool::new(true),
            }),
        }
    }

    /// The metrics (also served at `/metrics`).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The warm pools (`None` on the local backend).
    pub fn pools(&self) -> Option<&Arc<Pools>> {
        self.inner.pools.as_ref()
    }

    /// Where the sessions run.
    pub fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// Keeps the warm pools full until `shutdown` (part of [`Service::run`];
    /// call it yourself when serving the router some other way). Returns at
    /// once on the local backend.
    pub async fn pool_loop(self, shutdown: CancellationToken) {
        if let Some(pools) = self.inner.pools.clone() {
            pools.run(self.inner.metrics.clone(), shutdown).await;
        }
    }

    /// All routes.
    pub fn router(&self) -> Router {
        // Bodies are files: the file limit plus slack for JSON requests.
        let body_limit = self.inner.limits.max_file_bytes + 64 * 1024;
        Router::new()
            .route("/v1/sessions", post(create).get(list))
            .route("/v1/sessions/{id}", get(show).delete(remove))
            .route("/v1/sessions/{id}/run", post(run))
            .route("/v1/sessions/{id}/files", get(get_file).put(put_file))
            .route("/v1/pools", get(list_pools))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .layer(DefaultBodyLimit::max(body_limit))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown`, then drains for up to `grace`.
    /// Runs the reaper every `reap_every` meanwhile.
    pub async fn run(
        self,
        listener: TcpListener,
        reap_every: Duration,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let reaper = tokio::spawn(self.clone().reap_loop(reap_every, shutdown.clone()));
        let pools = tokio::spawn(self.clone().pool_loop(shutdown.clone()));
        let stop = shutdown.clone();
        let result = axum::serve(listener, self.router())
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        shutdown.cancel();
        let _ = reaper.await;
        let _ = pools.await;
        self.inner.backend.shutdown().await;
        result
    }

    /// Deletes ended sessions and refreshes the active gauge, every `every`.
    pub async fn reap_loop(self, every: Duration, shutdown: CancellationToken) {
        loop {
            match self.reap_once().await {
                Ok(_) => self.inner.ready.store(true, Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!("session reaper: {e}");
                    self.inner.ready.store(false, Ordering::Relaxed);
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One reaper pass: returns the deleted sessions.
    pub async fn reap_once(&self) -> Result<Vec<SessionId>> {
        let reaped = self.inner.backend.reap().await?;
        self.inner.metrics.reaped.inc_by(reaped.len() as u64);
        if !reaped.is_empty() {
            tracing::info!(count = reaped.len(), "reaped ended sessions");
            if let Ok(mut owners) = self.inner.owners.lock() {
                for id in &reaped {
                    owners.remove(id);
                }
            }
        }
        let alive = self.inner.backend.list("").await?;
        self.inner.metrics.active.set(
            alive
                .iter()
                .filter(|r| !r.ended && !unclaimed_member(r))
                .count() as i64,
        );
        Ok(reaped)
    }

    fn owner(&self, headers: &HeaderMap) -> Result<Owner> {
        let value = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        self.inner
            .tokens
            .authenticate(value)
            .ok_or_else(ApiError::unauthorized)
    }

    /// The session, if it exists and belongs to `owner`; else 404.
    async fn owned(&self, owner: &Owner, id: &str) -> Result<SessionId> {
        let id = SessionId(id.to_owned());
        let not_found = || {
            ApiError::from(sandfleet_sandbox::session::SessionError::NotFound(
                id.clone(),
            ))
        };
        let cached = self
            .inner
            .owners
            .lock()
            .ok()
            .and_then(|o| o.get(&id).cloned());
        let hash = match cached {
            Some(h) => h,
            None => {
                let record = self.inner.backend.get(&id).await?.ok_or_else(not_found)?;
                let hash = record
                    .annotations
                    .get(ANNOTATION_OWNER)
                    .cloned()
                    .ok_or_else(not_found)?;
                if let Ok(mut o) = self.inner.owners.lock() {
                    o.insert(id.clone(), hash.clone());
                }
                hash
            }
        };
        if hash != owner.hash {
            return Err(not_found());
        }
        Ok(id)
    }

    fn count_error(&self, e: &ApiError) {
        self.inner.metrics.error(e.code);
    }
}

/// An idle or warming pool member: a sandbox, not (yet) a session.
fn unclaimed_member(r: &SessionRecord) -> bool {
    r.labels
        .get(LABEL_POOL_STATE)
        .is_some_and(|s| s != MemberState::Claimed.as_str())
}

async fn list_pools(State(s): State<Service>, headers: HeaderMap) -> Result<Json<Vec<PoolInfo>>> {
    s.owner(&headers)?;
    Ok(Json(
        s.inner.pools.as_ref().map(|p| p.list()).unwrap_or_default(),
    ))
}

async fn readyz(State(s): State<Service>) -> Response {
    if s.inner.ready.load(Ordering::Relaxed) {
        "ready".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the Kubernetes API is failing",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<Service>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.inner.metrics.encode(),
    )
        .into_response()
}

async fn create(
    State(s): State<Service>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<SessionInfo>)> {
    let owner = s.owner(&headers)?;
    let mut doc: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("session spec: {e}")))?;
    // `pool` is optional: without it the body is a plain SessionSpec.
    let pool = match doc.as_object_mut().and_then(|o| o.remove("pool")) {
        None | Some(serde_json::Value::Null) => None,
        // The local backend has no pools: every name is unknown there.
        Some(serde_json::Value::String(name)) => Some(
            s.inner
                .pools
                .as_ref()
                .and_then(|p| Some((p.clone(), p.template(&name)?.clone())))
                .ok_or_else(|| ApiError::bad_request(format!("no pool named {name:?}")))?,
        ),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "pool must be a pool's name, not {other}"
            )));
        }
    };
    if let (Some((_, t)), Some(o)) = (&pool, doc.as_object_mut()) {
        // The pool decides the image and resources; asking for others is a mistake.
        match o.get("image").and_then(serde_json::Value::as_str) {
            None => {
                o.insert("image".into(), serde_json::Value::String(t.image.clone()));
            }
            Some(i) if i == t.image => {}
            Some(i) => {
                return Err(ApiError::bad_request(format!(
                    "pool {} runs image {}, not {i}",
                    t.name, t.image
                )));
            }
        }
    }
    let mut spec: SessionSpec = serde_json::from_value(doc)
        .map_err(|e| ApiError::bad_request(format!("session spec: {e}")))?;
    if let Some((_, t)) = &pool {
        spec.resources = t.resources.clone();
    }
    spec.validate()?;
    let limits = &s.inner.limits;
    limits.check_spec(spec.idle_timeout, spec.max_lifetime)?;
    // The pool manager's watch counts sessions; a LIST per create returned
    // every session of the token and was the largest cost of a burst of creates.
    let start = s
        .inner
        .starts
        .reserve(limits, owner.label(), || async {
            let counted = s
                .inner
                .pools
                .as_ref()
                .and_then(|p| p.sessions_of(owner.label()));
            Ok(match counted {
                Some(n) => n,
                None => s
                    .inner
                    .backend
                    .list(&owner.selector())
                    .await?
                    .iter()
                    .filter(|r| !r.ended)
                    .count(),
            })
        })
        .await?;
    let meta = SessionMeta {
        labels: [(LABEL_OWNER.to_owned(), owner.label().to_owned())].into(),
        annotations: [(ANNOTATION_OWNER.to_owned(), owner.hash.clone())].into(),
    };
    let started = Instant::now();
    let warm = match &pool {
        Some((pools, t)) => {
            let got = pools.claim(t, &spec, &meta).await;
            let labels = Metrics::pool(&t.name);
            match &got {
                Some(_) => {
                    s.inner.metrics.pool_claims.get_or_create(&labels).inc();
                    s.inner
                        .metrics
                        .pool_claim_duration
                        .observe(started.elapsed().as_secs_f64());
                }
                None => {
                    s.inner.metrics.pool_misses.get_or_create(&labels).inc();
                }
            }
            got
        }
        None => None,
    };
    let id = match warm {
        Some(id) => id,
        None => {
            let id = s
                .inner
                .backend
                .start_with(&spec, &meta)
                .await
                .map_err(ApiError::from)
                .inspect_err(|e| s.count_error(e))?;
            s.inner
                .metrics
                .start_duration
                .observe(started.elapsed().as_secs_f64());
            id
        }
    };
    s.inner.metrics.started.inc();
    // The backend lists the session already; the pool manager's count has
    // it once noted.
    s.inner
        .starts
        .started(start, || {
            if let Some(p) = &s.inner.pools {
                p.note_session(&id, owner.label());
            }
        })
        .await;
    if let Ok(mut o) = s.inner.owners.lock() {
        o.insert(id.clone(), owner.hash.clone());
    }
    tracing::info!(session = %id, "session started");
    Ok((
        StatusCode::CREATED,
        Json(SessionInfo {
            id: id.0,
            image: spec.image,
            working_dir: spec.working_dir,
            idle_timeout_secs: spec.idle_timeout.as_secs(),
            created: None,
            ended: false,
        }),
    ))
}

async fn list(State(s): State<Service>, headers: HeaderMap) -> Result<Json<Vec<SessionInfo>>> {
    let owner = s.owner(&headers)?;
    let records = s.inner.backend.list(&owner.selector()).await?;
    Ok(Json(
        records
            .iter()
            // The label is a prefix; the annotation holds the whole hash.
            .filter(|r| r.annotations.get(ANNOTATION_OWNER) == Some(&owner.hash))
            .map(info)
            .collect(),
    ))
}

async fn show(
    State(s): State<Service>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>> {
    let owner = s.owner(&headers)?;
    let id = s.owned(&owner, &id).await?;
    let record = s.inner.backend.get(&id).await?.ok_or_else(|| {
        ApiError::from(sandfleet_sandbox::session::SessionError::NotFound(
            id.clone(),
        ))
    })?;
    Ok(Json(info(&record)))
}

async fn remove(
    State(s): State<Service>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let owner = s.owner(&headers)?;
    let id = s.owned(&owner, &id).await?;
    s.inner.backend.teardown(&id).await?;
    if let Some(p) = &s.inner.pools {
        p.forget_session(&id);
    }
    if let Ok(mut o) = s.inner.owners.lock() {
        o.remove(&id);
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct RunQuery {
    #[serde(default)]
    stream: bool,
}

async fn run(
    State(s): State<Service>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<RunQuery>,
    body: Bytes,
) -> Result<Response> {
    let owner = s.owner(&headers)?;
    let req: RunRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("run request: {e}")))?;
    let timeout = Duration::from_secs(req.timeout_secs);
    s.inner.limits.check_timeout(timeout)?;
    let id = s.owned(&owner, &id).await?;
    let opts = RunOptions {
        timeout,
        max_output_bytes: req
            .max_output_bytes
            .unwrap_or(s.inner.limits.max_output_bytes)
            .min(s.inner.limits.max_output_bytes),
    };
    if !q.stream {
        let started = Instant::now();
        let out = s
            .inner
            .backend
            .run(&id, &req.command, opts, None)
            .await
            .map_err(ApiError::from)
            .inspect_err(|e| s.count_error(e))?;
        s.inner
            .metrics
            .command_duration
            .observe(started.elapsed().as_secs_f64());
        return Ok(Json(out).into_response());
    }
    // Streamed: output lines as they come, then the result. The command runs
    // to its end even if the client goes away (its fate is then the client's
    // unknown, as with a dropped exec).
    let (chunk_tx, mut chunk_rx) = mpsc::channel::<OutputChunk>(64);
    let (line_tx, line_rx) = mpsc::channel::<StreamLine>(64);
    let service = s.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let forward = {
            let line_tx = line_tx.clone();
            async move {
                while let Some(c) = chunk_rx.recv().await {
                    let line = match c {
                        OutputChunk::Stdout(b) => StreamLine::Stdout(STANDARD.encode(&b)),
                        OutputChunk::Stderr(b) => StreamLine::Stderr(STANDARD.encode(&b)),
                    };
                    let _ = line_tx.send(line).await;
                }
            }
        };
        let run = service
            .inner
            .backend
            .run(&id, &req.command, opts, Some(chunk_tx));
        let (result, ()) = tokio::join!(run, forward);
        let last = match result {
            Ok(out) => {
                service
                    .inner
                    .metrics
                    .command_duration
                    .observe(started.elapsed().as_secs_f64());
                StreamLine::Result(out)
            }
            Err(e) => {
                let e = ApiError::from(e);
                service.count_error(&e);
                StreamLine::Error {
                    code: e.code.into(),
                    message: e.message,
                }
            }
        };
        let _ = line_tx.send(last).await;
    });
    let body = tokio_stream::wrappers::ReceiverStream::new(line_rx).map(|line| {
        let mut text = serde_json::to_vec(&line).unwrap_or_default();
        text.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(text))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct FileQuery {
    path: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    max_bytes: Option<usize>,
}

async fn put_file(
    State(s): State<Service>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    body: Bytes,
) -> Result<StatusCode> {
    let owner = s.owner(&headers)?;
    s.inner.limits.check_file(body.len())?;
    let mode = match q.mode.as_deref() {
        None => 0o644,
        Some(m) => u32::from_str_radix(m, 8)
            .map_err(|_| ApiError::bad_request(format!("mode {m:?} is not octal")))?,
    };
    let id = s.owned(&owner, &id).await?;
    s.inner
        .backend
        .write_file(&id, &q.path, &body, mode)
        .await
        .map_err(ApiError::from)
        .inspect_err(|e| s.count_error(e))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_file(
    State(s): State<Service>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response> {
    let owner = s.owner(&headers)?;
    let max = q.max_bytes.unwrap_or(s.inner.limits.max_file_bytes);
    s.inner.limits.check_file(max)?;
    let id = s.owned(&owner, &id).await?;
    let file = s
        .inner
        .backend
        .read_file(&id, &q.path, max)
        .await
        .map_err(ApiError::from)
        .inspect_err(|e| s.count_error(e))?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (
                header::HeaderName::from_static(TRUNCATED_HEADER),
                if file.truncated { "true" } else { "false" },
            ),
        ],
        file.bytes,
    )
        .into_response())
}
