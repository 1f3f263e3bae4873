//! `RabbitBroker` against the real RabbitMQ (127.0.0.1:5672, `AMQP_ADDR`
//! overrides): pause holds the queue, retries wait in their delay queue with
//! the attempt header, dead letters carry their reason, releases never spend
//! the delivery budget (a requeueing nack does), a delivery whose
//! connection is cut is reported lost and redelivered, and concurrent acks
//! have all reached the broker when they return.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use sandfleet_amqp::{
    Amqp, Consumer, ConsumerOptions, HEADER_REJECT_CODE, HEADER_REJECT_REASON, OutgoingMessage,
    Publisher, TASK_ROUTING_KEY, Topology,
};
use sandfleet_settings::TopologySettings;
use sandfleet_worker::rabbit::RabbitBroker;
use sandfleet_worker::{Broker, Delivery, RetryMessage};

struct Fixture {
    amqp: Amqp,
    topology: Topology,
    broker: RabbitBroker,
    publisher: Publisher,
    conn_name: String,
}

async fn fixture(name: &str) -> Fixture {
    fixture_with(name, TopologySettings::default().delivery_limit).await
}

async fn fixture_with(name: &str, delivery_limit: u32) -> Fixture {
    let prefix = common::unique_prefix("worker-it", name);
    let conn_name = format!("sandfleet-worker-it-{prefix}");
    let amqp = common::connect(&conn_name, "worker-it").await;
    let topology = Topology::new(&TopologySettings {
        prefix,
        retry_delays_secs: vec![1, 3],
        delivery_limit,
        ..TopologySettings::default()
    });
    topology.apply(&amqp).await.unwrap();
    let publisher = Publisher::new(&amqp).await.unwrap();
    let broker = RabbitBroker::new(amqp.clone(), topology.clone(), publisher.clone(), 4);
    Fixture {
        amqp,
        topology,
        broker,
        publisher,
        conn_name,
    }
}

impl Fixture {
    async fn publish(&self, body: &str) {
        let m = OutgoingMessage::new(
            &self.topology.tasks_exchange,
            TASK_ROUTING_KEY,
            body.as_bytes().to_vec(),
        );
        self.publisher.publish(&m).await.unwrap();
    }

    async fn depth(&self) -> u32 {
        self.amqp
            .queue_depth(&self.topology.tasks_queue)
            .await
            .unwrap()
    }

    async fn cleanup(self) {
        let _ = self.broker.close().await;
        self.topology.delete(&self.amqp).await.unwrap();
        self.amqp.close();
    }
}

async fn next(
    broker: &RabbitBroker,
    within: Duration,
) -> Option<<RabbitBroker as Broker>::Delivery> {
    tokio::time::timeout(within, broker.next_delivery())
        .await
        .ok()
        .map(|d| d.unwrap())
}

#[tokio::test]
async fn pause_leaves_tasks_queued_and_resume_delivers_them() {
    let f = fixture("pause").await;
    f.publish("one").await;
    let d = next(&f.broker, Duration::from_secs(5)).await.unwrap();
    assert_eq!(d.body(), b"one");
    assert_eq!(d.attempt(), 1);
    f.broker.pause().await.unwrap();
    f.publish("two").await;
    f.publish("three").await;
    assert!(next(&f.broker, Duration::from_secs(1)).await.is_none());
    // The in-flight delivery stays ackable while paused.
    d.ack().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(f.depth().await, 2, "paused: both tasks wait in the queue");
    f.broker.resume().await.unwrap();
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let d = next(&f.broker, Duration::from_secs(5)).await.unwrap();
        bodies.push(String::from_utf8(d.body().to_vec()).unwrap());
        d.ack().await.unwrap();
    }
    bodies.sort();
    assert_eq!(bodies, ["three", "two"]);
    f.cleanup().await;
}

#[tokio::test]
async fn a_retry_waits_in_its_delay_queue_and_comes_back_as_the_next_attempt() {
    let f = fixture("retry").await;
    f.publish("task").await;
    let d = next(&f.broker, Duration::from_secs(5)).await.unwrap();
    let sent = Instant::now();
    f.broker
        .publish_retry(RetryMessage {
            task_id: uuid::Uuid::now_v7(),
            body: d.body().to_vec(),
            attempt: 2,
            delay: Duration::from_millis(1500),
            tier: Duration::from_secs(3),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        })
        .await
        .unwrap();
    d.ack().await.unwrap();
    let again = next(&f.broker, Duration::from_secs(10)).await.unwrap();
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_millis(2900),
        "per-message expiration (1.5 s) inside the 3 s tier: {waited:?}"
    );
    assert_eq!(again.body(), b"task");
    assert_eq!(again.attempt(), 2);
    assert!(again.traceparent().unwrap().contains("4bf92f35"));
    again.ack().await.unwrap();
    f.cleanup().await;
}

