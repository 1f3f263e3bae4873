//! The routes. Reading: `/`, `/events` (server-sent events), `/results`,
//! `/tasks/{id}`, `/dlq`. Acting (operator role, CSRF-checked): `POST
//! /dlq/requeue`, `POST /dlq/purge`, `POST /replay`. Signing in: `/login`,
//! `/logout`. Assets are compiled into the binary.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::Utc;
use futures::Stream;
use sandfleet_amqp::{Amqp, Topology};
use sandfleet_gateway::{BrokerSink, TaskSink};
use sandfleet_ops::batch::ReplayBatch;
use sandfleet_ops::ledger::ReplayLedger;
use sandfleet_ops::replay::{ItemStatus, ReplayFilter};
use sandfleet_proto::{Outcome, TaskResult};
use sandfleet_settings::Settings;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;

use crate::auth::{self, Auth, Principal, Refusal};
use crate::fleet::{Fleet, FleetConfig};
use crate::pages::{self, ResultQuery};

const CSS: &str = include_str!("../assets/console.css");
const JS: &str = include_str!("../assets/console.js");

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The broker could not be reached or set up.
    #[error("{0}")]
    Broker(String),
}

struct App {
    fleet: Arc<Fleet>,
    auth: Auth,
    settings: Settings,
    topology: Topology,
    /// The confirmed task producer, opened on first use.
    sink: tokio::sync::OnceCell<BrokerSink>,
}

