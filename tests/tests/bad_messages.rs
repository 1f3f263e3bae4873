//! Invalid messages reach the dead-letter queue with a reason, the worker
//! keeps running, and a message that crash-loops workers stops at the
//! queue's delivery limit with a final result saying why. Real RabbitMQ, real
//! worker processes, local executor.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sandfleet_e2e::{Env, task};
use sandfleet_proto::{Limits, Outcome, TaskId};

const BIN: &str = env!("CARGO_BIN_EXE_sandfleet-test-worker");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unknown_version_oversize_and_invalid_are_dead_lettered_with_reasons() {
    let env = Env::new("badmsg", BIN, false, |_| {}).await.unwrap();
    let worker = env.spawn_worker("w1", |_| {}).unwrap();
    worker
        .wait_ready(200, Duration::from_secs(30))
        .await
        .unwrap();

    let id: TaskId = uuid::Uuid::now_v7();
    let mut unknown = serde_json::to_value(task("true")).unwrap();
    unknown["schema_version"] = 7.into();
    unknown["id"] = id.to_string().into();
    let mut invalid = task("true");
    invalid.steps[0].timeout_secs = 0;
    env.publish_raw(b"{\"schema_version\": 1, oops".to_vec())
        .await
        .unwrap();
    env.publish_raw(serde_json::to_vec(&unknown).unwrap())
        .await
        .unwrap();
    env.publish_raw(vec![b'x'; Limits::default().max_message_bytes + 10])
        .await
        .unwrap();
    env.publish_raw(serde_json::to_vec(&invalid).unwrap())
        .await
        .unwrap();
    // A good task after them: the worker survived.
    let good = task("echo fine");
    env.publish(&good).await.unwrap();

    env.until("the good task's result", Duration::from_secs(60), |e| {
        !e.finals(good.id).is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", worker.log_tail()));
    env.until("4 dead letters", Duration::from_secs(30), |e| {
        e.dead_letters().len() == 4
    })
    .await
    .unwrap();

    assert_eq!(env.finals(good.id)[0].outcome, Outcome::Succeeded);
    let mut codes: Vec<String> = env
        .dead_letters()
        .iter()
        .map(|d| d.code.clone().expect("reason code header"))
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            "invalid",
            "malformed_json",
            "oversize",
            "unknown_schema_version"
        ]
    );
    for d in env.dead_letters() {
        let reason = d.reason.expect("reason header");
        assert!(!reason.is_empty());
        if d.code.as_deref() == Some("unknown_schema_version") {
            assert!(reason.contains('7'), "{reason}");
        }
        if d.code.as_deref() == Some("invalid") {
            assert!(reason.contains("steps[0].timeout_secs"), "{reason}");
        }
    }
    // `rejected` results for the two whose id could be read.
    for rid in [id, invalid.id] {
        let f = env.finals(rid);
        assert_eq!(f.len(), 1, "one rejected result for {rid}");
        assert_eq!(f[0].outcome, Outcome::Rejected);
    }
    assert_eq!(
        worker
            .metric("sandfleet_tasks_rejected_total{reason=\"oversize\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(env.ready_tasks().await.unwrap(), 0, "nothing requeued");
    drop(worker);
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_crash_loops_workers_ends_at_the_delivery_limit_with_a_result() {
    let env = Env::new("crashloop", BIN, false, |s| {
        s.topology.delivery_limit = 2;
    })
    .await
    .unwrap();
    // Each delivery runs long enough to be killed mid-run.
    let poison = task("sleep 30");
    env.publish(&poison).await.unwrap();
    let mut kills = 0;
    for round in 0..6 {
        let mut w = env.spawn_worker(&format!("w{round}"), |_| {}).unwrap();
        // Wait until the worker holds the delivery (the queue has none ready).
        let held = async {
            for _ in 0..200 {
                if env.ready_tasks().await.unwrap_or(1) == 0
                    && w.metric("sandfleet_tasks_in_flight").await == Some(1.0)
                {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
        .await;
        if !held {
            break;
        }
        w.kill9().unwrap();
        kills += 1;
        if !env.dead_letters().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !env.dead_letters().is_empty() {
            break;
        }
    }
    env.until(
        "the poison message in the DLQ",
        Duration::from_secs(30),
        |e| !e.dead_letters().is_empty(),
    )
    .await
    .unwrap();
    let dead = env.dead_letters();
    assert_eq!(dead[0].task_id, Some(poison.id));
    // Dead-lettered by the worker that got the last delivery the limit
    // allows, not silently by the broker: with a reason and a final result.
    assert_eq!(dead[0].code.as_deref(), Some("delivery_limit"));
    assert!(
        dead[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("delivered 3 times"),
        "{:?}",
        dead[0].reason
    );
    assert_eq!(kills, 2, "two crashes, then the third delivery ends it");
    env.until("the final result", Duration::from_secs(10), |e| {
        !e.finals(poison.id).is_empty()
    })
    .await
    .unwrap();
    let finals = env.finals(poison.id);
    assert_eq!(finals[0].outcome, Outcome::InfraError);
    assert!(
        finals[0]
            .error
            .as_deref()
            .unwrap_or("")
            .starts_with("delivery_limit: the task was delivered 3 times"),
        "{:?}",
        finals[0].error
    );
    assert_eq!(env.ready_tasks().await.unwrap(), 0);
    env.cleanup().await.unwrap();
}
