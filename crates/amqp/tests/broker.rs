//! Integration tests against the real RabbitMQ (127.0.0.1:5672, management on
//! 15672). Every test uses its own prefix and deletes its objects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use sandfleet_amqp::Amqp;
use sandfleet_amqp::testing::{HoldingProxy, settled_depth};
use sandfleet_amqp::{
    Consumer, ConsumerOptions, Finding, HEADER_REJECT_CODE, HEADER_REJECT_REASON, ObjectKind,
    OutgoingMessage, PublishError, Publisher, TASK_ROUTING_KEY, Topology, TopologyError,
};

fn task_message(t: &Topology, id: &str) -> OutgoingMessage {
    OutgoingMessage::new(
        &t.tasks_exchange,
        TASK_ROUTING_KEY,
        format!("{{\"id\":\"{id}\"}}").into_bytes(),
    )
    .message_id(id)
    .kind("sandfleet.task.v1")
    .content_type("application/json")
    .correlation_id(format!("corr-{id}"))
    .attempt(1)
    .idempotency_key(format!("idem-{id}"))
    .traceparent(Some(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ))
}

#[tokio::test]
async fn topology_apply_is_idempotent_and_check_passes() {
    let p = unique("topo");
    let amqp = connect(&p).await;
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    // Re-applying is a no-op.
    t.apply(&amqp).await.unwrap();
    let report = t.check(&amqp).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.findings);
    assert!(report.fully_verified(), "{:?}", report.findings);
    // The queue really is a quorum queue with the declared arguments.
    let q = amqp
        .management()
        .queue(&t.tasks_queue)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(q.kind, "quorum");
    assert_eq!(q.arguments["x-dead-letter-strategy"], "at-least-once");
    let s = amqp
        .management()
        .queue(&t.results_stream)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.kind, "stream");
}

