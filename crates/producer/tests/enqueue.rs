//! The producer against the real RabbitMQ (127.0.0.1:5672).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use sandfleet_amqp::testing::{HoldingProxy, settled_depth};
use sandfleet_amqp::{Amqp, Consumer, ConsumerOptions, Topology};
use sandfleet_producer::{EnqueueError, EnqueueOptions, Producer};
use sandfleet_proto::{Limits, Provider, SandboxSpec, Source, Task, decode_task};
use sandfleet_settings::{AmqpSettings, TopologySettings};

fn url() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn unique(test: &str) -> String {
    format!(
        "sftest-prod-{test}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

fn amqp_settings(prefix: &str) -> AmqpSettings {
    AmqpSettings {
        url: url(),
        connection_name: Some(format!("{prefix}-conn")),
        connect_timeout_secs: 5,
        reconnect_max_delay_secs: 2,
        ..AmqpSettings::default()
    }
}

fn topology_settings(prefix: &str) -> TopologySettings {
    TopologySettings {
        prefix: prefix.into(),
        retry_delays_secs: vec![1],
        results_max_age: "1h".into(),
        ..Default::default()
    }
}

struct Cleanup(Topology, AmqpSettings);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let (t, s) = (self.0.clone(), self.1.clone());
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

async fn producer(prefix: &str) -> (Producer, Cleanup) {
    let p = match Producer::connect(
        &amqp_settings(prefix),
        &topology_settings(prefix),
        Limits::default(),
    )
    .await
    {
        Ok(p) => p,
        Err(e) => panic!(
            "RabbitMQ is not reachable at {} ({e}); these tests need it and never skip",
            url()
        ),
    };
    let c = Cleanup(p.topology().clone(), amqp_settings(prefix));
    (p, c)
}

fn task(n: usize) -> Task {
    let source = Source {
        provider: Provider::Api,
        repository: "acme/widgets".into(),
        commit: "4f2a9c1e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a39".into(),
        git_ref: None,
        ci_run_id: Some(format!("run-{n}")),
        pull_request: None,
        url: None,
    };
    let sandbox = SandboxSpec {
        image: "docker.io/library/node:20-alpine".into(),
        resources: Default::default(),
        env: Default::default(),
        deadline_secs: 900,
        pending_timeout_secs: 300,
    };
    Task::fix_attempt(source, sandbox).with_step("test", "npm test", 600)
}

async fn drain(amqp: &Amqp, queue: &str) -> Vec<sandfleet_amqp::Delivery> {
    let mut c = Consumer::start(amqp, ConsumerOptions::new(queue, 500))
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(2), c.next_delivery()).await {
        d.ack().await.unwrap();
        out.push(d);
    }
    out
}

#[tokio::test]
async fn enqueued_task_arrives_intact_with_its_headers() {
    let prefix = unique("intact");
    let (producer, _c) = producer(&prefix).await;
    let t = task(1);
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let receipt = producer
        .enqueue_with(
            &t,
            &EnqueueOptions {
                traceparent: Some(tp.into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(receipt.task_id, t.id);
    let got = drain(producer.amqp(), &producer.topology().tasks_queue).await;
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(decode_task(d.body(), &Limits::default()).unwrap(), t);
    assert_eq!(d.message_id(), Some(t.id.to_string().as_str()));
    assert_eq!(d.attempt(), Some(1));
    assert_eq!(d.idempotency_key(), Some(t.idempotency_key.as_str()));
    assert_eq!(d.traceparent(), Some(tp));
    assert_eq!(
        d.properties().kind().as_ref().unwrap().as_str(),
        sandfleet_proto::TASK_MESSAGE_TYPE
    );
}

#[tokio::test]
async fn invalid_task_is_refused_before_publishing() {
    let prefix = unique("invalid");
    let (producer, _c) = producer(&prefix).await;
    let mut bad = task(1);
    bad.steps[0].timeout_secs = 0;
    bad.source.commit = "not-a-sha".into();
    let err = producer.enqueue(&bad).await.unwrap_err();
    match &err {
        EnqueueError::Invalid(errors) => {
            assert!(errors.has("steps[0].timeout_secs"), "{errors}");
            assert!(errors.has("source.commit"), "{errors}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(!err.is_transient());
    assert_eq!(
        producer
            .amqp()
            .queue_depth(&producer.topology().tasks_queue)
            .await
            .unwrap(),
        0
    );
}

/// A task no worker would run (deadline + pending timeout over the
/// consumer-timeout budget in `Limits`) is refused by the library with the
/// worker's own reason; `check` says the same without publishing.
#[tokio::test]
async fn a_deadline_no_worker_would_run_is_refused_with_the_workers_reason() {
    let prefix = unique("budget");
    let (producer, _c) = producer(&prefix).await;
    let mut long = task(1);
    long.sandbox.deadline_secs = 1600; // + 300 s > 1800 s - 60 s
    let reason = sandfleet_proto::check_consumer_timeout(
        &long,
        Duration::from_secs(Limits::default().broker_consumer_timeout_secs),
    )
    .unwrap_err()
    .to_string();
    for err in [
        producer.check(&long).unwrap_err(),
        producer.enqueue(&long).await.unwrap_err(),
    ] {
        match &err {
            EnqueueError::Invalid(errors) => {
                let e = &errors.errors()[0];
                assert_eq!(e.path, "sandbox.deadline_secs");
                assert_eq!(e.rule, sandfleet_proto::DEADLINE_TOO_LONG_CODE);
                assert_eq!(e.message, reason);
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }
    let report = producer.enqueue_batch(vec![long.clone(), task(2)]).await;
    assert_eq!(report.accepted().count(), 1);
    assert_eq!(report.failed().next().map(|(id, _)| id), Some(long.id));
    let got = drain(producer.amqp(), &producer.topology().tasks_queue).await;
    assert_eq!(got.len(), 1, "only the task that fits was published");
    producer.check(&task(3)).unwrap();
}

#[tokio::test]
async fn batch_reports_each_task_and_publishes_the_valid_ones() {
    let prefix = unique("batch");
    let (producer, _c) = producer(&prefix).await;
    let mut tasks: Vec<Task> = (0..300).map(task).collect();
    tasks[17].steps.clear(); // invalid: no steps
    let ids: Vec<_> = tasks.iter().map(|t| t.id).collect();
    let report = producer.enqueue_batch(tasks).await;
    assert_eq!(report.outcomes.len(), 300);
    assert_eq!(
        report
            .outcomes
            .iter()
            .map(|(id, _)| *id)
            .collect::<Vec<_>>(),
        ids,
        "input order kept"
    );
    let failed: Vec<_> = report.failed().collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, ids[17]);
    assert!(matches!(failed[0].1, EnqueueError::Invalid(_)));
    assert!(report.retryable().is_empty());
    assert_eq!(report.accepted().count(), 299);
    assert_eq!(
        producer
            .amqp()
            .queue_depth(&producer.topology().tasks_queue)
            .await
            .unwrap(),
        299
    );
}

#[tokio::test]
async fn connection_closed_mid_batch_loses_no_confirmed_task_and_reports_the_rest() {
    let prefix = unique("midbatch");
    // The producer reaches the broker through a proxy that holds its bytes
    // once ~300 tasks' worth went through: the batch cannot finish before
    // the broker closes the connection, however fast the broker is.
    let task_bytes = serde_json::to_vec(&task(0)).unwrap().len() as u64;
    let (proxy, through) = HoldingProxy::for_url(&url(), 64 * 1024 + 300 * task_bytes)
        .await
        .unwrap();
    let settings = AmqpSettings {
        url: through,
        ..amqp_settings(&prefix)
    };
    let producer = Producer::connect(&settings, &topology_settings(&prefix), Limits::default())
        .await
        .unwrap();
    let _c = Cleanup(producer.topology().clone(), amqp_settings(&prefix));
    let mgmt = producer.amqp().management();
    let conn = format!("{prefix}-conn");
    // The management API lists new connections with a delay.
    for _ in 0..200 {
        if !mgmt.connections_named(&conn).await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Read straight from the broker, past the proxy.
    let reader = Amqp::connect(&amqp_settings(&format!("{prefix}-reader")), "reader")
        .await
        .unwrap();
    let tasks: Vec<Task> = (0..5_000).map(task).collect();
    let killer = async {
        proxy.holding().await;
        // What went through before the hold is confirmed before the close.
        let depth = settled_depth(&reader, &producer.topology().tasks_queue).await;
        let closed = mgmt.close_connections_named(&conn).await.unwrap();
        proxy.release();
        (closed, depth)
    };
    let (report, (closed, depth_at_close)) = tokio::join!(producer.enqueue_batch(tasks), killer);
    assert!(closed >= 1);
    assert!(depth_at_close > 0, "tasks went through before the hold");
    assert_eq!(report.outcomes.len(), 5_000);
    let confirmed: HashSet<String> = report.accepted().map(|r| r.task_id.to_string()).collect();
    let failed: Vec<_> = report.failed().collect();
    assert!(!confirmed.is_empty(), "tasks before the hold are confirmed");
    assert!(
        !failed.is_empty(),
        "the closed connection must surface as failures"
    );
    assert!(
        failed.iter().all(|(_, e)| e.is_transient()),
        "{:?}",
        failed[0]
    );
    assert_eq!(report.retryable().len(), failed.len());

    let in_queue: HashSet<String> = drain(&reader, &producer.topology().tasks_queue)
        .await
        .iter()
        .map(|d| d.message_id().unwrap().to_owned())
        .collect();
    let lost = confirmed.difference(&in_queue).count();
    assert_eq!(lost, 0, "confirmed tasks missing from the queue");
}

/// Reads every cancellation on the stream until `n` arrived (bounded).
async fn cancellations(amqp: &Amqp, t: &Topology, n: usize) -> Vec<sandfleet_proto::Cancellation> {
    let opts = ConsumerOptions::new(&t.cancellations_stream, 100)
        .stream_offset(sandfleet_amqp::StreamOffset::First);
    let mut c = Consumer::start(amqp, opts).await.unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(10), c.next_delivery())
            .await
            .expect("cancellation within 10 s")
            .unwrap();
        d.ack().await.unwrap();
        out.push(serde_json::from_slice(d.body()).unwrap());
    }
    out
}

#[tokio::test]
async fn cancel_records_once_and_says_when_the_task_already_finished() {
    use sandfleet_producer::CancelStatus;
    use sandfleet_proto::{CancelTarget, Outcome, TaskResult};
    let prefix = unique("cancel");
    let (p, _c) = producer(&prefix).await;
    let queued = task(1);
    p.enqueue(&queued).await.unwrap();
    let status = p.cancel(queued.id, "ops", "runaway batch").await.unwrap();
    let CancelStatus::Recorded { cancel_id } = status else {
        panic!("{status:?}")
    };
    // A task with a final result on the results stream is not cancelled.
    let done = task(2);
    let mut result = TaskResult::from_task(&done, 1, Outcome::Succeeded, "w");
    result.is_final = true;
    let publisher = sandfleet_amqp::Publisher::new(p.amqp()).await.unwrap();
    publisher
        .publish(
            &sandfleet_amqp::OutgoingMessage::new(
                &p.topology().results_exchange,
                "succeeded.final",
                serde_json::to_vec(&result).unwrap(),
            )
            .message_id(format!("{}:1", done.id)),
        )
        .await
        .unwrap();
    assert_eq!(
        p.cancel(done.id, "ops", "too late").await.unwrap(),
        CancelStatus::AlreadyFinished {
            outcome: Outcome::Succeeded
        }
    );
    // An id that cannot be a task (not UUIDv7) is unknown.
    let err = p
        .cancel(uuid::Uuid::new_v4(), "ops", "typo")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown task"), "{err}");
    // A supersede follows its task.
    let mut newer = task(3);
    newer.supersede_key = Some("github:acme/widgets:ref:main".into());
    p.enqueue_superseding(&newer).await.unwrap();
    let recorded = cancellations(p.amqp(), p.topology(), 2).await;
    assert_eq!(recorded[0].id, cancel_id);
    assert_eq!(
        recorded[0].target,
        CancelTarget::Task { task_id: queued.id }
    );
    assert_eq!(
        (recorded[0].by.as_str(), recorded[0].reason.as_str()),
        ("ops", "runaway batch")
    );
    assert!(matches!(
        &recorded[1].target,
        CancelTarget::Supersede { superseded_by, .. } if *superseded_by == newer.id
    ));
}
