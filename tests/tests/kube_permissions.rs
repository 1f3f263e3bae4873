//! A Role without `create jobs` (the API answers 403) is a fleet problem,
//! not a task's: the worker pauses, `/readyz` names the missing permission,
//! the tasks wait in the queue however often they are handed back (a release
//! never spends the quorum queue's delivery budget), and once the Role is
//! fixed the worker notices by itself and runs every task, first attempt.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sandfleet_e2e::{Env, task};
use sandfleet_kube_sim::{FaultAction, FaultRule};
use sandfleet_proto::Outcome;

const BIN: &str = env!("CARGO_BIN_EXE_sandfleet-test-worker");

const FORBIDDEN: FaultAction = FaultAction::Status {
    code: 403,
    retry_after_secs: None,
};

fn real_creates(env: &Env) -> Vec<u16> {
    env.kube()
        .sim
        .request_log()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/jobs") && !r.query.contains("dryRun"))
        .map(|r| r.status)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_job_creates_pause_the_worker_name_the_permission_and_burn_no_task() {
    const LIMIT: u32 = 2;
    const TASKS: usize = 3;
    let env = Env::new("forbidden", BIN, true, |s| {
        s.topology.delivery_limit = LIMIT;
        // The permission is re-checked every cooldown.
        s.breaker.cooldown_secs = 1;
        s.worker.concurrency = 2;
    })
    .await
    .unwrap();
    let w = env.spawn_worker("w1", |_| {}).unwrap();
    w.wait_ready(200, Duration::from_secs(30)).await.unwrap();

    // The Role loses `create jobs`: every create is refused, dry runs too.
    env.kube()
        .sim
        .faults()
        .inject(FaultRule::new("POST", "/jobs", FORBIDDEN));
    let tasks: Vec<_> = (0..TASKS).map(|i| task(&format!("echo {i}"))).collect();
    for t in &tasks {
        env.publish(t).await.unwrap();
    }
    w.wait_ready(503, Duration::from_secs(20)).await.unwrap();
    let (_, why) = w.get("/readyz").await.unwrap();
    assert!(
        why.contains("permission denied: create jobs.batch in namespace \"sandboxes\""),
        "{why}"
    );
    assert_eq!(
        w.metric("sandfleet_breaker_state").await,
        Some(0.0),
        "a 403 is not an outage: the breaker stays closed"
    );
    // Paused: every task waits in the queue, none is taken again.
    let mut ready = 0;
    for _ in 0..200 {
        ready = env.ready_tasks().await.unwrap();
        if ready == TASKS as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ready,
        TASKS as u64,
        "all tasks back in the queue\n{}",
        w.log_tail()
    );
    let creates_while_paused = real_creates(&env).len();
    // Re-checked with a dry-run create, not by taking tasks.
    env.until("a few dry-run probes", Duration::from_secs(20), |e| {
        e.kube()
            .sim
            .request_log()
            .iter()
            .filter(|r| r.method == "POST" && r.query.contains("dryRun") && r.status == 403)
            .count()
            >= 3
    })
    .await
    .unwrap();
    assert_eq!(real_creates(&env).len(), creates_while_paused);
    assert_eq!(env.ready_tasks().await.unwrap(), TASKS as u64);

    // Worse: a fault that lets the dry-run probe through, so the worker
    // resumes every second, takes tasks, is refused and hands them back.
    // Each task is released many times more than the delivery limit allows
    // returns; none may be dead-lettered.
    let faults = env.kube().sim.faults();
    faults.clear();
    faults.inject(FaultRule::new("POST", "/jobs", FORBIDDEN).unless_query("dryRun"));
    let wanted = f64::from(3 * LIMIT) * TASKS as f64;
    let mut releases = 0.0;
    for _ in 0..600 {
        releases = w
            .metric("sandfleet_task_releases_total")
            .await
            .unwrap_or(0.0);
        if releases >= wanted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        releases >= wanted,
        "only {releases} releases\n{}",
        w.log_tail()
    );
    assert!(
        env.dead_letters().is_empty(),
        "dead-lettered by releases: {:?}",
        env.dead_letters()
            .iter()
            .map(|d| (&d.code, &d.death_reason))
            .collect::<Vec<_>>()
    );
    assert!(
        env.results().iter().all(|r| !r.is_final),
        "nothing given up"
    );

    // The Role is fixed: the worker notices by itself and runs everything.
    faults.clear();
    env.until("every task finished", Duration::from_secs(60), |e| {
        tasks.iter().all(|t| !e.finals(t.id).is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.log_tail()));
    w.wait_ready(200, Duration::from_secs(20)).await.unwrap();
    for t in &tasks {
        let f = env.finals(t.id);
        assert_eq!(
            (f[0].attempt, f[0].outcome),
            (1, Outcome::Succeeded),
            "a release spends no attempt either"
        );
    }
    assert!(env.dead_letters().is_empty());
    let report = env.history().check();
    assert!(report.ok(), "{report:?}");
    eprintln!(
        "forbidden: {releases} releases of {TASKS} tasks (delivery limit {LIMIT}), \
         {} refused creates, 0 dead-lettered",
        real_creates(&env).iter().filter(|s| **s == 403).count()
    );
    drop(w);
    env.cleanup().await.unwrap();
}
