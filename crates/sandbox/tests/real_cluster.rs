//! The main kube-sim scenarios against a real cluster (kind, k3d, ...), for
//! users' CI: success, a failing step, OOM, the deadline, a missing image,
//! adoption of a Job whose worker was killed, and garbage collection.
//!
//! Ignored by default (no cluster here); run with
//! `KUBECONFIG=... SANDFLEET_TEST_NAMESPACE=sandfleet-e2e cargo nextest run -p sandfleet-sandbox --test real_cluster --run-ignored all`.
//! The namespace must exist and the kubeconfig's user needs the worker's Role
//! there (`k8s/base/worker-rbac.yaml`); the images are pulled from Docker Hub.
//! Every test uses fresh task ids, so runs never collide, and deletes the Jobs
//! it made.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandfleet_proto::{Outcome, Task};
use sandfleet_sandbox::job::{self, job_name};
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

/// A task whose one step runs `cmd` in the Python example's image.
fn one_step(cmd: &str) -> Task {
    let mut task = example("python-fix-attempt.json");
    task.files.clear();
    task.artifacts.clear();
    task.steps.truncate(1);
    task.steps[0].name = "work".into();
    task.steps[0].run = cmd.into();
    // Image pulls on a fresh cluster take a while.
    task.sandbox.pending_timeout_secs = 180;
    task
}

fn settings() -> KubernetesSettings {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "set KUBECONFIG to a test cluster to run the real-cluster suite"
    );
    KubernetesSettings {
        namespace: std::env::var("SANDFLEET_TEST_NAMESPACE")
            .unwrap_or_else(|_| "sandfleet-e2e".into()),
        ..KubernetesSettings::default()
    }
}

async fn executor_with(settings: KubernetesSettings) -> KubeExecutor {
    let api = KubeApi::infer(&settings, Arc::new(NoGate), ApiRetry::default())
        .await
        .unwrap();
    let exec = KubeExecutor::new(api, settings);
    exec.synced().await;
    exec
}

async fn executor() -> KubeExecutor {
    executor_with(settings()).await
}

fn ctx() -> RunContext {
    RunContext {
        traceparent: None,
        worker: "real-cluster-test".into(),
        cancels_read_to: None,
    }
}

