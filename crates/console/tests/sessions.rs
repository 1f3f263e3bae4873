//! The sessions panel: shown with the sessions the configured token sees
//! and the warm pools when a sessions service is configured (here the real
//! service on kube-sim), left out otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use sandfleet_kube_sim::{KubeSim, SimOptions};
use sandfleet_sandbox::session::pool::PoolTemplate;
use sandfleet_sandbox::session::{KubeSessions, Session, SessionSpec};
use sandfleet_sessions::auth::Tokens;
use sandfleet_sessions::{Limits, Service, SessionsClient};
use sandfleet_settings::KubernetesSettings;
use tokio_util::sync::CancellationToken;

const NS: &str = "console-sessions";

async fn overview(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn the_overview_lists_sessions_only_when_a_sessions_service_is_configured() {
    // Without one: no panel.
    let plain = common::Env::start(false, false).await;
    let page = overview(&plain.url("/")).await;
    assert!(
        page.contains("Queues") && !page.contains("h-sessions"),
        "{page}"
    );
    plain.cleanup().await;

    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let backend = KubeSessions::from_kubeconfig_yaml(
        &sim.kubeconfig_yaml(NS),
        KubernetesSettings {
            namespace: NS.into(),
            ..KubernetesSettings::default()
        },
    )
    .await
    .unwrap()
    .with_start_timeout(Duration::from_secs(20));
    let service = Service::with_pools(
        backend,
        Tokens::from_tokens(["console-token", "someone-else"]),
        Limits::default(),
        vec![PoolTemplate {
            name: "builds".into(),
            image: "alpine:3.20".into(),
            resources: Default::default(),
            size: 1,
            max_age: Duration::from_secs(3600),
        }],
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sessions_url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(service.run(listener, Duration::from_millis(200), stop.clone()));

    let env = common::Env::start_with(false, false, |s| {
        s.console.sessions_url = Some(sessions_url.clone());
        s.console.sessions_token = Some("console-token".into());
    })
    .await;
    // The warm pool fills up: one idle member of one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let page = overview(&env.url("/")).await;
        if page.contains(r#"<tr data-pool="builds"><td>builds</td><td><code>alpine:3.20</code></td><td>1 / 1</td>"#) {
            assert!(page.contains("No session is open."), "{page}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the overview never showed the warm pool full: {page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let client = Arc::new(SessionsClient::new(&sessions_url, "console-token"));
    let mut session = Session::start(client, &SessionSpec::new("alpine:3.20"))
        .await
        .unwrap();
    let id = session.id().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let page = overview(&env.url("/")).await;
        if page.contains(&id) {
            assert!(
                page.contains("alpine:3.20") && page.contains(">open<"),
                "{page}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the overview never listed session {id}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    session.teardown().await.unwrap();
    // The service going away is said, not hidden.
    stop.cancel();
    task.abort();
    let _ = task.await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !overview(&env.url("/"))
        .await
        .contains("The sessions service did not answer")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the overview never said the sessions service is gone"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.cleanup().await;
}
