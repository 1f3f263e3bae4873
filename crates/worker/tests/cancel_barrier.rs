//! The cancellation read barrier against the real RabbitMQ (127.0.0.1:5672,
//! `AMQP_ADDR` overrides) and its cancellations stream: concurrent barriers
//! share markers, and still each one returns only once every cancel
//! confirmed before it was called is in the index.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use sandfleet_amqp::testing::cancellations_up_to;
use sandfleet_amqp::{Amqp, OutgoingMessage, Publisher, Topology};
use sandfleet_proto::{
    CANCELLATION_MESSAGE_TYPE, CancelTarget, Cancellation, Provider, SandboxSpec, Source, Task,
};
use sandfleet_settings::TopologySettings;
use sandfleet_worker::Cancels;
use tokio_util::sync::CancellationToken;

struct Fixture {
    amqp: Amqp,
    topology: Topology,
    publisher: Publisher,
    cancels: Arc<Cancels>,
    stop: CancellationToken,
}

/// A worker's feed on a fresh topology, read up to its tail.
async fn fixture(name: &str) -> Fixture {
    let prefix = common::unique_prefix("worker-it", name);
    let amqp = common::connect(&format!("sandfleet-worker-it-{prefix}"), "worker-it").await;
    let topology = Topology::new(&TopologySettings {
        prefix,
        ..TopologySettings::default()
    });
    topology.apply(&amqp).await.unwrap();
    let publisher = Publisher::new(&amqp).await.unwrap();
    let cancels = Cancels::fed_from_stream();
    let stop = CancellationToken::new();
    tokio::spawn(sandfleet_worker::cancel::run_feed(
        amqp.clone(),
        topology.clone(),
        publisher.clone(),
        cancels.clone(),
        "worker-it".into(),
        stop.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(30), cancels.caught_up())
        .await
        .expect("the feed reads the stream up to its tail");
    Fixture {
        amqp,
        topology,
        publisher,
        cancels,
        stop,
    }
}

impl Fixture {
    /// Publishes `c` to the cancellations exchange; returns once confirmed.
    async fn publish(&self, c: &Cancellation) {
        let m = OutgoingMessage::new(
            &self.topology.cancellations_exchange,
            "",
            serde_json::to_vec(c).unwrap(),
        )
        .message_id(c.id.to_string())
        .kind(CANCELLATION_MESSAGE_TYPE);
        self.publisher.publish(&m).await.unwrap();
    }

    /// The messages on the cancellations stream with their offsets, read
    /// from its start up to a sentinel cancel published now.
    async fn stream(&self) -> Vec<(u64, Cancellation)> {
        let sentinel = Cancellation::task(task().id, "worker-it", "sentinel");
        self.publish(&sentinel).await;
        cancellations_up_to(&self.amqp, &self.topology, sentinel.id)
            .await
            .unwrap()
    }

    async fn cleanup(self) {
        self.stop.cancel();
        self.topology.delete(&self.amqp).await.unwrap();
        self.amqp.close();
    }
}

fn task() -> Task {
    Task::fix_attempt(
        Source::new(Provider::Api, "acme/widgets", "4f2a9c1"),
        SandboxSpec::new("alpine:3", 60),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_barrier_sees_every_cancel_confirmed_before_it_was_called_while_others_share_markers() {
    let f = Arc::new(fixture("barrier-order").await);
    // Callers that cancel a task, then pass the barrier at once: most of
    // them call it while another caller's marker is on its way, published
    // before their cancel. That marker must not release them.
    let callers: Vec<_> = (0..24)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move {
                let mut read_to = Vec::new();
                for _ in 0..25 {
                    let t = task();
                    f.publish(&Cancellation::task(t.id, "ops", "barrier test"))
                        .await;
                    let to = f.cancels.barrier().await.unwrap();
                    assert!(
                        f.cancels.check(&t).is_some(),
                        "a barrier returned before a cancel confirmed before it was read"
                    );
                    read_to.push((t.id, to.expect("a fed barrier says how far it read")));
                }
                read_to
            })
        })
        .collect();
    let mut read_to = Vec::new();
    for c in callers {
        read_to.extend(c.await.unwrap());
    }
    let stream = f.stream().await;
    // How far each barrier says it read lies past its caller's cancel.
    for (task, to) in read_to {
        let (cancel_at, _) = stream
            .iter()
            .find(|(_, c)| matches!(c.target, CancelTarget::Task { task_id } if task_id == task))
            .expect("every cancel is on the stream");
        assert!(
            to > *cancel_at,
            "a barrier read to {to}, its cancel is at {cancel_at}"
        );
    }
    let markers = stream
        .iter()
        .filter(|(_, c)| matches!(c.target, CancelTarget::Marker))
        .count();
    // 600 barriers and the catch-up marker: fewer markers means callers
    // did share rounds, which is what this test is about.
    assert!(
        markers < 600,
        "{markers} markers for 600 barriers and the catch-up: no round was shared"
    );
    Arc::into_inner(f).unwrap().cleanup().await;
}

// One runtime thread: the 200 callers all join a round in join_all's first
// poll, before the round's driver can run. With a second thread the driver
// ran rounds beside a polling thread the OS had descheduled (5 markers under
// CI load), which says nothing about sharing.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_barriers_publish_far_fewer_markers_than_callers() {
    let f = fixture("barrier-markers").await;
    let before = f.stream().await.len();
    let barriers = futures::future::join_all((0..200).map(|_| f.cancels.barrier())).await;
    assert!(barriers.iter().all(Result::is_ok), "{barriers:?}");
    // Counted on the stream itself: everything after the first reading
    // (the catch-up marker and that reading's sentinel) is a barrier's.
    let stream = f.stream().await;
    let markers = stream[before + 1..]
        .iter()
        .filter(|(_, c)| matches!(c.target, CancelTarget::Marker))
        .count();
    assert!(
        (1..=3).contains(&markers),
        "200 concurrent barriers published {markers} markers"
    );
    f.cleanup().await;
}