#[tokio::test]
async fn conflicting_declaration_names_the_argument_and_how_to_migrate() {
    let p = unique("conflict");
    let amqp = connect(&p).await;
    let (_t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let changed = Topology::new(&sandfleet_settings::TopologySettings {
        delivery_limit: 5,
        ..topology_settings(&p)
    });
    let err = changed.apply(&amqp).await.unwrap_err();
    let text = err.to_string();
    match &err {
        TopologyError::Conflict {
            kind,
            name,
            differences,
            ..
        } => {
            assert_eq!(*kind, ObjectKind::Queue);
            assert_eq!(name, &format!("{p}.tasks"));
            assert_eq!(
                differences,
                &vec![(
                    "x-delivery-limit".to_owned(),
                    "5".to_owned(),
                    "20".to_owned()
                )]
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(!err.is_transient());
    assert!(
        text.contains("x-delivery-limit is 20 on the broker, sandfleet expects 5"),
        "{text}"
    );
    assert!(text.contains("delete_queue"), "{text}");
    assert!(text.contains("PRECONDITION_FAILED"), "{text}");
    // check reports the same difference without touching anything.
    let report = changed.check(&amqp).await.unwrap();
    assert!(!report.is_ok());
    assert!(
        report.findings.iter().any(|f| matches!(f,
        Finding::Different { argument, expected, actual, .. }
            if argument == "x-delivery-limit" && expected == "5" && actual == "20")),
        "{:?}",
        report.findings
    );
    // The handle still works after the 406 (the channel was closed, not the pool).
    assert!(amqp.queue_depth(&format!("{p}.tasks")).await.is_ok());
}

#[tokio::test]
async fn check_reports_what_is_missing() {
    let p = unique("missing");
    let amqp = connect(&p).await;
    let t = Topology::new(&topology_settings(&p));
    let report = t.check(&amqp).await.unwrap();
    let missing: Vec<_> = report
        .findings
        .iter()
        .filter_map(|f| match f {
            Finding::Missing {
                kind: ObjectKind::Queue,
                name,
            } => Some(name.clone()),
            _ => None,
        })
        .collect();
    assert!(missing.contains(&format!("{p}.tasks")), "{missing:?}");
    assert!(
        missing.contains(&format!("{p}.results.stream")),
        "{missing:?}"
    );
}

#[tokio::test]
async fn publish_consume_round_trip_keeps_properties_and_headers() {
    let p = unique("roundtrip");
    let amqp = connect(&p).await;
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let publisher = Publisher::new(&amqp).await.unwrap();
    publisher
        .publish(&task_message(&t, "task-1"))
        .await
        .unwrap();
    assert_eq!(amqp.queue_depth(&t.tasks_queue).await.unwrap(), 1);

    let mut consumer = Consumer::start(&amqp, ConsumerOptions::new(&t.tasks_queue, 4))
        .await
        .unwrap();
    let d = next(&mut consumer, Duration::from_secs(5)).await;
    assert_eq!(d.body(), b"{\"id\":\"task-1\"}");
    assert_eq!(d.message_id(), Some("task-1"));
    assert_eq!(d.attempt(), Some(1));
    assert_eq!(d.idempotency_key(), Some("idem-task-1"));
    assert!(d.traceparent().unwrap().starts_with("00-0af7"));
    assert!(!d.redelivered());
    let props = d.properties();
    assert_eq!(props.kind().as_ref().unwrap().as_str(), "sandfleet.task.v1");
    assert_eq!(
        props.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(
        props.correlation_id().as_ref().unwrap().as_str(),
        "corr-task-1"
    );
    assert_eq!(*props.delivery_mode(), Some(2));
    assert!(props.timestamp().is_some());
    d.ack().await.unwrap();
    // Acked: nothing left, nothing redelivered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(amqp.queue_depth(&t.tasks_queue).await.unwrap(), 0);
}

#[tokio::test]
async fn unroutable_message_is_an_error_not_a_silent_success() {
    let p = unique("return");
    let amqp = connect(&p).await;
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let publisher = Publisher::new(&amqp).await.unwrap();
    let lost =
        OutgoingMessage::new(&t.tasks_exchange, "no-such-key", b"x".to_vec()).message_id("lost");
    let err = publisher.publish(&lost).await.unwrap_err();
    match &err {
        PublishError::Returned {
            message_id,
            reply_code,
            ..
        } => {
            assert_eq!(message_id.as_deref(), Some("lost"));
            assert_eq!(*reply_code, 312);
        }
        other => panic!("expected Returned, got {other:?}"),
    }
    assert!(!err.is_transient());
    assert!(err.surely_not_enqueued());
}

#[tokio::test]
async fn returns_in_a_pipelined_batch_are_attributed_to_the_right_messages() {
    let p = unique("batchret");
    let amqp = connect(&p).await;
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let publisher = Publisher::new(&amqp).await.unwrap();
    let messages: Vec<OutgoingMessage> = (0..2000)
        .map(|i| {
            let key = if i % 7 == 3 {
                "nowhere"
            } else {
                TASK_ROUTING_KEY
            };
            OutgoingMessage::new(&t.tasks_exchange, key, vec![b'x'; 64]).message_id(format!("m{i}"))
        })
        .collect();
    let results = publisher.publish_all(&messages).await;
    for (i, r) in results.iter().enumerate() {
        if i % 7 == 3 {
            assert!(
                matches!(r, Err(PublishError::Returned { message_id: Some(id), .. }) if *id == format!("m{i}")),
                "m{i}: {r:?}"
            );
        } else {
            assert!(r.is_ok(), "m{i}: {r:?}");
        }
    }
    let routed = messages.len() - (0..2000).filter(|i| i % 7 == 3).count();
    assert_eq!(
        amqp.queue_depth(&t.tasks_queue).await.unwrap() as usize,
        routed
    );
}

#[tokio::test]
async fn reject_publish_overflow_is_a_nack() {
    let p = unique("overflow");
    let amqp = connect(&p).await;
    let ts = sandfleet_settings::TopologySettings {
        tasks_max_length: 2,
        ..topology_settings(&p)
    };
    let (t, _cleanup) = applied(&amqp, &p, ts).await;
    let publisher = Publisher::new(&amqp).await.unwrap();
    let mut outcomes = Vec::new();
    for id in ["a", "b", "c", "d", "e"] {
        outcomes.push(publisher.publish(&task_message(&t, id)).await);
    }
    // A quorum queue on 3.10 checks the limit before appending, so it may
    // hold one message beyond x-max-length; every publish after that is nacked.
    let accepted = outcomes.iter().take_while(|r| r.is_ok()).count();
    assert!((2..=3).contains(&accepted), "{outcomes:?}");
    for (r, id) in outcomes
        .iter()
        .zip(["a", "b", "c", "d", "e"])
        .skip(accepted)
    {
        assert!(
            matches!(r, Err(PublishError::Nacked { message_id: Some(m) }) if m == id),
            "{id}: {r:?}"
        );
        assert!(r.as_ref().unwrap_err().is_transient());
    }
    assert_eq!(
        amqp.queue_depth(&t.tasks_queue).await.unwrap() as usize,
        accepted
    );
}

#[tokio::test]
async fn connection_closed_mid_batch_loses_no_confirmed_message_and_reports_the_rest() {
    let p = unique("midbatch");
    // The publisher reaches the broker through a proxy that holds its bytes
    // once ~500 messages went through: the batch cannot finish before the
    // broker closes the connection, however fast the broker is.
    let message_bytes = 400;
    let (proxy, through) = HoldingProxy::for_url(&url(), 64 * 1024 + 500 * message_bytes)
        .await
        .unwrap();
    let amqp = Amqp::connect(
        &sandfleet_settings::AmqpSettings {
            url: through,
            ..settings(&p)
        },
        "test",
    )
    .await
    .unwrap();
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let publisher = Publisher::new(&amqp).await.unwrap();
    wait_visible(&amqp, &format!("{p}-conn")).await;
    // Read straight from the broker, past the proxy.
    let direct = connect(&format!("{p}-direct")).await;
    let messages: Vec<OutgoingMessage> = (0..10_000)
        .map(|i| task_message(&t, &format!("m{i}")))
        .collect();
    let mgmt = direct.management();
    let conn_prefix = format!("{p}-conn");
    let killer = async {
        proxy.holding().await;
        // What went through before the hold is confirmed before the close.
        settled_depth(&direct, &t.tasks_queue).await;
        let closed = mgmt.close_connections_named(&conn_prefix).await.unwrap();
        proxy.release();
        closed
    };
    let (results, closed) = tokio::join!(publisher.publish_all(&messages), killer);
    assert!(closed >= 1);

    let confirmed: HashSet<String> = results
        .iter()
        .zip(&messages)
        .filter(|(r, _)| r.is_ok())
        .map(|(_, m)| m.message_id.clone().unwrap())
        .collect();
    let failed: Vec<&PublishError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(
        confirmed.len() + failed.len(),
        messages.len(),
        "every message has a fate"
    );
    assert!(
        !failed.is_empty(),
        "closing the connection mid-batch must surface unconfirmed messages"
    );
    assert!(
        failed.iter().all(|e| e.is_transient()),
        "{:?}",
        failed.first()
    );
    assert!(
        failed
            .iter()
            .any(|e| matches!(e, PublishError::Unconfirmed { .. }))
    );
    assert!(!confirmed.is_empty());

    // Every confirmed message is in the queue.
    let fresh = connect(&format!("{p}-reader")).await;
    let got: HashSet<String> = drain(&fresh, &t.tasks_queue, Duration::from_secs(3))
        .await
        .iter()
        .map(|d| d.message_id().unwrap().to_owned())
        .collect();
    let lost: Vec<_> = confirmed.difference(&got).collect();
    assert!(
        lost.is_empty(),
        "{} confirmed messages lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );

    // The publisher recovered: publishing works again on a new connection.
    publisher.publish(&task_message(&t, "after")).await.unwrap();
}

#[tokio::test]
async fn consumer_resubscribes_after_connection_loss_and_gets_requeued_work() {
    let p = unique("resub");
    let amqp = connect(&p).await;
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let producer_amqp = connect(&format!("{p}-producer")).await;
    let publisher = Publisher::new(&producer_amqp).await.unwrap();
    publisher.publish(&task_message(&t, "one")).await.unwrap();

    let mut consumer = Consumer::start(&amqp, ConsumerOptions::new(&t.tasks_queue, 2))
        .await
        .unwrap();
    let first = next(&mut consumer, Duration::from_secs(5)).await;
    assert_eq!(first.message_id(), Some("one"));
    assert!(consumer.is_connected());

    // The broker drops the consumer's connection while "one" is unacked.
    let closed = close_connections(&amqp, &format!("{p}-conn")).await;
    assert!(closed >= 1);
    // The old delivery can no longer be acked...
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(first.ack().await.is_err());
    // ...and comes back, redelivered, on the new subscription.
    let again = next(&mut consumer, Duration::from_secs(15)).await;
    assert_eq!(again.message_id(), Some("one"));
    assert!(again.redelivered());
    again.ack().await.unwrap();
    assert!(consumer.is_connected());

    publisher.publish(&task_message(&t, "two")).await.unwrap();
    let two = next(&mut consumer, Duration::from_secs(5)).await;
    assert_eq!(two.message_id(), Some("two"));
    two.ack().await.unwrap();
}

#[tokio::test]
async fn dead_letter_with_reason_and_plain_reject_both_reach_the_dead_queue() {
    let p = unique("dlq");
    let amqp = connect(&p).await;
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let publisher = Publisher::new(&amqp).await.unwrap();
    publisher.publish(&task_message(&t, "bad")).await.unwrap();
    publisher
        .publish(&task_message(&t, "poison"))
        .await
        .unwrap();

    let mut consumer = Consumer::start(&amqp, ConsumerOptions::new(&t.tasks_queue, 2))
        .await
        .unwrap();
    let bad = next(&mut consumer, Duration::from_secs(5)).await;
    bad.dead_letter(
        &publisher,
        &t.dead_exchange,
        "invalid",
        "steps[0].timeout_secs: must be > 0",
    )
    .await
    .unwrap();
    let poison = next(&mut consumer, Duration::from_secs(5)).await;
    poison.reject().await.unwrap();

    let mut dead = Consumer::start(&amqp, ConsumerOptions::new(&t.dead_queue, 10))
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let d = next(&mut dead, Duration::from_secs(10)).await;
        seen.push((
            d.message_id().unwrap().to_owned(),
            d.header_str(HEADER_REJECT_CODE).map(str::to_owned),
            d.header_str(HEADER_REJECT_REASON).map(str::to_owned),
            d.idempotency_key().map(str::to_owned),
        ));
        d.ack().await.unwrap();
    }
    seen.sort();
    assert_eq!(seen[0].0, "bad");
    assert_eq!(seen[0].1.as_deref(), Some("invalid"));
    assert_eq!(
        seen[0].2.as_deref(),
        Some("steps[0].timeout_secs: must be > 0")
    );
    assert_eq!(
        seen[0].3.as_deref(),
        Some("idem-bad"),
        "the original headers travel along"
    );
    assert_eq!(seen[1].0, "poison");
    assert_eq!(seen[1].1, None);
    assert_eq!(amqp.queue_depth(&t.tasks_queue).await.unwrap(), 0);
}

#[tokio::test]
async fn retry_ladder_delays_then_returns_the_task_to_the_work_queue() {
    let p = unique("retry");
    let amqp = connect(&p).await;
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let publisher = Publisher::new(&amqp).await.unwrap();
    publisher.publish(&task_message(&t, "flaky")).await.unwrap();
    let mut consumer = Consumer::start(&amqp, ConsumerOptions::new(&t.tasks_queue, 1))
        .await
        .unwrap();
    let first = next(&mut consumer, Duration::from_secs(5)).await;
    first.nack(true).await.unwrap();
    let d = next(&mut consumer, Duration::from_secs(5)).await;
    assert!(d.redelivered());
    assert_eq!(
        d.delivery_count(),
        Some(1),
        "quorum queues count deliveries"
    );
    let tier = t.retry_tier(1).unwrap();
    assert_eq!(tier.delay, Duration::from_secs(1));
    let mut retry = d.to_outgoing("", &tier.queue);
    retry.attempt = Some(2);
    let started = std::time::Instant::now();
    d.forward(&publisher, &retry).await.unwrap();
    let back = next(&mut consumer, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(back.message_id(), Some("flaky"));
    assert_eq!(back.attempt(), Some(2));
    assert_eq!(back.routing_key(), TASK_ROUTING_KEY);
    assert_eq!(
        back.delivery_count(),
        None,
        "a new attempt starts with a fresh count"
    );
    assert!(!back.redelivered());
    back.ack().await.unwrap();
}

#[tokio::test]
async fn publishing_and_consuming_use_separate_named_connections() {
    let p = unique("names");
    let amqp = connect(&p).await;
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let publisher = Publisher::new(&amqp).await.unwrap();
    publisher.publish(&task_message(&t, "x")).await.unwrap();
    let _consumer = Consumer::start(&amqp, ConsumerOptions::new(&t.tasks_queue, 1))
        .await
        .unwrap();
    // A blocked publishing connection must not hold up consumers' acks.
    wait_visible(&amqp, &format!("{p}-conn#p")).await;
    wait_visible(&amqp, &format!("{p}-conn#c")).await;
}

#[tokio::test]
async fn per_message_expiration_dead_letters_an_unconsumed_task() {
    let p = unique("expire");
    let amqp = connect(&p).await;
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let publisher = Publisher::new(&amqp).await.unwrap();
    let m = task_message(&t, "short-lived").expiration(Duration::from_millis(200));
    publisher.publish(&m).await.unwrap();
    let mut dead = Consumer::start(&amqp, ConsumerOptions::new(&t.dead_queue, 1))
        .await
        .unwrap();
    let d = next(&mut dead, Duration::from_secs(10)).await;
    assert_eq!(d.message_id(), Some("short-lived"));
    d.ack().await.unwrap();
    assert_eq!(amqp.queue_depth(&t.tasks_queue).await.unwrap(), 0);
}

#[tokio::test]
async fn without_the_management_api_a_conflict_quotes_the_broker() {
    let p = unique("nomgmt");
    let amqp = connect(&p).await;
    let (_t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let blind = amqp.with_management_url("http://127.0.0.1:1");
    let changed = Topology::new(&sandfleet_settings::TopologySettings {
        delivery_limit: 7,
        ..topology_settings(&p)
    });
    let err = changed.apply(&blind).await.unwrap_err();
    match &err {
        TopologyError::Conflict {
            differences,
            broker_message,
            ..
        } => {
            assert_eq!(differences.len(), 1, "{differences:?}");
            assert_eq!(differences[0].0, "x-delivery-limit");
            assert_eq!(differences[0].1, "7");
            assert!(
                broker_message.contains("inequivalent arg 'x-delivery-limit'"),
                "{broker_message}"
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // check() still reports existence, and says what it could not verify.
    let report = changed.check(&blind).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.findings);
    assert!(!report.fully_verified());
}

#[tokio::test]
async fn cancelling_a_consumer_gives_its_prefetched_work_back_at_once() {
    let p = unique("cancel");
    let amqp = connect(&p).await;
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let publisher = Publisher::new(&amqp).await.unwrap();
    let messages: Vec<_> = (0..5).map(|i| task_message(&t, &format!("m{i}"))).collect();
    assert!(
        publisher
            .publish_all(&messages)
            .await
            .iter()
            .all(Result::is_ok)
    );

    let mut paused = Consumer::start(&amqp, ConsumerOptions::new(&t.tasks_queue, 5))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // the broker sends all 5
    paused.cancel();

    // Another consumer gets the four that were prefetched but never handed over.
    let other_amqp = connect(&format!("{p}-other")).await;
    let mut other = Consumer::start(&other_amqp, ConsumerOptions::new(&t.tasks_queue, 10))
        .await
        .unwrap();
    let mut got = HashSet::new();
    for _ in 0..4 {
        let d = next(&mut other, Duration::from_secs(5)).await;
        got.insert(d.message_id().unwrap().to_owned());
        d.ack().await.unwrap();
    }
    // The one already handed over is still ours, then the stream ends.
    let mine = next(&mut paused, Duration::from_secs(5)).await;
    assert!(!got.contains(mine.message_id().unwrap()));
    mine.ack().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), paused.next_delivery())
        .await
        .unwrap();
    assert!(end.is_none());
    assert_eq!(got.len(), 4);
}

#[tokio::test]
async fn connections_negotiate_the_configured_heartbeat() {
    let p = unique("heartbeat");
    let settings = sandfleet_settings::AmqpSettings {
        heartbeat_secs: 7,
        ..settings(&p)
    };
    let amqp = match sandfleet_amqp::Amqp::connect(&settings, "test").await {
        Ok(a) => a,
        Err(e) => panic!("RabbitMQ is not reachable ({e}); this test needs it"),
    };
    let ours = connections_as_listed(&amqp, &format!("{p}-conn")).await;
    for c in ours {
        assert_eq!(c["timeout"], 7, "heartbeat of {}", c["name"]);
        assert_eq!(c["client_properties"]["product"], "sandfleet");
    }
}

#[tokio::test]
async fn connections_use_small_frames_and_large_bodies_arrive_whole() {
    let p = unique("frames");
    let amqp = connect(&p).await;
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let publisher = Publisher::new(&amqp).await.unwrap();
    // A body of many frames, every byte checked.
    let body: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8).collect();
    publisher
        .publish(&OutgoingMessage::new(
            &t.tasks_exchange,
            TASK_ROUTING_KEY,
            body.clone(),
        ))
        .await
        .unwrap();
    let mut consumer = Consumer::start(&amqp, ConsumerOptions::new(&t.tasks_queue, 4))
        .await
        .unwrap();
    let d = next(&mut consumer, Duration::from_secs(5)).await;
    assert_eq!(d.body(), &body[..]);
    d.ack().await.unwrap();

    // The idle worker's memory depends on it: lapin keeps 32 frames of
    // buffer per direction and connection.
    let ours = connections_as_listed(&amqp, &format!("{p}-conn")).await;
    for c in ours {
        assert_eq!(c["frame_max"], 16 * 1024, "frame_max of {}", c["name"]);
    }
}

#[tokio::test]
async fn management_lists_and_deletes_queues_and_exchanges_by_prefix() {
    let p = unique("mgmt-delete");
    let amqp = connect(&p).await;
    // Cleanup guard in case an assertion fails before the deletes below.
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let mgmt = amqp.management();
    let queues = mgmt.queues_with_prefix(&p).await.unwrap();
    let exchanges = mgmt.exchanges_with_prefix(&p).await.unwrap();
    assert!(queues.iter().any(|q| q.name == t.tasks_queue));
    assert!(exchanges.iter().any(|e| e.name == t.tasks_exchange));
    assert!(exchanges.iter().all(|e| e.name.starts_with(&p)));

    for q in &queues {
        mgmt.delete_queue(&q.name).await.unwrap();
    }
    for e in &exchanges {
        mgmt.delete_exchange(&e.name).await.unwrap();
    }
    assert!(mgmt.queues_with_prefix(&p).await.unwrap().is_empty());
    assert!(mgmt.exchanges_with_prefix(&p).await.unwrap().is_empty());
    // Already gone is done, not an error.
    mgmt.delete_queue(&t.tasks_queue).await.unwrap();
    mgmt.delete_exchange(&t.tasks_exchange).await.unwrap();
}

/// Polls `live_consumers` until `want` holds for `queue`'s count (the
/// management API's consumer and channel lists lag a few seconds).
async fn live_count_becomes(amqp: &Amqp, queue: &str, want: impl Fn(usize) -> bool) -> usize {
    let mgmt = amqp.management();
    let mut n = 0;
    for _ in 0..300 {
        n = mgmt
            .live_consumers()
            .await
            .unwrap()
            .get(queue)
            .copied()
            .unwrap_or(0);
        if want(n) {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("live consumers of {queue} stayed at {n}");
}

#[tokio::test]
async fn live_consumers_count_open_channels_only() {
    let p = unique("mgmt-live");
    let amqp = connect(&p).await;
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let other = connect(&format!("{p}-consumer")).await;
    let consumer = Consumer::start(&other, ConsumerOptions::new(&t.tasks_queue, 1))
        .await
        .unwrap();
    assert_eq!(
        live_count_becomes(&amqp, &t.tasks_queue, |n| n > 0).await,
        1
    );
    // The consumer's connection goes: the queue has no live consumer, even
    // while the queue listing may still count one.
    drop(consumer);
    other.close();
    live_count_becomes(&amqp, &t.tasks_queue, |n| n == 0).await;
}
