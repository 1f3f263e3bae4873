//! A stream-queue reader that stops early (`results tail -n 1`) must not
//! nack what the broker sent ahead: RabbitMQ answers a nack on a stream by
//! closing the whole connection (`NOT_IMPLEMENTED`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{applied, next, settings, topology_settings, unique};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sandfleet_amqp::{Amqp, Consumer, ConsumerOptions, OutgoingMessage, Publisher, StreamOffset};

#[tokio::test]
async fn stopping_a_stream_reader_early_keeps_the_connection() {
    let p = unique("stream-stop");
    // One pooled connection: the reader's channel and ours share it, so a
    // connection-level error would reach ours too.
    let amqp = Amqp::connect(
        &sandfleet_settings::AmqpSettings {
            pool_size: 1,
            ..settings(&p)
        },
        "test",
    )
    .await
    .unwrap();
    let (t, _cleanup) = applied(&amqp, &p, topology_settings(&p)).await;
    let publisher = Publisher::new(&amqp).await.unwrap();
    let messages: Vec<_> = (0..50)
        .map(|i| {
            OutgoingMessage::new(
                &t.results_exchange,
                "succeeded.final",
                format!("{{\"n\":{i}}}").into_bytes(),
            )
        })
        .collect();
    assert!(
        publisher
            .publish_all(&messages)
            .await
            .iter()
            .all(Result::is_ok)
    );
    let ours = amqp.channel().await.unwrap();

    for round in 0..3 {
        let opts = ConsumerOptions::new(&t.results_stream, 500).stream_offset(StreamOffset::First);
        let mut reader = Consumer::start(&amqp, opts).await.unwrap();
        // Read one and stop with the rest sent ahead, as `tail -n 1` does.
        let d = next(&mut reader, Duration::from_secs(10)).await;
        d.ack().await.unwrap();
        reader.cancel();
        // The pump ends (and the hand-over buffer is dropped) only after it
        // has given back, or not, what it held.
        while tokio::time::timeout(Duration::from_secs(10), reader.next_delivery())
            .await
            .expect("the reader ends after cancel")
            .is_some()
        {}
        // A round trip on the shared connection: a nack sent before it would
        // have had the broker close the connection first.
        let q = ours
            .queue_declare(
                t.results_stream.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        assert!(q.is_ok(), "round {round}: the connection was closed: {q:?}");
    }
    assert!(ours.status().connected());
}
