//! The Kubernetes executor under Kueue (`sandbox.kubernetes.kueue_queue`), on
//! kube-sim with its simulated Kueue: Jobs are created suspended and admitted
//! against a quota; the pending timeout waits for admission, the admission
//! wait is reported, a preempted run is waited for, an admission wait has its
//! own bound, and a cancelled suspended attempt leaves no Job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sandfleet_kube_sim::{KubeSim, SimOptions};
use sandfleet_proto::{Outcome, Task};
use sandfleet_sandbox::job::job_name;
use sandfleet_sandbox::{ApiRetry, Executor, KubeApi, KubeExecutor, RecordingGate, RunContext};
use sandfleet_settings::KubernetesSettings;
use serde_json::Value;

const NS: &str = "sandboxes";
const QUEUE: &str = "sandboxes";

async fn env(quota: usize, admission_timeout_secs: u64) -> (KubeSim, KubeExecutor) {
    let sim = KubeSim::start(SimOptions {
        kueue_quota: Some(quota),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let settings = KubernetesSettings {
        namespace: NS.into(),
        kueue_queue: Some(QUEUE.into()),
        admission_timeout_secs,
        ..KubernetesSettings::default()
    };
    let retry = ApiRetry {
        retries: 3,
        base: Duration::from_millis(20),
    };
    let api = KubeApi::from_kubeconfig_yaml(
        &sim.kubeconfig_yaml(NS),
        &settings,
        Arc::new(RecordingGate::default()),
        retry,
    )
    .await
    .unwrap();
    (sim, KubeExecutor::new(api, settings))
}

fn ctx() -> RunContext {
    RunContext {
        traceparent: None,
        worker: "worker-test".into(),
        cancels_read_to: None,
    }
}

/// A task whose one step records that it ran, then waits for `dir/go`.
fn held(dir: &Path, pending_timeout_secs: u64) -> Task {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tasks/python-fix-attempt.json");
    let mut task: Task = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    task.id = uuid::Uuid::now_v7();
    task.files.clear();
    task.artifacts.clear();
    task.steps.truncate(1);
    task.steps[0].name = "work".into();
    task.steps[0].run = format!(
        "echo run >> {d}/runs-$SANDFLEET_TASK_ID; while [ ! -e {d}/go ]; do sleep 0.05; done",
        d = dir.display()
    );
    task.sandbox.pending_timeout_secs = pending_timeout_secs;
    task
}

fn suspended(j: &Value) -> bool {
    j.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true)
}

fn finished(j: &Value) -> bool {
    j.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True"
            })
        })
}

/// (admitted and unfinished, suspended) Jobs in the sim now.
fn census(sim: &KubeSim) -> (usize, usize) {
    let jobs = sim.jobs(NS);
    let running = jobs
        .iter()
        .filter(|j| !suspended(j) && !finished(j))
        .count();
    let waiting = jobs.iter().filter(|j| suspended(j)).count();
    (running, waiting)
}

