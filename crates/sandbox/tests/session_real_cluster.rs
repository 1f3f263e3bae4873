//! The session scenario and teardown against a real cluster (kind, k3d, ...),
//! for users' CI: the same `conformance` scenario as on kube-sim, through a
//! real API server's `pods/exec`, and the idle timeout ending the pod.
//!
//! Ignored by default (no cluster here); run with
//! `KUBECONFIG=... SANDFLEET_TEST_NAMESPACE=sandfleet-e2e cargo nextest run -p sandfleet-sandbox --test session_real_cluster --run-ignored all`.
//! The namespace must exist and the kubeconfig's user needs the sessions
//! Role there (`k8s/base/sessions-rbac.yaml`); the image (busybox, as user
//! 65532) is pulled from Docker Hub. Every test tears down what it started.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sandfleet_sandbox::session::{
    KubeSessions, RunOptions, Session, SessionBackend, SessionError, SessionSpec, conformance,
};
use sandfleet_settings::KubernetesSettings;

const IMAGE: &str = "docker.io/library/busybox:1.36";

async fn backend() -> KubeSessions {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "set KUBECONFIG to a test cluster to run the real-cluster suite"
    );
    let settings = KubernetesSettings {
        namespace: std::env::var("SANDFLEET_TEST_NAMESPACE")
            .unwrap_or_else(|_| "sandfleet-e2e".into()),
        // busybox runs as root by default; the sandbox must not.
        run_as_user: Some(65532),
        ..KubernetesSettings::default()
    };
    KubeSessions::infer(settings)
        .await
        .unwrap()
        .with_start_timeout(Duration::from_secs(300))
}

#[tokio::test]
#[ignore = "needs a real cluster (KUBECONFIG)"]
async fn real_cluster_passes_the_shared_scenario() {
    let backend = Arc::new(backend().await);
    let mut session = Session::start(backend, &conformance::spec(IMAGE))
        .await
        .unwrap();
    let transcript = conformance::scenario(&session).await;
    session.teardown().await.unwrap();
    assert_eq!(transcript.unwrap(), conformance::expected());
}

#[tokio::test]
#[ignore = "needs a real cluster (KUBECONFIG)"]
async fn real_cluster_idle_session_ends_and_is_reaped() {
    let backend = backend().await;
    let mut spec = SessionSpec::new(IMAGE);
    spec.idle_timeout = Duration::from_secs(5);
    let id = backend.start(&spec).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let reaped = backend.reap().await.unwrap();
        if reaped.contains(&id) {
            break;
        }
        assert!(Instant::now() < deadline, "the idle session was not reaped");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let err = backend
        .run(&id, "true", RunOptions::new(Duration::from_secs(5)), None)
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::NotFound(_)), "{err}");
}
