//! Cancellation end to end: real worker processes, the real RabbitMQ and
//! kube-sim. Cancels land on tasks that are queued, prefetched, in a retry
//! delay queue and running, while a worker is SIGKILLed and another starts
//! later; afterwards no pod is left, no attempt started after its cancel was
//! acknowledged, and every task has exactly one final result.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use sandfleet_e2e::{Env, LateCreate, jobs_created_after_cancel, task};
use sandfleet_kube_sim::PodScript;
use sandfleet_proto::{CancelTarget, Outcome, Task, TaskId};

const BIN: &str = env!("CARGO_BIN_EXE_sandfleet-test-worker");

fn pods_of(env: &Env, id: TaskId) -> usize {
    env.pods()
        .iter()
        .filter(|p| {
            p.pointer("/metadata/labels/sandfleet.dev~1task-id")
                .and_then(|v| v.as_str())
                == Some(id.to_string().as_str())
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_anywhere_with_a_worker_killed_leave_no_pods_no_late_starts_and_one_final_each() {
    let env = Env::new("cancel", BIN, true, |s| s.worker.concurrency = 3)
        .await
        .unwrap();
    let mut w1 = env.spawn_worker("w1", |_| {}).unwrap();
    let w2 = env.spawn_worker("w2", |_| {}).unwrap();
    for w in [&w1, &w2] {
        w.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    }
    // 18 tasks for 6 slots: some run, some wait queued or prefetched, and
    // every third is evicted each attempt, so it cycles through the retry
    // delay queues.
    let tasks: Vec<Task> = (0..18)
        .map(|_| {
            let mut t = task("echo started; sleep 40");
            t.retry.max_attempts = 10;
            t
        })
        .collect();
    for t in tasks.iter().step_by(3) {
        env.kube().sim.script_pods(
            &format!("sandfleet.dev/task-id={}", t.id),
            PodScript::Evict {
                after: Duration::from_millis(300),
            },
        );
    }
    for t in &tasks {
        env.publish(t).await.unwrap();
    }
    env.until("sandboxes running", Duration::from_secs(30), |e| {
        tasks.iter().filter(|t| pods_of(e, t.id) > 0).count() >= 4
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w1.log_tail()));

    let mut acked: HashMap<TaskId, SystemTime> = HashMap::new();
    let mut pod_gone_ms = Vec::new();
    let mut w3 = None;
    // A fixed shuffle, so a failure replays the same way.
    let order = [7, 0, 12, 3, 16, 9, 1, 14, 5, 10, 2, 17, 6, 13, 4, 11, 8, 15];
    for (n, i) in order.into_iter().enumerate() {
        if n == 4 {
            w1.kill9().unwrap();
        }
        if n == 8 {
            w3 = Some(env.spawn_worker("w3", |_| {}).unwrap());
        }
        let t = &tasks[i];
        let running = pods_of(&env, t.id) > 0;
        let at = env.cancel(t.id, "e2e", "random cancel").await.unwrap();
        acked.insert(t.id, at);
        if running {
            let asked = Instant::now();
            env.until("the cancelled pod gone", Duration::from_secs(10), |e| {
                pods_of(e, t.id) == 0
            })
            .await
            .unwrap();
            pod_gone_ms.push(asked.elapsed().as_millis() as u64);
        }
    }
    let w3 = w3.unwrap();
    env.until("every task final", Duration::from_secs(40), |e| {
        tasks.iter().all(|t| !e.finals(t.id).is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", w2.log_tail(), w3.log_tail()));
    env.until("no pods left", Duration::from_secs(10), |e| {
        e.pods().is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", env.pods()));

    // A Job created after its cancel was acknowledged is allowed only when
    // the creating worker had not yet read the cancel: it passed its read
    // barrier just before the cancel was confirmed. The cancel then stops it
    // (no pods are left, above). Any other late create is a bug.
    let offsets: HashMap<TaskId, u64> = env
        .cancellations_on_stream()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|(offset, c)| match c.target {
            CancelTarget::Task { task_id } => Some((task_id, offset)),
            _ => None,
        })
        .collect();
    assert_eq!(offsets.len(), tasks.len(), "every cancel is on the stream");
    let late = jobs_created_after_cancel(&env.kube().sim.request_log(), &acked, &offsets);
    let (raced, wrong): (Vec<_>, Vec<_>) = late.into_iter().partition(LateCreate::raced);
    assert!(
        wrong.is_empty(),
        "attempts started after their cancel was read: {wrong:?}"
    );
    if !raced.is_empty() {
        eprintln!("Jobs created while their cancel was being confirmed: {raced:?}");
    }
    let report = env.history().check();
    assert!(report.ok(), "{report:?}");
    for t in &tasks {
        let finals = env.finals(t.id);
        assert!(
            finals.iter().all(|r| r.outcome == Outcome::Cancelled
                && r.cancellation.as_ref().is_some_and(|c| c.by == "e2e")),
            "{finals:#?}"
        );
    }
    assert!(!pod_gone_ms.is_empty(), "no cancel met a running sandbox");
    pod_gone_ms.sort_unstable();
    let worst = *pod_gone_ms.last().unwrap();
    eprintln!("cancel -> pod gone (ms): {pod_gone_ms:?}");
    assert!(worst < 2000, "cancel -> pod gone took {worst} ms");
    drop((w2, w3));
    env.cleanup().await.unwrap();
}
