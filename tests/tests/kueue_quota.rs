//! Kueue mode end to end: two worker processes (5 sandboxes each) with
//! `sandbox.kubernetes.kueue_queue` set, the real broker, and kube-sim
//! simulating Kueue with a quota of 4 admitted Jobs. Ten tasks: the workers
//! create all ten Jobs suspended, Kueue admits four at a time, the other six
//! wait suspended (no pod) and are admitted as the running ones finish. Every
//! task ends with exactly one final result, on its first attempt (waiting
//! for admission is not a failure), and the results report the admission
//! wait.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sandfleet_e2e::{Env, WorkerProc, task};
use sandfleet_kube_sim::SimOptions;
use sandfleet_proto::Outcome;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_sandfleet-test-worker");
const TASKS: usize = 10;
const QUOTA: usize = 4;
/// Each task's step; long enough that all ten Jobs exist while the first
/// four run.
const STEP_SECS: u64 = 3;

fn has_condition(job: &Value, ty: &str) -> bool {
    job.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some(ty)
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        })
}

/// Unfinished Jobs of the queue: (admitted, suspended).
fn admission(jobs: &[Value]) -> (usize, usize) {
    let live: Vec<&Value> = jobs
        .iter()
        .filter(|j| {
            j.pointer("/metadata/labels/kueue.x-k8s.io~1queue-name")
                .and_then(Value::as_str)
                == Some("sandboxes")
                && !has_condition(j, "Complete")
                && !has_condition(j, "Failed")
        })
        .collect();
    let suspended = live
        .iter()
        .filter(|j| j.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true))
        .count();
    (live.len() - suspended, suspended)
}

/// Pods not yet terminated (pending or running).
fn live_pods(pods: &[Value]) -> usize {
    pods.iter()
        .filter(|p| {
            matches!(
                p.pointer("/status/phase").and_then(Value::as_str),
                Some("Pending" | "Running")
            )
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kueue_quota_of_four_runs_four_and_holds_the_rest_suspended() {
    let env = Env::with_sim(
        "kueue",
        BIN,
        Some(SimOptions {
            kueue_quota: Some(QUOTA),
            ..SimOptions::default()
        }),
        |s| {
            s.worker.concurrency = 5;
            s.sandbox.kubernetes.kueue_queue = Some("sandboxes".into());
            s.telemetry.log_filter = "warn".into();
        },
    )
    .await
    .unwrap();
    let workers: Vec<WorkerProc> = vec![
        env.spawn_worker("w0", |_| {}).unwrap(),
        env.spawn_worker("w1", |_| {}).unwrap(),
    ];
    for w in &workers {
        w.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    }
    let mut ids = Vec::new();
    for _ in 0..TASKS {
        let t = task(&format!("sleep {STEP_SECS}; echo done"));
        ids.push(t.id);
        env.publish(&t).await.unwrap();
    }

    // Watch the cluster until every task has its final result: never more
    // than the quota admitted or with a pod, and the rest waiting suspended.
    let (mut max_admitted, mut max_pods, mut max_suspended, mut full_house) = (0, 0, 0, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let sim = env.kube();
        let (admitted, suspended) = admission(&sim.sim.jobs(&sim.namespace));
        let pods = live_pods(&env.pods());
        max_admitted = max_admitted.max(admitted);
        max_pods = max_pods.max(pods);
        max_suspended = max_suspended.max(suspended);
        full_house |= admitted == QUOTA && suspended == TASKS - QUOTA;
        assert!(
            admitted <= QUOTA && pods <= QUOTA,
            "{admitted} Jobs admitted and {pods} pods live over a quota of {QUOTA}"
        );
        if ids.iter().all(|id| !env.finals(*id).is_empty()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every task finished; worker logs:\n{}\n{}",
            workers[0].log_tail(),
            workers[1].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(max_admitted, QUOTA, "the quota was used");
    assert!(max_pods <= QUOTA);
    assert!(
        full_house,
        "at one moment {QUOTA} Jobs ran and the other {} waited suspended (most suspended seen: {max_suspended})",
        TASKS - QUOTA
    );

    // Give a duplicate a moment to show up, then: one final result each.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut waits = Vec::new();
    for id in &ids {
        let finals = env.finals(*id);
        assert_eq!(finals.len(), 1, "task {id}: {finals:?}");
        let r = &finals[0];
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        assert_eq!(r.attempt, 1, "waiting for admission is not retried: {r:?}");
        let wait = r
            .timings
            .as_ref()
            .and_then(|t| t.admission_wait_ms)
            .unwrap_or_else(|| panic!("task {id} reports no admission wait: {r:?}"));
        waits.push(wait);
    }
    waits.sort_unstable();
    // The six admitted later waited for a running task to finish (a step of
    // STEP_SECS); the first four were admitted at once.
    let waited_long = waits
        .iter()
        .filter(|w| **w >= (STEP_SECS - 1) * 1000)
        .count();
    assert!(
        waited_long >= TASKS - QUOTA,
        "admission waits (ms): {waits:?}"
    );
    assert!(
        waits[0] < (STEP_SECS - 1) * 1000,
        "the first Jobs were admitted at once: {waits:?}"
    );
    assert!(env.dead_letters().is_empty());
    drop(workers);
    env.cleanup().await.unwrap();
}