/// A running console.
#[derive(Debug)]
pub struct Console {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The server task; ends after `shutdown` fires.
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Console {
    /// Binds `console.listen_addr`, starts gathering, and serves until
    /// `shutdown` fires.
    pub async fn start(
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Result<Console, ConsoleError> {
        let listener = TcpListener::bind(&settings.console.listen_addr)
            .await
            .map_err(|source| ConsoleError::Bind {
                addr: settings.console.listen_addr.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ConsoleError::Bind {
            addr: settings.console.listen_addr.clone(),
            source,
        })?;
        let amqp = Amqp::lazy(&settings.amqp, "console")
            .map_err(|e| ConsoleError::Broker(e.to_string()))?;
        let topology = Topology::new(&settings.topology);
        let c = &settings.console;
        let config = FleetConfig {
            workers: c.workers.clone(),
            sessions: c.sessions_url.clone().zip(c.sessions_token.clone()),
            refresh: Duration::from_secs(c.refresh_secs),
            results_kept: c.results_kept,
        };
        let fleet = Fleet::start(amqp, topology.clone(), config, shutdown.clone());
        let app = Arc::new(App {
            fleet,
            auth: Auth::new(c.tokens.clone(), c.read_requires_token),
            topology,
            settings,
            sink: tokio::sync::OnceCell::new(),
        });
        let router = router(app);
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await
        });
        Ok(Console { addr, task })
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/events", get(events))
        .route("/results", get(results))
        .route("/tasks/{id}", get(task))
        .route("/dlq", get(dlq))
        .route("/dlq/requeue", post(requeue))
        .route("/dlq/purge", post(purge))
        .route("/replay", post(replay))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/console.css", get(|| asset(CSS, "text/css")))
        .route("/assets/console.js", get(|| asset(JS, "text/javascript")))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(app)
}

async fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// Security headers on every page: no framing (clickjacking), scripts
/// only from the console itself.
fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, Html(body)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The origins this request may come from: those of its `Host`.
fn own_origins(headers: &HeaderMap) -> Vec<String> {
    auth::own_origins(headers.get(header::HOST).and_then(|v| v.to_str().ok()))
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

#[allow(clippy::result_large_err)] // the error is the response to send
impl App {
    /// Who is asking: a bearer token, or a signed-in session.
    fn principal(&self, headers: &HeaderMap) -> Option<Principal> {
        if let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            return self.auth.check_token(token.trim());
        }
        cookie(headers, auth::COOKIE).and_then(|id| self.auth.session(&id))
    }

    /// `Ok(who)` when the request may read; otherwise the response to send
    /// (a redirect to the sign-in page).
    fn reader(&self, headers: &HeaderMap, path: &str) -> Result<Option<Principal>, Response> {
        let who = self.principal(headers);
        if self.auth.read_requires_token && who.is_none() {
            let next: String = form_urlencoded_path(path);
            return Err(Redirect::to(&format!("/login?next={next}")).into_response());
        }
        Ok(who)
    }

    /// `Ok(who)` when the request may act; otherwise the refusal page.
    fn actor(&self, headers: &HeaderMap, csrf: Option<&str>) -> Result<Principal, Response> {
        let who = self.principal(headers);
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        match auth::authorize_action(who.as_ref(), csrf, origin, &own_origins(headers)) {
            Ok(()) => Ok(who.unwrap_or_else(unreachable_principal)),
            Err(refusal) => {
                tracing::warn!(%refusal, who = ?who.as_ref().map(|p| &p.name), "console action refused");
                let status = match refusal {
                    Refusal::NotSignedIn => StatusCode::UNAUTHORIZED,
                    _ => StatusCode::FORBIDDEN,
                };
                Err(html(
                    status,
                    pages::message("Not allowed", &refusal.to_string(), who.as_ref()),
                ))
            }
        }
    }

    async fn sink(&self) -> Result<&BrokerSink, String> {
        self.sink
            .get_or_try_init(|| async {
                let amqp = Amqp::connect(&self.settings.amqp, "console")
                    .await
                    .map_err(|e| e.to_string())?;
                BrokerSink::new(&amqp, &self.topology, self.settings.limits.clone())
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
    }
}

/// `authorize_action` returns `Ok` only with a principal; this keeps the
/// types honest without an `expect`.
fn unreachable_principal() -> Principal {
    Principal {
        name: "?".to_owned(),
        role: sandfleet_settings::ConsoleRole::Viewer,
        csrf: None,
    }
}

fn form_urlencoded_path(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

async fn overview(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let who = match app.reader(&headers, "/") {
        Ok(w) => w,
        Err(r) => return r,
    };
    html(
        StatusCode::OK,
        pages::overview(&app.fleet.overview(), who.as_ref()),
    )
}

async fn events(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if app.auth.read_requires_token && app.principal(&headers).is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let stream: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(WatchStream::new(app.fleet.subscribe()).map(|o| {
            // One line: the fragment has no newlines of its own that matter.
            let fragment = pages::overview_live(&o).replace(['\r', '\n'], " ");
            Ok(Event::default().event("overview").data(fragment))
        }));
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The window as a start time.
fn window_start(w: &str) -> Option<chrono::DateTime<Utc>> {
    let secs = match w {
        "15m" => 15 * 60,
        "1h" => 3600,
        "24h" => 24 * 3600,
        "7d" => 7 * 24 * 3600,
        _ => return None,
    };
    Some(Utc::now() - chrono::Duration::seconds(secs))
}

fn filter_of(q: &ResultQuery) -> ReplayFilter {
    ReplayFilter {
        since: window_start(&q.window),
        until: None,
        repos: if q.repo.trim().is_empty() {
            Vec::new()
        } else {
            vec![q.repo.trim().to_owned()]
        },
        outcomes: q.outcome.parse::<Outcome>().into_iter().collect(),
        tasks: Vec::new(),
    }
}

/// Whether a result passes the page's filters (any outcome, final or not).
fn shown(q: &ResultQuery, f: &ReplayFilter, r: &TaskResult) -> bool {
    let repo = r
        .source
        .as_ref()
        .map(|s| s.repository.as_str())
        .or_else(|| r.task.as_ref().map(|t| t.source.repository.as_str()))
        .unwrap_or("");
    (q.repo.trim().is_empty()
        || sandfleet_gateway::allowlist::Allowlist::new(&f.repos).allows(repo))
        && (f.outcomes.is_empty() || f.outcomes.contains(&r.outcome))
        && f.since.is_none_or(|s| r.finished_at >= s)
}

fn results_page(
    app: &App,
    q: &ResultQuery,
    who: Option<&Principal>,
    notice: Option<&str>,
) -> String {
    let f = filter_of(q);
    let log = app.fleet.results.read().unwrap_or_else(|p| p.into_inner());
    let rows: Vec<TaskResult> = log
        .newest_first()
        .filter(|r| shown(q, &f, r))
        .take(500)
        .cloned()
        .collect();
    let failed = log.newest_first().filter(|r| f.matches_result(r)).count();
    pages::results(q, &rows, failed, who, notice)
}

async fn results(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<ResultQuery>,
) -> Response {
    let who = match app.reader(&headers, "/results") {
        Ok(w) => w,
        Err(r) => return r,
    };
    html(StatusCode::OK, results_page(&app, &q, who.as_ref(), None))
}

async fn task(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let who = match app.reader(&headers, &format!("/tasks/{id}")) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let Ok(task_id) = id.parse() else {
        return html(
            StatusCode::NOT_FOUND,
            pages::message("No such task", "not a task id", who.as_ref()),
        );
    };
    let attempts = app
        .fleet
        .results
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .of_task(task_id);
    html(StatusCode::OK, pages::task(&id, &attempts, who.as_ref()))
}

async fn dlq_page(app: &App, who: Option<&Principal>, notice: Option<&str>) -> Response {
    match sandfleet_ops::dlq::list(&app.fleet.amqp, &app.topology.dead_queue, 1000).await {
        Ok(letters) => html(
            StatusCode::OK,
            pages::dlq(&app.topology.dead_queue, &letters, who, notice),
        ),
        Err(e) => html(
            StatusCode::BAD_GATEWAY,
            pages::message(
                "Dead letters unavailable",
                &format!("could not read {}: {e}", app.topology.dead_queue),
                who,
            ),
        ),
    }
}

async fn dlq(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let who = match app.reader(&headers, "/dlq") {
        Ok(w) => w,
        Err(r) => return r,
    };
    dlq_page(&app, who.as_ref(), None).await
}

/// The requeue form: `task` repeated (the selection), `which` the button.
#[derive(Debug, Default, Deserialize)]
struct RequeueForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    which: String,
    #[serde(default)]
    task: Vec<String>,
}

fn parse_requeue(body: &str) -> RequeueForm {
    // A repeated field (`task=a&task=b`) is read by hand: axum's form
    // extractor keeps one value per key.
    let mut f = RequeueForm::default();
    for (k, v) in url_pairs(body) {
        match k.as_str() {
            "csrf" => f.csrf = Some(v),
            "which" => f.which = v,
            "task" => f.task.push(v.trim().to_lowercase()),
            _ => {}
        }
    }
    f
}

fn url_pairs(body: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(body.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

async fn requeue(State(app): State<Arc<App>>, headers: HeaderMap, body: String) -> Response {
    let form = parse_requeue(&body);
    let who = match app.actor(&headers, form.csrf.as_deref()) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let all = form.which == "all";
    if !all && form.task.is_empty() {
        return dlq_page(
            &app,
            Some(&who),
            Some("Select at least one dead letter, or use Requeue all."),
        )
        .await;
    }
    let wanted = form.task.clone();
    let report = sandfleet_ops::dlq::requeue(
        &app.fleet.amqp,
        &app.topology.dead_queue,
        &app.topology.tasks_exchange,
        |dl| all || wanted.contains(&dl.handle.to_lowercase()),
    )
    .await;
    let notice = match report {
        Ok(r) => {
            tracing::info!(who = %who.name, requeued = r.requeued.len(), failed = r.failed.len(), "console requeue");
            let mut n = format!("{} requeued, {} failed.", r.requeued.len(), r.failed.len());
            for (dl, e) in &r.failed {
                n.push_str(&format!(" {}: {e}.", dl.handle));
            }
            let missing: Vec<&String> = wanted.iter().filter(|w| !r.selected.contains(w)).collect();
            if !missing.is_empty() {
                n.push_str(&format!(
                    " Not in the queue any more: {}.",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            n
        }
        Err(e) => format!("Requeue failed: {e}"),
    };
    dlq_page(&app, Some(&who), Some(&notice)).await
}

#[derive(Debug, Deserialize)]
struct PurgeForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    confirm: String,
}

async fn purge(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(form): Form<PurgeForm>,
) -> Response {
    let who = match app.actor(&headers, form.csrf.as_deref()) {
        Ok(w) => w,
        Err(r) => return r,
    };
    if form.confirm.trim() != "purge" {
        return dlq_page(
            &app,
            Some(&who),
            Some("Not purged: type purge in the confirmation field."),
        )
        .await;
    }
    let notice = match sandfleet_ops::dlq::purge(&app.fleet.amqp, &app.topology.dead_queue).await {
        Ok(n) => {
            tracing::info!(who = %who.name, purged = n, "console purge");
            format!("Purged {n} dead letter(s).")
        }
        Err(e) => format!("Purge failed: {e}"),
    };
    dlq_page(&app, Some(&who), Some(&notice)).await
}

#[derive(Debug, Deserialize)]
struct ReplayForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    batch: String,
    #[serde(flatten)]
    query: ResultQuery,
}

async fn replay(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(form): Form<ReplayForm>,
) -> Response {
    let who = match app.actor(&headers, form.csrf.as_deref()) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let q = form.query;
    let batch = form.batch.trim();
    if batch.is_empty() || batch.contains(char::is_whitespace) {
        return html(
            StatusCode::BAD_REQUEST,
            results_page(
                &app,
                &q,
                Some(&who),
                Some("The batch must be a non-empty key without spaces."),
            ),
        );
    }
    let notice = match replay_matching(&app, &q, batch).await {
        Ok(n) => {
            tracing::info!(who = %who.name, batch, ?n, "console replay");
            n
        }
        Err(e) => format!("Replay failed: {e}"),
    };
    html(
        StatusCode::OK,
        results_page(&app, &q, Some(&who), Some(&notice)),
    )
}

async fn replay_matching(app: &App, q: &ResultQuery, batch: &str) -> Result<String, String> {
    let filter = filter_of(q);
    // Oldest first, as the CLI reads the stream.
    let selected: Vec<TaskResult> = {
        let log = app.fleet.results.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<TaskResult> = log
            .newest_first()
            .filter(|r| filter.matches_result(r))
            .cloned()
            .collect();
        v.reverse();
        v
    };
    let sink = app.sink().await?;
    let ledger = ReplayLedger::open(
        &app.fleet.amqp,
        &app.topology.prefix,
        &app.settings.topology.results_max_age,
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut run = ReplayBatch::start(&ledger, batch, false)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sent, mut skipped, mut failed) = (0usize, 0usize, 0usize);
    for r in &selected {
        let Some(task) = r.task.as_deref() else {
            continue;
        };
        if !run.first_of_build(task) {
            continue;
        }
        let done = run.one(task, sink as &dyn TaskSink, None).await;
        match done.status {
            ItemStatus::Sent => sent += 1,
            ItemStatus::AlreadyReplayed => skipped += 1,
            _ => failed += 1,
        }
    }
    Ok(format!(
        "Batch {batch}: {sent} sent, {skipped} already replayed in this batch, {failed} failed."
    ))
}

#[derive(Debug, Deserialize)]
struct LoginQuery {
    #[serde(default)]
    next: Option<String>,
}

async fn login_page(Query(q): Query<LoginQuery>) -> Response {
    html(
        StatusCode::OK,
        pages::login(None, q.next.as_deref().unwrap_or("/")),
    )
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    next: Option<String>,
}

async fn login(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if let Some(o) = origin
        && !auth::origin_ok(Some(o), &own_origins(&headers))
    {
        // Login CSRF: another site must not sign a browser in.
        return html(
            StatusCode::FORBIDDEN,
            pages::message(
                "Not allowed",
                &Refusal::Origin(o.to_owned()).to_string(),
                None,
            ),
        );
    }
    let Some((id, who)) = app.auth.sign_in(form.token.trim()) else {
        tracing::warn!("console sign-in with an unknown token");
        return html(
            StatusCode::UNAUTHORIZED,
            pages::login(
                Some("That token is not valid."),
                form.next.as_deref().unwrap_or("/"),
            ),
        );
    };
    tracing::info!(who = %who.name, "console sign-in");
    // Only local paths: `next` must not send the browser elsewhere.
    let next = form
        .next
        .filter(|n| is_local_path(n))
        .unwrap_or_else(|| "/".to_owned());
    let mut r = Redirect::to(&next).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        auth::COOKIE,
        auth::SESSION_TTL.as_secs()
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// A path on this console: not `//host` nor `/\host` (browsers read both
/// as another site), nothing a header could be split with.
fn is_local_path(p: &str) -> bool {
    p.starts_with('/')
        && !p.starts_with("//")
        && !p.contains('\\')
        && !p.chars().any(|c| c.is_control())
}

async fn logout(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, auth::COOKIE) {
        app.auth.sign_out(&id);
    }
    let mut r = Redirect::to("/").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "sandfleet_console=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_only_returns_to_pages_of_this_console() {
        assert!(is_local_path("/dlq"));
        assert!(is_local_path("/results?repo=acme%2F*"));
        for bad in [
            "https://evil.example",
            "//evil.example",
            "/\\evil.example",
            "/\r\nSet-Cookie:x",
            "dlq",
        ] {
            assert!(!is_local_path(bad), "{bad}");
        }
    }

    #[test]
    fn the_requeue_form_keeps_every_selected_letter() {
        let f = parse_requeue("csrf=abc&task=ID-1&task=raw-0a1b%2Bc&which=selected");
        assert_eq!(f.csrf.as_deref(), Some("abc"));
        assert_eq!(f.task, vec!["id-1", "raw-0a1b+c"]);
        assert_eq!(f.which, "selected");
    }
}
