//! At-least-once with task queue shards: tasks of three repositories on
//! `topology.task_shards = 8`, two worker processes (local executor), one of
//! them SIGKILLed every 2–3 s and restarted. Every task ends with exactly one
//! final outcome, none is lost or dead-lettered: a delivery held unacked by a
//! killed worker (running or waiting in its fair-scheduler buffer) goes back
//! to its shard and is run by the other.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use sandfleet_e2e::{Env, WorkerProc, task};
use sandfleet_proto::Outcome;

const BIN: &str = env!("CARGO_BIN_EXE_sandfleet-test-worker");
const TASKS: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_shards_loses_nothing_and_finishes_each_task_once() {
    let env = Env::new("fairkill", BIN, false, |s| {
        s.topology.task_shards = 8;
        s.worker.concurrency = 4;
        s.worker.drain_timeout_secs = 1;
        s.telemetry.log_filter = "warn".into();
    })
    .await
    .unwrap();
    let mut workers: Vec<WorkerProc> = vec![
        env.spawn_worker("w0-0", |_| {}).unwrap(),
        env.spawn_worker("w1-0", |_| {}).unwrap(),
    ];
    for w in &workers {
        w.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    }
    let repos = ["noisy/app", "quiet-a/app", "quiet-b/app"];
    for i in 0..TASKS {
        let mut t = task("sleep 0.5");
        // Most of the backlog is the noisy repository's.
        t.source.repository = repos[if i % 4 == 0 { 1 + (i / 4) % 2 } else { 0 }].into();
        env.publish(&t).await.unwrap();
    }
    let done = |e: &Env| {
        let finals: HashSet<_> = e
            .results()
            .iter()
            .filter(|r| r.is_final)
            .map(|r| r.task_id)
            .collect();
        finals.len() + e.dead_letters().len()
    };
    let mut kills = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while done(&env) < TASKS && tokio::time::Instant::now() < deadline && kills < 6 {
        tokio::time::sleep(Duration::from_millis(2000 + 500 * (kills as u64 % 3))).await;
        let slot = kills % 2;
        workers[slot].kill9().unwrap();
        kills += 1;
        workers[slot] = env
            .spawn_worker(&format!("w{slot}-{kills}"), |_| {})
            .unwrap();
    }
    env.until("every task accounted for", Duration::from_secs(90), |e| {
        done(e) >= TASKS
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}; worker logs:\n{}\n{}",
            workers[0].log_tail(),
            workers[1].log_tail()
        )
    });
    let history = env.history();
    let report = history.check();
    assert!(kills >= 2, "workers were killed ({kills})");
    assert_eq!(report.lost, Vec::<uuid::Uuid>::new(), "lost tasks");
    assert!(report.conflicting_finals.is_empty(), "{report:?}");
    assert!(history.dead.is_empty(), "dead letters: {:?}", history.dead);
    assert_eq!(report.finished, TASKS);
    assert!(
        history
            .results
            .iter()
            .filter(|r| r.is_final)
            .all(|r| r.outcome == Outcome::Succeeded),
        "every task succeeded"
    );
    drop(workers);
    env.cleanup().await.unwrap();
}
