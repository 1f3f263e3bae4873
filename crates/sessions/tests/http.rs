//! The sessions service over HTTP, on kube-sim: the shared scenario through
//! the client, token isolation, limits, and teardown when a client vanishes
//! or a replica dies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use sandfleet_kube_sim::{KubeSim, SimOptions};
use sandfleet_sandbox::session::{
    KubeSessions, RunOptions, Session, SessionBackend, SessionError, SessionId, SessionSpec,
    conformance,
};
use sandfleet_sessions::auth::Tokens;
use sandfleet_sessions::{Limits, Service, SessionsClient};
use sandfleet_settings::KubernetesSettings;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const NS: &str = "sessions-http";

struct Replica {
    url: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Replica {
    async fn kill(self) {
        // Abort, not drain: a replica that dies mid-session.
        self.task.abort();
        let _ = self.task.await;
        self.stop.cancel();
    }
}

async fn replica(sim: &KubeSim, limits: Limits) -> Replica {
    let settings = KubernetesSettings {
        namespace: NS.into(),
        ..KubernetesSettings::default()
    };
    let backend = KubeSessions::from_kubeconfig_yaml(&sim.kubeconfig_yaml(NS), settings)
        .await
        .unwrap()
        .with_start_timeout(Duration::from_secs(20));
    let service = Service::new(backend, Tokens::from_tokens(["tok-a", "tok-b"]), limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(service.run(listener, Duration::from_millis(200), stop.clone()));
    Replica { url, stop, task }
}

async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn the_service_passes_the_shared_scenario() {
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let r = replica(&sim, Limits::default()).await;
    let client = Arc::new(SessionsClient::new(&r.url, "tok-a"));
    let mut session = Session::start(client.clone(), &conformance::spec("alpine:3.20"))
        .await
        .unwrap();
    let transcript = conformance::scenario(&session).await.unwrap();
    assert_eq!(transcript, conformance::expected());

    // Streamed over HTTP too.
    common::streams_stdout_and_stderr_apart(&session).await;

    session.teardown().await.unwrap();
    session.teardown().await.unwrap();
    eventually("no session job is left", Duration::from_secs(10), || {
        sim.jobs(NS).is_empty()
    })
    .await;
    r.kill().await;
}

#[tokio::test]
async fn a_session_is_visible_only_to_its_token_and_limits_are_clear_4xx() {
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let limits = Limits {
        sessions_per_token: 1,
        max_file_bytes: 1024,
        ..Limits::default()
    };
    let r = replica(&sim, limits).await;
    let a = SessionsClient::new(&r.url, "tok-a");
    let b = SessionsClient::new(&r.url, "tok-b");
    let id = a.start(&SessionSpec::new("img")).await.unwrap();

    // Another token sees nothing, and cannot act on it.
    assert!(b.list().await.unwrap().is_empty());
    assert_eq!(a.list().await.unwrap().len(), 1);
    let opts = RunOptions::new(Duration::from_secs(5));
    assert!(matches!(
        b.run(&id, "true", opts, None).await,
        Err(SessionError::NotFound(_))
    ));
    assert!(matches!(
        b.read_file(&id, "x", 10).await,
        Err(SessionError::NotFound(_))
    ));
    b.teardown(&id).await.unwrap();
    assert_eq!(
        a.run(&id, "echo mine", opts, None).await.unwrap().stdout,
        b"mine\n"
    );

    // No token, or a wrong one: 401.
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("{}/v1/sessions", r.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = http
        .get(format!("{}/v1/sessions", r.url))
        .bearer_auth("tok-c")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Each limit answers its own 4xx with a code that says which.
    let post = |path: String, body: serde_json::Value| {
        http.post(format!("{}{path}", r.url))
            .bearer_auth("tok-a")
            .json(&body)
            .send()
    };
    let resp = post("/v1/sessions".into(), serde_json::json!({"image": "img"}))
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "session_limit");
    let resp = post(
        "/v1/sessions".into(),
        serde_json::json!({"image": "img", "max_lifetime": 10_000_000}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 422);
    let resp = post(
        format!("/v1/sessions/{id}/run"),
        serde_json::json!({"command": "true", "timeout_secs": 1_000_000}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 422);
    let err = a
        .write_file(&id, "big", &[0u8; 2048], 0o644)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("413"), "{err}");

    a.teardown(&id).await.unwrap();
    eventually("no session job is left", Duration::from_secs(10), || {
        sim.jobs(NS).is_empty()
    })
    .await;
    r.kill().await;
}

#[tokio::test]
async fn a_session_survives_its_replica_and_a_vanished_client_costs_nothing() {
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let r1 = replica(&sim, Limits::default()).await;
    let r2 = replica(&sim, Limits::default()).await;
    let via1 = SessionsClient::new(&r1.url, "tok-a");
    let via2 = SessionsClient::new(&r2.url, "tok-a");
    let opts = RunOptions::new(Duration::from_secs(10));

    let id = via1.start(&SessionSpec::new("img")).await.unwrap();
    via1.write_file(&id, "state.txt", b"kept", 0o644)
        .await
        .unwrap();
    r1.kill().await;
    // The session lives in Kubernetes: the other replica serves it.
    let o = via2.run(&id, "cat state.txt", opts, None).await.unwrap();
    assert_eq!(o.stdout, b"kept");
    assert!(matches!(
        via1.run(&id, "true", opts, None).await,
        Err(SessionError::Unavailable(_))
    ));

    // A client that opens a session and vanishes: the idle timeout ends the
    // pod and the reaper deletes its Job.
    let mut spec = SessionSpec::new("img");
    spec.idle_timeout = Duration::from_secs(1);
    let abandoned: SessionId = via2.start(&spec).await.unwrap();
    eventually(
        "the abandoned session is reaped",
        Duration::from_secs(20),
        || {
            !sim.jobs(NS)
                .iter()
                .any(|j| j["metadata"]["name"] == abandoned.0)
        },
    )
    .await;
    assert!(matches!(
        via2.run(&abandoned, "true", opts, None).await,
        Err(SessionError::NotFound(_))
    ));

    via2.teardown(&id).await.unwrap();
    eventually("no session job is left", Duration::from_secs(10), || {
        sim.jobs(NS).is_empty()
    })
    .await;
    r2.kill().await;
}

#[tokio::test]
async fn a_cut_exec_is_connection_lost_through_the_service_and_counted() {
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let r = replica(&sim, Limits::default()).await;
    let client = SessionsClient::new(&r.url, "tok-a");
    let id = client.start(&SessionSpec::new("img")).await.unwrap();
    let opts = RunOptions::new(Duration::from_secs(60));
    let run = client.run(&id, "sleep 20; echo done", opts, None);
    let cut = async {
        eventually("the exec stream is open", Duration::from_secs(10), || {
            sim.open_exec_streams() > 0
        })
        .await;
        sim.drop_exec_connections();
    };
    let (result, ()) = tokio::join!(run, cut);
    let err = result.unwrap_err();
    assert!(err.is_connection_lost(), "never an exit code: {err}");
    // The session still works after the cut.
    let o = client.run(&id, "echo ok", opts, None).await.unwrap();
    assert_eq!(o.stdout, b"ok\n");

    // The metrics a dashboard needs are there, with what happened.
    let text = reqwest::get(format!("{}/metrics", r.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "sandfleet_sessions_active ",
        "sandfleet_sessions_started_total 1",
        "sandfleet_sessions_start_duration_seconds_count 1",
        "sandfleet_sessions_command_duration_seconds_count 1",
        "sandfleet_sessions_exec_errors_total{code=\"connection_lost\"} 1",
        "sandfleet_sessions_reaped_total ",
    ] {
        assert!(text.contains(name), "missing {name:?} in\n{text}");
    }
    client.teardown(&id).await.unwrap();
    eventually("no session job is left", Duration::from_secs(10), || {
        sim.jobs(NS).is_empty()
    })
    .await;
    r.kill().await;
}
