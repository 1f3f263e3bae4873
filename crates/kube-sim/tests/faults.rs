//! Fault injection as the kube client sees it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{NS, client, client_with, shell_job, start};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, PostParams};
use sandfleet_kube_sim::{FaultAction, FaultRule};

fn status(code: u16, retry_after_secs: Option<u64>) -> FaultAction {
    FaultAction::Status {
        code,
        retry_after_secs,
    }
}

#[tokio::test]
async fn server_errors_surface_as_api_errors() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client_with(&sim, false).await, NS);
    sim.faults()
        .inject(FaultRule::new("POST", "/jobs", status(500, None)).times(1));
    let err = jobs
        .create(&PostParams::default(), &shell_job("f1", "true"))
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => assert_eq!((s.code, s.reason.as_str()), (500, "InternalError")),
        other => panic!("{other:?}"),
    }
    // Count-limited: the next create goes through.
    jobs.create(&PostParams::default(), &shell_job("f1", "true"))
        .await
        .unwrap();
    let statuses: Vec<u16> = sim
        .request_log()
        .iter()
        .filter(|r| r.verb() == "create")
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [500, 201]);
}

#[tokio::test]
async fn throttling_carries_retry_after() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client_with(&sim, false).await, NS);
    sim.faults()
        .inject(FaultRule::new("GET", "/jobs", status(429, Some(3))).times(1));
    match jobs.list(&ListParams::default()).await.unwrap_err() {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (429, "TooManyRequests"));
            assert_eq!(s.details.unwrap().retry_after_seconds, 3);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn default_client_retries_503_by_itself() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    sim.faults()
        .inject(FaultRule::new("GET", "/jobs", status(503, None)).times(2));
    jobs.list(&ListParams::default()).await.unwrap();
    let lists: Vec<u16> = sim
        .request_log()
        .iter()
        .filter(|r| r.verb() == "list")
        .map(|r| r.status)
        .collect();
    assert_eq!(lists, [503, 503, 200]);
}

#[tokio::test]
async fn latency_is_added() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    sim.faults().inject(
        FaultRule::new("*", "/jobs", FaultAction::Delay(Duration::from_millis(300))).times(1),
    );
    let t = Instant::now();
    jobs.list(&ListParams::default()).await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn reset_connection_is_a_transport_error() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client_with(&sim, false).await, NS);
    sim.faults()
        .inject(FaultRule::new("GET", "/jobs", FaultAction::ResetConnection).times(1));
    let err = jobs.list(&ListParams::default()).await.unwrap_err();
    assert!(!matches!(err, kube::Error::Api(_)), "{err:?}");
    jobs.list(&ListParams::default()).await.unwrap();
    assert_eq!(sim.request_log()[0].status, 0);
}

#[tokio::test]
async fn refused_connections_then_reopened_on_the_same_port() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client_with(&sim, false).await, NS);
    jobs.list(&ListParams::default()).await.unwrap();
    sim.refuse_connections(true).await.unwrap();
    let err = jobs.list(&ListParams::default()).await.unwrap_err();
    assert!(!matches!(err, kube::Error::Api(_)), "{err:?}");
    assert!(tokio::net::TcpStream::connect(sim.addr()).await.is_err());
    sim.refuse_connections(false).await.unwrap();
    jobs.list(&ListParams::default()).await.unwrap();
}

#[tokio::test]
async fn watch_end_early_then_rewatch() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    sim.faults()
        .inject(FaultRule::new("GET", "/jobs", FaultAction::WatchEndEarly).times(1));
    let wp = kube::api::WatchParams::default().timeout(1);
    use futures::TryStreamExt as _;
    let events: Vec<_> = jobs
        .watch(&wp, "0")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(events.is_empty());
    let watches = sim
        .request_log()
        .iter()
        .filter(|r| r.verb() == "watch")
        .count();
    assert_eq!(watches, 1);
    assert_eq!(sim.faults().active(), 0);
}