#[tokio::test]
async fn dead_letters_carry_code_and_reason_and_releases_are_redelivered() {
    let f = fixture("dlq").await;
    // A released copy of a message that had crashed two workers.
    let mut m = OutgoingMessage::new(
        &f.topology.tasks_exchange,
        TASK_ROUTING_KEY,
        b"bad".to_vec(),
    );
    m.headers.insert(
        sandfleet_amqp::HEADER_RETURNS.into(),
        sandfleet_amqp::lapin::types::AMQPValue::LongLongInt(2),
    );
    f.publisher.publish(&m).await.unwrap();
    f.publish("later").await;
    let bad = next(&f.broker, Duration::from_secs(5)).await.unwrap();
    assert_eq!(bad.delivery_count(), 2, "returns carried across releases");
    let later = next(&f.broker, Duration::from_secs(5)).await.unwrap();
    bad.dead_letter("malformed_json", "expected value at line 1 column 1")
        .await
        .unwrap();
    later.release().await.unwrap();
    let again = next(&f.broker, Duration::from_secs(5)).await.unwrap();
    assert_eq!(again.body(), b"later");
    assert_eq!(again.delivery_count(), 0, "a release is a fresh copy");
    again.ack().await.unwrap();

    let mut dlq = Consumer::start(
        &f.amqp,
        ConsumerOptions::new(f.topology.dead_queue.clone(), 10),
    )
    .await
    .unwrap();
    let dead = tokio::time::timeout(Duration::from_secs(5), dlq.next_delivery())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.body(), b"bad");
    assert_eq!(
        dead.header_i64(sandfleet_amqp::HEADER_RETURNS),
        None,
        "a dead letter requeued by an operator starts with a fresh budget"
    );
    assert_eq!(dead.header_str(HEADER_REJECT_CODE), Some("malformed_json"));
    assert_eq!(
        dead.header_str(HEADER_REJECT_REASON),
        Some("expected value at line 1 column 1")
    );
    dead.ack().await.unwrap();
    drop(dlq);
    f.cleanup().await;
}

#[tokio::test]
async fn a_cut_connection_marks_its_deliveries_lost_and_they_come_back() {
    let f = fixture("lost").await;
    f.publish("inflight").await;
    let d = next(&f.broker, Duration::from_secs(5)).await.unwrap();
    let lost = d.lost();
    assert!(!lost.is_cancelled());
    // The management API lists connections after its next stats round.
    let m = f.amqp.management();
    let start = Instant::now();
    while m.close_connections_named(&f.conn_name).await.unwrap() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "connection never listed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::timeout(Duration::from_secs(5), lost.cancelled())
        .await
        .expect("the delivery is reported lost");
    assert!(matches!(
        d.ack().await,
        Err(sandfleet_worker::BrokerError::DeliveryLost
            | sandfleet_worker::BrokerError::Unavailable(_))
    ));
    let again = next(&f.broker, Duration::from_secs(15)).await.unwrap();
    assert_eq!(again.body(), b"inflight");
    assert!(again.redelivered());
    again.ack().await.unwrap();
    f.cleanup().await;
}

#[tokio::test]
async fn concurrent_acks_share_round_trips_and_each_one_has_reached_the_broker() {
    let f = fixture("acks").await;
    for i in 0..4 {
        f.publish(&format!("t{i}")).await;
    }
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(next(&f.broker, Duration::from_secs(5)).await.unwrap());
    }
    // All four settle at once; each `Ok` means the broker has the ack.
    let acks = futures::future::join_all(held.into_iter().map(|d| d.ack()));
    let results = tokio::time::timeout(Duration::from_secs(5), acks)
        .await
        .expect("concurrent acks complete");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    // Then the connection dies: an ack still in a socket buffer would bring
    // its message back now. None does.
    let m = f.amqp.management();
    let start = Instant::now();
    while m.close_connections_named(&f.conn_name).await.unwrap() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "connection never listed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(next(&f.broker, Duration::from_secs(3)).await.is_none());
    assert_eq!(f.depth().await, 0);
    f.cleanup().await;
}

#[tokio::test]
async fn releases_never_spend_the_delivery_budget_but_requeueing_nacks_do() {
    let f = fixture_with("budget", 2).await;
    assert_eq!(f.broker.delivery_limit(), Some(2));
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let m = OutgoingMessage::new(
        &f.topology.tasks_exchange,
        TASK_ROUTING_KEY,
        b"later".to_vec(),
    )
    .message_id("t-1")
    .attempt(3)
    .traceparent(Some(tp));
    f.publisher.publish(&m).await.unwrap();
    // Three times the delivery limit's worth of releases.
    for i in 0..6 {
        let d = next(&f.broker, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("release {i}: the message is gone"));
        assert_eq!(d.body(), b"later");
        assert_eq!((d.attempt(), d.traceparent()), (3, Some(tp)));
        assert_eq!(d.delivery_count(), 0, "release {i}");
        d.release().await.unwrap();
    }
    // The same with a requeueing nack: the quorum queue counts each one and
    // dead-letters the message past the limit (RabbitMQ 3.10 and later).
    f.broker.close().await.unwrap();
    let mut raw = Consumer::start(
        &f.amqp,
        ConsumerOptions::new(f.topology.tasks_queue.clone(), 1),
    )
    .await
    .unwrap();
    let mut counts = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(2), raw.next_delivery()).await
    {
        assert_eq!(d.message_id(), Some("t-1"));
        counts.push(d.delivery_count().unwrap_or(0));
        d.nack(true).await.unwrap();
    }
    // (Closing the broker's consumer may have returned it once already.)
    assert_eq!(counts.last(), Some(&2), "{counts:?}");
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "each requeue counted, then dead-lettered past the limit: {counts:?}"
    );
    assert_eq!(f.depth().await, 0);
    drop(raw);
    f.cleanup().await;
}