async fn until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_quota_of_four_holds_four_running_the_rest_suspended_and_all_complete() {
    let (sim, exec) = env(4, 3600).await;
    let dir = tempfile::tempdir().unwrap();
    // A pending timeout shorter than the admission wait: it must not fire
    // while a Job is suspended.
    let tasks: Vec<Task> = (0..10).map(|_| held(dir.path(), 3)).collect();
    let mut runs = tokio::task::JoinSet::new();
    for task in tasks.clone() {
        let exec = exec.clone();
        runs.spawn(async move {
            let r = exec.run(&task, 1, &ctx()).await;
            (task.id, r)
        });
    }
    until(20, "4 running and 6 suspended", || census(&sim) == (4, 6)).await;
    // Held there: never more than the quota, and no pod for a suspended Job.
    let hold_until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < hold_until {
        assert_eq!(
            census(&sim),
            (4, 6),
            "the quota holds while the first four run"
        );
        let pods = sim.pods(NS);
        let waiting: Vec<String> = sim
            .jobs(NS)
            .iter()
            .filter(|j| suspended(j))
            .map(|j| j["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        assert!(
            pods.iter().all(|p| !waiting.contains(
                &p["metadata"]["labels"]["sandfleet.dev/job"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            )),
            "a suspended Job has no pod"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(dir.path().join("go"), "").unwrap();
    let mut waits = Vec::new();
    while let Some(joined) = runs.join_next().await {
        let (id, r) = joined.unwrap();
        let e = r.unwrap_or_else(|e| panic!("task {id}: {e}"));
        assert_eq!(e.outcome, Outcome::Succeeded, "{e:#?}");
        waits.push(
            e.admission_wait
                .expect("a Kueue-managed run reports its admission wait"),
        );
    }
    waits.sort();
    // The six that waited, waited past their 3 s pending timeout.
    assert!(
        waits[4..].iter().all(|w| *w >= Duration::from_secs(3)),
        "admission waits: {waits:?}"
    );
    for t in &tasks {
        let ran = std::fs::read_to_string(dir.path().join(format!("runs-{}", t.id))).unwrap();
        assert_eq!(ran.lines().count(), 1, "each task ran once");
    }
    until(10, "every job deleted", || sim.jobs(NS).is_empty()).await;
    sim.stop().await;
}

#[tokio::test]
async fn a_cancelled_suspended_attempt_leaves_no_job_and_never_runs() {
    let (sim, exec) = env(1, 3600).await;
    let dir = tempfile::tempdir().unwrap();
    let first = held(dir.path(), 60);
    let second = held(dir.path(), 60);
    let (e1, t1) = (exec.clone(), first.clone());
    let run1 = tokio::spawn(async move { e1.run(&t1, 1, &ctx()).await });
    until(10, "the first running", || census(&sim) == (1, 0)).await;
    let (e2, t2) = (exec.clone(), second.clone());
    let run2 = tokio::spawn(async move { e2.run(&t2, 1, &ctx()).await });
    until(10, "the second suspended", || census(&sim) == (1, 1)).await;

    exec.cancel(second.id, 1).await.unwrap();
    let e = run2.await.unwrap().unwrap();
    assert_eq!(e.outcome, Outcome::Cancelled);
    assert!(e.steps.iter().all(|s| s.exit_code.is_none()), "{e:#?}");
    let name = job_name(second.id, 1);
    until(10, "the suspended job deleted", || {
        sim.jobs(NS)
            .iter()
            .all(|j| j["metadata"]["name"] != name.as_str())
    })
    .await;
    std::fs::write(dir.path().join("go"), "").unwrap();
    assert_eq!(run1.await.unwrap().unwrap().outcome, Outcome::Succeeded);
    assert!(
        !dir.path().join(format!("runs-{}", second.id)).exists(),
        "the cancelled attempt never ran"
    );
    sim.stop().await;
}

#[tokio::test]
async fn a_job_not_admitted_within_the_admission_timeout_is_unschedulable_and_deleted() {
    let (sim, exec) = env(1, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let first = held(dir.path(), 60);
    let second = held(dir.path(), 60);
    let (e1, t1) = (exec.clone(), first.clone());
    let run1 = tokio::spawn(async move { e1.run(&t1, 1, &ctx()).await });
    until(10, "the first running", || census(&sim) == (1, 0)).await;
    let e = exec.run(&second, 1, &ctx()).await.unwrap();
    assert_eq!(e.outcome, Outcome::Unschedulable, "{e:#?}");
    assert!(e.outcome.is_retryable());
    let error = e.error.unwrap();
    assert!(
        error.contains("Kueue did not admit") && error.contains("admission_timeout_secs"),
        "{error}"
    );
    assert!(e.admission_wait.unwrap() >= Duration::from_secs(1));
    let name = job_name(second.id, 1);
    until(10, "the waiting job deleted", || {
        sim.jobs(NS)
            .iter()
            .all(|j| j["metadata"]["name"] != name.as_str())
    })
    .await;
    std::fs::write(dir.path().join("go"), "").unwrap();
    assert_eq!(run1.await.unwrap().unwrap().outcome, Outcome::Succeeded);
    sim.stop().await;
}

#[tokio::test]
async fn a_preempted_run_is_waited_for_and_runs_again_instead_of_failing() {
    let (sim, exec) = env(1, 3600).await;
    let dir = tempfile::tempdir().unwrap();
    let task = held(dir.path(), 60);
    let (e1, t1) = (exec.clone(), task.clone());
    let run = tokio::spawn(async move { e1.run(&t1, 1, &ctx()).await });
    let runs = dir.path().join(format!("runs-{}", task.id));
    until(10, "the first run", || runs.exists()).await;
    let first_pod = sim.pods(NS)[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();

    assert!(sim.kueue_preempt(NS, &job_name(task.id, 1)));
    // Its pod is deleted; Kueue admits it again (nothing else waits); a new
    // pod runs the script from the start.
    until(20, "a second run in a new pod", || {
        std::fs::read_to_string(&runs).is_ok_and(|r| r.lines().count() == 2)
    })
    .await;
    until(10, "the preempted pod gone", || {
        sim.pods(NS)
            .iter()
            .all(|p| p["metadata"]["name"] != first_pod.as_str())
    })
    .await;
    std::fs::write(dir.path().join("go"), "").unwrap();
    let e = run.await.unwrap().unwrap();
    assert_eq!(e.outcome, Outcome::Succeeded, "{e:#?}");
    assert!(e.admission_wait.is_some());
    sim.stop().await;
}
