//! Retries end to end on kube-sim: an evicted sandbox is an infrastructure
//! failure, retried as a new attempt after a backoff and dead-lettered with a
//! final result once `max_attempts` is spent; a failing step is the task's
//! own failure, final on the first attempt.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sandfleet_e2e::{Env, task};
use sandfleet_kube_sim::PodScript;
use sandfleet_proto::Outcome;
use sandfleet_sandbox::job::job_name;

const BIN: &str = env!("CARGO_BIN_EXE_sandfleet-test-worker");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_is_retried_with_backoff_then_dead_lettered_with_a_final_result() {
    let env = Env::new("evict", BIN, true, |s| {
        s.retry.base_delay_secs = 2;
        s.retry.jitter = 0.0;
        s.topology.retry_delays_secs = vec![1, 2, 5];
    })
    .await
    .unwrap();
    let w = env.spawn_worker("w1", |_| {}).unwrap();
    w.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    let mut t = task("sleep 5");
    t.retry.max_attempts = 2;
    env.kube().sim.script_pods(
        &format!("sandfleet.dev/task-id={}", t.id),
        PodScript::Evict {
            after: Duration::from_millis(200),
        },
    );
    env.publish(&t).await.unwrap();
    env.until("the dead letter", Duration::from_secs(60), |e| {
        !e.dead_letters().is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.log_tail()));
    env.until("the final result", Duration::from_secs(10), |e| {
        !e.finals(t.id).is_empty()
    })
    .await
    .unwrap();

    let results: Vec<_> = env
        .results()
        .into_iter()
        .filter(|r| r.task_id == t.id)
        .collect();
    let first = results
        .iter()
        .find(|r| r.attempt == 1)
        .expect("attempt 1 result");
    assert_eq!((first.outcome, first.is_final), (Outcome::Evicted, false));
    let last = results
        .iter()
        .find(|r| r.attempt == 2)
        .expect("attempt 2 result");
    assert_eq!((last.outcome, last.is_final), (Outcome::Evicted, true));
    let why = last.error.as_deref().unwrap();
    assert!(why.contains("gave up after 2 attempts"), "{why}");
    let dead = env.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].task_id, Some(t.id));
    assert_eq!(dead[0].code.as_deref(), Some("max_attempts"));
    // One Job per attempt, the second created only after the backoff.
    assert_eq!(env.job_created(&job_name(t.id, 1)), 1);
    assert_eq!(env.job_created(&job_name(t.id, 2)), 1);
    assert_eq!(env.job_created(&job_name(t.id, 3)), 0);
    let log = env.kube().sim.request_log();
    let created_at = |a: u32| {
        log.iter()
            .find(|r| {
                r.method == "POST"
                    && r.status == 201
                    && r.body.as_ref().and_then(|b| b.pointer("/metadata/name"))
                        == Some(&serde_json::Value::String(job_name(t.id, a)))
            })
            .unwrap()
            .at
    };
    let gap = created_at(2).duration_since(created_at(1)).unwrap();
    assert!(gap >= Duration::from_secs(2), "backoff respected: {gap:?}");
    assert_eq!(w.metric("sandfleet_task_retries_total").await, Some(1.0));
    assert!(env.history().check().ok());
    drop(w);
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_is_final_on_the_first_attempt() {
    let env = Env::new("stepfail", BIN, true, |_| {}).await.unwrap();
    let w = env.spawn_worker("w1", |_| {}).unwrap();
    w.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    let t = task("echo about to fail; exit 3");
    env.publish(&t).await.unwrap();
    env.until("the final result", Duration::from_secs(30), |e| {
        !e.finals(t.id).is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.log_tail()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let results: Vec<_> = env
        .results()
        .into_iter()
        .filter(|r| r.task_id == t.id)
        .collect();
    assert!(results.iter().all(|r| r.attempt == 1 && r.is_final));
    assert_eq!(results[0].outcome, Outcome::Failed);
    assert_eq!(results[0].exit_code, Some(3));
    assert!(results[0].log_tail.contains("about to fail"));
    assert_eq!(env.job_created(&job_name(t.id, 1)), 1);
    assert_eq!(env.job_created(&job_name(t.id, 2)), 0, "no retry");
    assert!(env.dead_letters().is_empty());
    drop(w);
    env.cleanup().await.unwrap();
}
