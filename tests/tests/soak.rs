//! Chaos soak: 1,000 tasks through two worker processes on kube-sim while one
//! of them is stopped (mostly SIGKILL, sometimes SIGTERM) and restarted every
//! 2.5 s, and the other one's broker connections are cut now and then. A checker over every
//! published task, every result on the results stream, every dead letter and
//! kube-sim's request log asserts: 0 lost, 0 tasks with two different final
//! outcomes, 0 tasks with two Jobs alive at once, and no attempt whose Job
//! was created twice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use sandfleet_e2e::{Env, task};
use sandfleet_kube_sim::PodScript;
use sandfleet_proto::Outcome;

const BIN: &str = env!("CARGO_BIN_EXE_sandfleet-test-worker");
const TASKS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_1000_tasks_two_workers_one_killed_every_few_seconds() {
    let started = Instant::now();
    let env = Env::new("soak", BIN, true, |s| {
        s.worker.concurrency = 16;
        s.worker.drain_timeout_secs = 1;
        s.telemetry.log_filter = "warn".into();
    })
    .await
    .unwrap();
    // Pods finish at once (no process): the soak is about the dispatch
    // machinery, not the sandbox.
    env.kube().sim.script_pods(
        "app.kubernetes.io/managed-by=sandfleet",
        PodScript::Instant { exit_code: 0 },
    );
    let stable = env.spawn_worker("stable", |_| {}).unwrap();
    let mut victim = env.spawn_worker("victim-0", |_| {}).unwrap();
    stable
        .wait_ready(200, Duration::from_secs(30))
        .await
        .unwrap();

    let tasks: Vec<_> = (0..TASKS).map(|i| task(&format!("echo {i}"))).collect();
    // Published in concurrent chunks (pipelined confirms), so the backlog
    // is there before the chaos starts.
    for chunk in tasks.chunks(100) {
        for r in futures::future::join_all(chunk.iter().map(|t| env.publish(t))).await {
            r.unwrap();
        }
    }
    eprintln!("soak: published {TASKS} tasks in {:?}", started.elapsed());
    let done = |e: &Env| {
        let finals: std::collections::HashSet<_> = e
            .results()
            .iter()
            .filter(|r| r.is_final)
            .map(|r| r.task_id)
            .collect();
        finals.len() + e.dead_letters().len()
    };
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(100);
    let (mut terms, mut cuts) = (0, 0);
    while done(&env) < TASKS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        if kills % 3 == 2 {
            // Now and then a graceful stop (drain 1 s, then hand back)...
            victim.term().unwrap();
            let _ = victim.wait_exit(Duration::from_secs(10)).await;
            terms += 1;
        } else {
            victim.kill9().unwrap();
        }
        kills += 1;
        if kills % 4 == 1 {
            // ...and the stable worker's broker connections cut under it.
            cuts += env.close_connections_of(&stable).await.unwrap().min(1);
        }
        victim = env
            .spawn_worker(&format!("victim-{kills}"), |_| {})
            .unwrap();
    }
    // Let the last redeliveries settle before judging.
    env.until("every task accounted for", Duration::from_secs(20), |e| {
        done(e) >= TASKS
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; stable worker log:\n{}", stable.log_tail()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let history = env.history();
    let report = history.check();
    eprintln!(
        "soak: {TASKS} tasks, {kills} stops ({terms} SIGTERM), {cuts} connection cuts, {} results ({} duplicate final deliveries), {} job creates, {} recreated after a crash, {:?} elapsed",
        history.results.len(),
        report.duplicate_final_deliveries,
        history.job_creates.len(),
        report.recreated_jobs.len(),
        started.elapsed()
    );
    assert!(kills >= 3, "the victim was killed repeatedly ({kills})");
    assert_eq!(report.lost, Vec::<uuid::Uuid>::new(), "lost tasks");
    assert!(report.conflicting_finals.is_empty(), "{report:?}");
    assert!(report.concurrent_jobs.is_empty(), "{report:?}");
    // Finished Jobs are deleted only after their delivery is settled, so a
    // redelivery always adopts: no attempt ran twice.
    assert!(report.recreated_jobs.is_empty(), "{report:?}");
    assert_eq!(report.finished, TASKS);
    assert!(
        history
            .results
            .iter()
            .filter(|r| r.is_final)
            .all(|r| r.outcome == Outcome::Succeeded),
        "every task succeeded"
    );
    drop(victim);
    drop(stable);
    env.cleanup().await.unwrap();
}
