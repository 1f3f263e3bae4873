//! The same scenarios against a real cluster (kind, k3d, ...), for users' CI.
//! Ignored by default (no cluster here); run with
//! `KUBECONFIG=... SANDFLEET_TEST_NAMESPACE=sandfleet-e2e cargo nextest run -p sandfleet-sandbox --test real_cluster --run-ignored all`.
//! The namespace must exist; the images are pulled from Docker Hub.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use sandfleet_proto::{Outcome, Task};
use sandfleet_sandbox::{ApiRetry, Executor, KubeApi, KubeExecutor, NoGate, RunContext};
use sandfleet_settings::KubernetesSettings;

fn example(name: &str) -> Task {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/tasks")
        .join(name);
    let mut task: Task = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    task.id = uuid::Uuid::now_v7();
    task
}

async fn executor() -> KubeExecutor {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "set KUBECONFIG to a test cluster to run the real-cluster suite"
    );
    let settings = KubernetesSettings {
        namespace: std::env::var("SANDFLEET_TEST_NAMESPACE")
            .unwrap_or_else(|_| "sandfleet-e2e".into()),
        ..KubernetesSettings::default()
    };
    let api = KubeApi::infer(&settings, Arc::new(NoGate), ApiRetry::default())
        .await
        .unwrap();
    KubeExecutor::new(api, settings)
}

#[tokio::test]
#[ignore = "needs a real cluster: set KUBECONFIG and run with --run-ignored"]
async fn python_fix_attempt_on_a_real_cluster() {
    let exec = executor().await;
    let ctx = RunContext::default();
    let ok = exec
        .run(&example("python-fix-attempt.json"), 1, &ctx)
        .await
        .unwrap();
    assert_eq!(ok.outcome, Outcome::Succeeded, "{ok:#?}");
    assert!(ok.steps[1].output_tail.contains("Ran 2 tests"));
    let mut failing = example("python-fix-attempt.json");
    failing.steps.remove(0);
    let failed = exec.run(&failing, 1, &ctx).await.unwrap();
    assert_eq!(
        (failed.outcome, failed.exit_code),
        (Outcome::Failed, Some(1)),
        "{failed:#?}"
    );
}

#[tokio::test]
#[ignore = "needs a real cluster: set KUBECONFIG and run with --run-ignored"]
async fn missing_image_on_a_real_cluster() {
    let exec = executor().await;
    let mut task = example("python-fix-attempt.json");
    task.sandbox.image = "docker.io/library/sandfleet-does-not-exist:0".into();
    task.sandbox.pending_timeout_secs = 30;
    let r = exec.run(&task, 1, &RunContext::default()).await.unwrap();
    assert_eq!(r.outcome, Outcome::ImagePullFailed, "{r:#?}");
}