/// Waits (bounded) until `cond` holds for Job `name`.
async fn until_job(
    exec: &KubeExecutor,
    name: &str,
    what: &str,
    timeout: Duration,
    cond: impl Fn(Option<&k8s_openapi::api::batch::v1::Job>) -> bool,
) {
    let start = Instant::now();
    loop {
        let job = exec.api().get_job(name).await.unwrap();
        if cond(job.as_ref()) {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "Job {name}: {what} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn finished(job: Option<&k8s_openapi::api::batch::v1::Job>) -> bool {
    job.and_then(|j| j.status.as_ref())
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
}

#[tokio::test]
#[ignore = "needs a real cluster: set KUBECONFIG and run with --run-ignored"]
async fn python_fix_attempt_succeeds_on_a_real_cluster() {
    let exec = executor().await;
    let ok = exec
        .run(&example("python-fix-attempt.json"), 1, &ctx())
        .await
        .unwrap();
    assert_eq!(ok.outcome, Outcome::Succeeded, "{ok:#?}");
    assert!(ok.steps[1].output_tail.contains("Ran 2 tests"));
    assert!(
        ok.artifacts[0]
            .content
            .as_deref()
            .unwrap_or_default()
            .contains("Ran 2 tests")
    );
    // The executor deletes its Job once the result is in.
    until_job(
        &exec,
        &ok.sandbox,
        "deleted",
        Duration::from_secs(60),
        |j| j.is_none() || j.is_some_and(|j| j.metadata.deletion_timestamp.is_some()),
    )
    .await;
}

#[tokio::test]
#[ignore = "needs a real cluster: set KUBECONFIG and run with --run-ignored"]
async fn failing_step_fails_with_its_exit_code_on_a_real_cluster() {
    let exec = executor().await;
    let mut failing = example("python-fix-attempt.json");
    failing.steps.remove(0); // no patch: the even-length test fails
    let failed = exec.run(&failing, 1, &ctx()).await.unwrap();
    assert_eq!(
        (failed.outcome, failed.exit_code),
        (Outcome::Failed, Some(1)),
        "{failed:#?}"
    );
    assert!(failed.steps[0].output_tail.contains("FAILED (failures=1)"));
    assert!(!failed.outcome.is_retryable());
}

#[tokio::test]
#[ignore = "needs a real cluster: set KUBECONFIG and run with --run-ignored"]
async fn memory_over_the_limit_is_oom_killed_on_a_real_cluster() {
    let exec = executor().await;
    let mut task = one_step("python3 -c 'b = bytearray(1024 * 1024 * 1024); print(len(b))'");
    task.sandbox.resources.memory_request = Some("64Mi".into());
    task.sandbox.resources.memory_limit = Some("64Mi".into());
    let r = exec.run(&task, 1, &ctx()).await.unwrap();
    // With cgroup v2 (Kubernetes >= 1.28) the kernel kills the container's
    // whole cgroup and the kubelet reports OOMKilled.
    assert_eq!(
        (r.outcome, r.exit_code),
        (Outcome::OomKilled, Some(137)),
        "{r:#?}"
    );
    assert!(!r.outcome.is_retryable());
}

#[tokio::test]
#[ignore = "needs a real cluster: set KUBECONFIG and run with --run-ignored"]
async fn the_deadline_ends_a_hanging_step_on_a_real_cluster() {
    let exec = executor().await;
    let mut task = one_step("echo started; sleep 600");
    task.sandbox.deadline_secs = 10;
    task.steps[0].timeout_secs = 10;
    let started = Instant::now();
    let r = exec.run(&task, 1, &ctx()).await.unwrap();
    assert_eq!(r.outcome, Outcome::TimedOut, "{r:#?}");
    assert!(started.elapsed() < Duration::from_secs(10 + 180 + 60));
    assert!(!r.outcome.is_retryable());
}

#[tokio::test]
#[ignore = "needs a real cluster: set KUBECONFIG and run with --run-ignored"]
async fn a_missing_image_is_image_pull_failed_on_a_real_cluster() {
    let exec = executor().await;
    let mut task = example("python-fix-attempt.json");
    task.sandbox.image = "docker.io/library/sandfleet-does-not-exist:0".into();
    task.sandbox.pending_timeout_secs = 30;
    let r = exec.run(&task, 1, &ctx()).await.unwrap();
    assert_eq!(r.outcome, Outcome::ImagePullFailed, "{r:#?}");
    assert!(r.outcome.is_retryable());
}

#[tokio::test]
#[ignore = "needs a real cluster: set KUBECONFIG and run with --run-ignored"]
async fn a_redelivery_adopts_the_job_of_a_killed_worker_on_a_real_cluster() {
    let task = one_step("echo from-the-first-delivery; sleep 20; echo done");
    let name = job_name(task.id, 1);
    // The first worker creates the Job and dies mid-run: its run is dropped
    // (as a SIGKILL would end it), the Job keeps running.
    let first = executor().await;
    let (t, c) = (task.clone(), ctx());
    let handle = tokio::spawn(async move { first.run(&t, 1, &c).await });
    let second = executor().await;
    until_job(&second, &name, "created", Duration::from_secs(60), |j| {
        j.is_some()
    })
    .await;
    handle.abort();
    assert!(handle.await.unwrap_err().is_cancelled());
    assert!(
        second.api().get_job(&name).await.unwrap().is_some(),
        "the Job outlives its worker"
    );

    // The redelivery on another worker adopts it: no second Job, the first
    // delivery's output in the result.
    let r = second.run(&task, 1, &ctx()).await.unwrap();
    assert!(r.adopted, "{r:#?}");
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
    assert_eq!(r.steps[0].output_tail, "from-the-first-delivery\ndone\n");
    assert_eq!(r.sandbox, name);
}

#[tokio::test]
#[ignore = "needs a real cluster: set KUBECONFIG and run with --run-ignored"]
async fn garbage_collection_deletes_finished_orphans_only_on_a_real_cluster() {
    // Two Jobs created by workers that died: one finishes, one hangs. They
    // keep the default TTL, so the cluster's TTL controller does not race the
    // collector; the collector's settings say TTL 0, so it acts at once.
    let exec = executor_with(KubernetesSettings {
        gc_interval_secs: 0,
        ttl_seconds_after_finished: 0,
        ..settings()
    })
    .await;
    let done = one_step("echo done");
    let mut hung = one_step("sleep 600");
    hung.sandbox.deadline_secs = 600;
    for t in [&done, &hung] {
        exec.api()
            .create_job(&job::build(t, 1, &ctx(), &settings()).unwrap())
            .await
            .unwrap();
    }
    let (done_name, hung_name) = (job_name(done.id, 1), job_name(hung.id, 1));
    until_job(
        &exec,
        &done_name,
        "finished",
        Duration::from_secs(240),
        finished,
    )
    .await;

    let deleted = exec.collect_garbage().await.unwrap();
    assert!(deleted.contains(&done_name), "{deleted:?}");
    assert!(
        !deleted.contains(&hung_name),
        "a running Job is not garbage"
    );
    until_job(&exec, &done_name, "deleted", Duration::from_secs(60), |j| {
        j.is_none() || j.is_some_and(|j| j.metadata.deletion_timestamp.is_some())
    })
    .await;
    assert!(exec.api().get_job(&hung_name).await.unwrap().is_some());
    exec.api().delete_job(&hung_name).await.unwrap();
}
