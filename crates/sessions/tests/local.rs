//! The sessions service on the local backend: the shared scenario through
//! the HTTP client, tokens, limits, no warm pools, and sessions that end by
//! themselves reaped and counted — what the Kubernetes backend promises,
//! with child processes on this host.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sandfleet_sandbox::session::{
    LocalSessions, RunOptions, Session, SessionBackend, SessionError, SessionSpec, conformance,
};
use sandfleet_sessions::auth::Tokens;
use sandfleet_sessions::{Limits, Service, SessionsClient};
use tokio_util::sync::CancellationToken;

struct Server {
    url: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }

    fn client(&self, token: &str) -> SessionsClient {
        SessionsClient::new(&self.url, token)
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A local-backend service whose sessions live under `dir`.
async fn server(dir: &Path, limits: Limits) -> Server {
    let service = Service::local(
        LocalSessions::in_dir(dir),
        Tokens::from_tokens(["tok-a", "tok-b"]),
        limits,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(service.run(listener, Duration::from_millis(100), stop.clone()));
    Server { url, stop, task }
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, Iterator::count)
}

use common::eventually;

#[tokio::test]
async fn the_local_service_passes_the_shared_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), Limits::default()).await;
    let client = Arc::new(s.client("tok-a"));
    let mut session = Session::start(client.clone(), &conformance::spec("any"))
        .await
        .unwrap();
    assert!(session.id().0.starts_with("local-"), "{}", session.id());
    let transcript = conformance::scenario(&session).await.unwrap();
    assert_eq!(transcript, conformance::expected());

    common::streams_stdout_and_stderr_apart(&session).await;

    let listed = client.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].image.as_str(), listed[0].working_dir.as_str()),
        ("any", conformance::spec("any").working_dir.as_str())
    );
    assert!(listed[0].created.is_some() && !listed[0].ended);

    session.teardown().await.unwrap();
    session.teardown().await.unwrap();
    assert!(client.list().await.unwrap().is_empty());
    assert_eq!(entries(dir.path()), 0, "the session's dir is removed");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("sandfleet_sessions_started_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sandfleet_sessions_start_duration_seconds_count 1"),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test]
async fn tokens_limits_and_pools_hold_on_the_local_backend() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        sessions_per_token: 1,
        max_file_bytes: 1024,
        ..Limits::default()
    };
    let s = server(dir.path(), limits).await;
    let (a, b) = (s.client("tok-a"), s.client("tok-b"));
    let id = a.start(&SessionSpec::new("img")).await.unwrap();

    // Another token sees nothing and can touch nothing.
    assert!(b.list().await.unwrap().is_empty());
    let opts = RunOptions::new(Duration::from_secs(5));
    assert!(matches!(
        b.run(&id, "true", opts, None).await,
        Err(SessionError::NotFound(_))
    ));
    b.teardown(&id).await.unwrap();
    assert_eq!(
        a.run(&id, "echo mine", opts, None).await.unwrap().stdout,
        b"mine\n"
    );

    let http = reqwest::Client::new();
    let resp = http
        .get(format!("{}/v1/sessions", s.url))
        .bearer_auth("tok-c")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let post = |path: String, body: serde_json::Value| {
        http.post(format!("{}{path}", s.url))
            .bearer_auth("tok-a")
            .json(&body)
            .send()
    };
    let code = |v: serde_json::Value| v["error"]["code"].as_str().unwrap().to_owned();
    let resp = post("/v1/sessions".into(), serde_json::json!({"image": "img"}))
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(code(resp.json().await.unwrap()), "session_limit");
    let resp = post(
        "/v1/sessions".into(),
        serde_json::json!({"image": "img", "max_lifetime": 10_000_000}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 422);
    assert_eq!(code(resp.json().await.unwrap()), "lifetime_limit");
    let resp = post(
        format!("/v1/sessions/{id}/run"),
        serde_json::json!({"command": "true", "timeout_secs": 1_000_000}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 422);
    assert_eq!(code(resp.json().await.unwrap()), "timeout_limit");
    let err = a
        .write_file(&id, "big", &[0u8; 2048], 0o644)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("413"), "{err}");

    // No warm pools here: none listed, and asking for one is a clear 4xx.
    assert!(a.pools().await.unwrap().is_empty());
    a.teardown(&id).await.unwrap();
    let err = a
        .create_in_pool(&SessionSpec::new("img"), "python")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no pool named"), "{err}");
    assert_eq!(entries(dir.path()), 0, "nothing was started");
    s.stop().await;
}

