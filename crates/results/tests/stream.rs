//! Results against the real RabbitMQ: the round trip task → worker → result,
//! stream offsets, unroutable results.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chrono::Utc;
use sandfleet_amqp::lapin::types::FieldTable;
use sandfleet_amqp::{Amqp, Consumer, ConsumerOptions, PublishError, Topology};
use sandfleet_producer::{EnqueueOptions, Producer};
use sandfleet_proto::{
    Limits, Outcome, Provider, SandboxSpec, Source, Task, TaskResult, decode_task,
};
use sandfleet_results::{
    Received, ResultPublisher, ResultSubscriber, ResultsError, StartAt, Subscription,
};
use sandfleet_settings::{AmqpSettings, TopologySettings};

fn url() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn settings(prefix: &str) -> AmqpSettings {
    AmqpSettings {
        url: url(),
        connection_name: Some(format!("{prefix}-conn")),
        connect_timeout_secs: 5,
        ..Default::default()
    }
}

struct Env {
    amqp: Amqp,
    topology: Topology,
    prefix: String,
}

impl Drop for Env {
    fn drop(&mut self) {
        let (t, s) = (self.topology.clone(), settings(&self.prefix));
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(a) = Amqp::connect(&s, "cleanup").await {
                    let _ = t.delete(&a).await;
                }
            })
        })
        .join();
    }
}

async fn env(test: &str) -> Env {
    let prefix = format!(
        "sftest-res-{test}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let amqp = match Amqp::connect(&settings(&prefix), "test").await {
        Ok(a) => a,
        Err(e) => panic!(
            "RabbitMQ is not reachable at {} ({e}); these tests need it and never skip",
            url()
        ),
    };
    let topology = Topology::new(&TopologySettings {
        prefix: prefix.clone(),
        results_max_age: "1h".into(),
        ..Default::default()
    });
    topology.apply(&amqp).await.unwrap();
    Env {
        amqp,
        topology,
        prefix,
    }
}

fn result(n: u32, outcome: Outcome) -> TaskResult {
    TaskResult {
        schema_version: 1,
        task_id: uuid::Uuid::now_v7(),
        attempt: n,
        outcome,
        is_final: true,
        exit_code: Some(0),
        steps: vec![],
        log_tail: format!("result {n}"),
        log_truncated: false,
        artifacts: vec![],
        started_at: None,
        finished_at: Utc::now(),
        worker: "test-worker".into(),
        sandbox: None,
        error: None,
        source: None,
        labels: Default::default(),
        task: None,
        cancellation: None,
        timings: None,
    }
}

async fn next(s: &mut Subscription) -> Received {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("no result in time")
        .expect("subscription ended")
        .unwrap()
}

async fn nothing_more(s: &mut Subscription) {
    if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(1500), s.next()).await {
        panic!(
            "unexpected extra result: {:?}",
            r.map(|r| r.result.log_tail)
        );
    }
}

#[tokio::test]
async fn task_and_result_round_trip_through_the_broker() {
    let e = env("roundtrip").await;
    let producer = Producer::with_amqp(&e.amqp, e.topology.clone(), Limits::default(), false)
        .await
        .unwrap();
    let source = Source {
        provider: Provider::Api,
        repository: "acme/widgets".into(),
        commit: "4f2a9c1e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a39".into(),
        git_ref: None,
        ci_run_id: None,
        pull_request: None,
        url: None,
    };
    let sandbox = SandboxSpec {
        image: "docker.io/library/alpine:3.20".into(),
        resources: Default::default(),
        env: Default::default(),
        deadline_secs: 60,
        pending_timeout_secs: 60,
    };
    let task = Task::fix_attempt(source, sandbox).with_step("test", "true", 30);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let since = Utc::now();
    let mut results = ResultSubscriber::new(&e.amqp, &e.topology)
        .subscribe(StartAt::Timestamp(since))
        .await
        .unwrap();
    producer
        .enqueue_with(
            &task,
            &EnqueueOptions {
                traceparent: Some(tp.into()),
            },
        )
        .await
        .unwrap();

    // A "worker": take the task, publish its result (confirmed), then ack.
    let mut tasks = Consumer::start(&e.amqp, ConsumerOptions::new(&e.topology.tasks_queue, 1))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), tasks.next_delivery())
        .await
        .unwrap()
        .unwrap();
    let got = decode_task(d.body(), &Limits::default()).unwrap();
    assert_eq!(got, task);
    let res = TaskResult::from_task(
        &got,
        d.attempt().unwrap(),
        Outcome::Succeeded,
        "test-worker",
    );
    let publisher = ResultPublisher::new(&e.amqp, &e.topology).await.unwrap();
    publisher.publish(&res, d.traceparent()).await.unwrap();
    d.ack().await.unwrap();

    let r = next(&mut results).await;
    assert_eq!(r.result.task_id, task.id);
    assert_eq!(r.result.attempt, 1);
    assert_eq!(r.result.outcome, Outcome::Succeeded);
    assert_eq!(
        r.traceparent.as_deref(),
        Some(tp),
        "trace context travels task → result"
    );
    assert!(r.published_at.unwrap() >= since);
    assert_eq!(
        e.amqp.queue_depth(&e.topology.tasks_queue).await.unwrap(),
        0
    );
}

#[tokio::test]
async fn subscriber_from_a_timestamp_sees_exactly_the_later_results() {
    let e = env("since").await;
    let publisher = ResultPublisher::new(&e.amqp, &e.topology).await.unwrap();
    for n in [1, 2] {
        publisher
            .publish(&result(n, Outcome::Succeeded), None)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let since = Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for n in [3, 4] {
        publisher
            .publish(&result(n, Outcome::Succeeded), None)
            .await
            .unwrap();
    }
    let mut s = ResultSubscriber::new(&e.amqp, &e.topology)
        .subscribe(StartAt::Timestamp(since))
        .await
        .unwrap();
    assert_eq!(next(&mut s).await.result.attempt, 3);
    assert_eq!(next(&mut s).await.result.attempt, 4);
    nothing_more(&mut s).await;

    // From the first retained result: all four, in order.
    let mut all = ResultSubscriber::new(&e.amqp, &e.topology)
        .subscribe(StartAt::First)
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let r = next(&mut all).await;
        seen.push((r.result.attempt, r.offset.is_some()));
    }
    assert_eq!(seen, vec![(1, true), (2, true), (3, true), (4, true)]);
}

#[tokio::test]
async fn next_sees_only_new_results_and_dedup_drops_republishes() {
    let e = env("next").await;
    let publisher = ResultPublisher::new(&e.amqp, &e.topology).await.unwrap();
    publisher
        .publish(&result(1, Outcome::Succeeded), None)
        .await
        .unwrap();
    let s = ResultSubscriber::new(&e.amqp, &e.topology)
        .subscribe(StartAt::Next)
        .await
        .unwrap();
    // Give the stream consumer a moment to attach before publishing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let twice = result(2, Outcome::Succeeded);
    publisher.publish(&twice, None).await.unwrap();
    publisher.publish(&twice, None).await.unwrap(); // at-least-once: a republish
    publisher
        .publish(&result(3, Outcome::Succeeded), None)
        .await
        .unwrap();
    let mut deduped = Box::pin(s.deduplicated(100));
    use futures::StreamExt;
    let a = tokio::time::timeout(Duration::from_secs(10), deduped.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let b = tokio::time::timeout(Duration::from_secs(10), deduped.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((a.result.attempt, b.result.attempt), (2, 3));
}

#[tokio::test]
async fn results_are_routed_by_outcome_and_finality() {
    let e = env("routing").await;
    // A consumer's own queue for final failures only.
    let ch = e.amqp.channel().await.unwrap();
    let q = format!("{}.failures", e.prefix);
    ch.queue_declare(q.as_str().into(), Default::default(), FieldTable::default())
        .await
        .unwrap();
    ch.queue_bind(
        q.as_str().into(),
        e.topology.results_exchange.as_str().into(),
        "failed.final".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let publisher = ResultPublisher::new(&e.amqp, &e.topology).await.unwrap();
    publisher
        .publish(&result(1, Outcome::Succeeded), None)
        .await
        .unwrap();
    let mut failed = result(2, Outcome::Failed);
    failed.exit_code = Some(1);
    publisher.publish(&failed, None).await.unwrap();
    let mut retrying = result(3, Outcome::Failed);
    retrying.is_final = false;
    publisher.publish(&retrying, None).await.unwrap();
    assert_eq!(e.amqp.queue_depth(&q).await.unwrap(), 1);
    ch.queue_delete(q.as_str().into(), Default::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unroutable_result_is_an_error() {
    let e = env("unroutable").await;
    let ch = e.amqp.channel().await.unwrap();
    ch.queue_unbind(
        e.topology.results_stream.as_str().into(),
        e.topology.results_exchange.as_str().into(),
        "#".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let publisher = ResultPublisher::new(&e.amqp, &e.topology).await.unwrap();
    let err = publisher
        .publish(&result(1, Outcome::Succeeded), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ResultsError::Publish(PublishError::Returned { .. })),
        "{err:?}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn subscription_resumes_after_its_last_offset_when_the_connection_drops() {
    let e = env("resume").await;
    let publisher = ResultPublisher::new(&e.amqp, &e.topology).await.unwrap();
    for n in [1, 2] {
        publisher
            .publish(&result(n, Outcome::Succeeded), None)
            .await
            .unwrap();
    }
    let mut s = ResultSubscriber::new(&e.amqp, &e.topology)
        .subscribe(StartAt::First)
        .await
        .unwrap();
    assert_eq!(next(&mut s).await.result.attempt, 1);
    assert_eq!(next(&mut s).await.result.attempt, 2);

    // Drop the subscriber's (consuming) connection; the publisher's stays.
    let mgmt = e.amqp.management();
    let consuming = format!("{}-conn#c", e.prefix);
    let mut closed = 0;
    for _ in 0..200 {
        closed = mgmt.close_connections_named(&consuming).await.unwrap();
        if closed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed > 0, "the subscriber's connection never showed up");
    publisher
        .publish(&result(3, Outcome::Succeeded), None)
        .await
        .unwrap();

    // It resubscribes after offset of result 2: no replay of 1 and 2.
    assert_eq!(next(&mut s).await.result.attempt, 3);
    nothing_more(&mut s).await;
    assert!(s.is_connected());
}