/// POSTs `n` session creates for `token` at once; the statuses, sorted.
async fn concurrent_creates(url: &str, token: &str, n: usize) -> Vec<u16> {
    let http = reqwest::Client::new();
    let creates = (0..n).map(|_| {
        http.post(format!("{url}/v1/sessions"))
            .bearer_auth(token)
            .json(&serde_json::json!({"image": "img"}))
            .send()
    });
    let mut statuses: Vec<u16> = futures::future::join_all(creates)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    statuses.sort_unstable();
    statuses
}

#[tokio::test]
async fn a_burst_of_creates_by_one_token_gets_exactly_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        sessions_per_token: 3,
        ..Limits::default()
    };
    let s = server(dir.path(), limits).await;
    // Twelve at once: each start takes a few ms, and every one of them used
    // to read "0 held" before any finished.
    let statuses = concurrent_creates(&s.url, "tok-a", 12).await;
    assert_eq!(statuses, [[201; 3].as_slice(), &[429; 9]].concat());
    let a = s.client("tok-a");
    assert_eq!(a.list().await.unwrap().len(), 3);
    assert_eq!(
        entries(dir.path()),
        3,
        "the refused creates started nothing"
    );
    // Another token has its own count; a deleted session frees a place.
    assert_eq!(concurrent_creates(&s.url, "tok-b", 1).await, [201]);
    let first = a.list().await.unwrap().remove(0).id;
    a.teardown(&sandfleet_sandbox::session::SessionId(first))
        .await
        .unwrap();
    assert_eq!(concurrent_creates(&s.url, "tok-a", 2).await, [201, 429]);
    s.stop().await;
}

#[tokio::test]
async fn an_idle_local_session_ends_by_itself_and_is_reaped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), Limits::default()).await;
    let a = s.client("tok-a");
    let mut spec = SessionSpec::new("img");
    spec.idle_timeout = Duration::from_secs(1);
    let idle = a.start(&spec).await.unwrap();
    let kept = a.start(&SessionSpec::new("img")).await.unwrap();
    eventually(
        "the reaper counted both sessions alive",
        Duration::from_secs(5),
        || async { s.metrics().await.contains("sandfleet_sessions_active 2") },
    )
    .await;

    // Past its idle timeout the session's processes and dir are gone, the
    // reaper forgets it, and the gauges say so.
    eventually(
        "the idle session is reaped",
        Duration::from_secs(10),
        || async {
            s.metrics()
                .await
                .contains("sandfleet_sessions_reaped_total 1")
        },
    )
    .await;
    let metrics = s.metrics().await;
    assert!(metrics.contains("sandfleet_sessions_active 1"), "{metrics}");
    let ids: Vec<String> = a.list().await.unwrap().into_iter().map(|i| i.id).collect();
    assert_eq!(ids, [kept.0]);
    assert!(matches!(
        a.run(&idle, "true", RunOptions::new(Duration::from_secs(5)), None)
            .await,
        Err(SessionError::NotFound(_))
    ));
    assert_eq!(
        entries(dir.path()),
        1,
        "only the kept session's dir is left"
    );

    // Deleting the ended one is a no-op; stopping the service ends the other.
    a.teardown(&idle).await.unwrap();
    s.stop().await;
    assert_eq!(
        entries(dir.path()),
        0,
        "a stopped service leaves no local session"
    );
}
