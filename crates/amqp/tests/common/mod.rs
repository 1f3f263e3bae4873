//! Shared helpers for tests against the real RabbitMQ on 127.0.0.1:5672.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::time::Duration;

use sandfleet_amqp::{Amqp, Consumer, ConsumerOptions, Delivery, Topology};
use sandfleet_settings::{AmqpSettings, TopologySettings};

/// The broker URL (`AMQP_ADDR`, default the local broker).
pub fn url() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A unique name prefix for one test.
pub fn unique(test: &str) -> String {
    format!(
        "sftest-{test}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Settings whose connections are named after `prefix`.
pub fn settings(prefix: &str) -> AmqpSettings {
    AmqpSettings {
        url: url(),
        connection_name: Some(format!("{prefix}-conn")),
        connect_timeout_secs: 5,
        reconnect_max_delay_secs: 2,
        ..AmqpSettings::default()
    }
}

/// Connects or fails the test with a clear message.
pub async fn connect(prefix: &str) -> Amqp {
    match Amqp::connect(&settings(prefix), "test").await {
        Ok(a) => a,
        Err(e) => panic!(
            "RabbitMQ is not reachable at {} ({e}); these tests need the broker running and never skip",
            url()
        ),
    }
}

/// Topology settings for `prefix`.
pub fn topology_settings(prefix: &str) -> TopologySettings {
    TopologySettings {
        prefix: prefix.to_owned(),
        retry_delays_secs: vec![1, 5],
        results_max_age: "1h".into(),
        ..TopologySettings::default()
    }
}

/// Deletes the topology when dropped (even when the test panicked).
pub struct Cleanup {
    pub topology: Topology,
    pub settings: AmqpSettings,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let topology = self.topology.clone();
        let settings = self.settings.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(amqp) = Amqp::connect(&settings, "cleanup").await {
                    let _ = topology.delete(&amqp).await;
                    amqp.close();
                }
            });
        })
        .join();
    }
}

/// Applies the topology for `prefix` and returns it with its cleanup guard.
pub async fn applied(amqp: &Amqp, prefix: &str, ts: TopologySettings) -> (Topology, Cleanup) {
    let topology = Topology::new(&ts);
    topology.apply(amqp).await.unwrap();
    let cleanup = Cleanup {
        topology: topology.clone(),
        settings: settings(prefix),
    };
    (topology, cleanup)
}

/// Drains `queue` until it stays quiet for `quiet`, acking everything.
pub async fn drain(amqp: &Amqp, queue: &str, quiet: Duration) -> Vec<Delivery> {
    let mut consumer = Consumer::start(amqp, ConsumerOptions::new(queue, 500))
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(quiet, consumer.next_delivery()).await {
        d.ack().await.unwrap();
        out.push(d);
    }
    out
}

/// Waits up to `within` for the next delivery.
pub async fn next(consumer: &mut Consumer, within: Duration) -> Delivery {
    tokio::time::timeout(within, consumer.next_delivery())
        .await
        .expect("no delivery in time")
        .expect("consumer ended")
}

/// Waits until the management API lists a connection named `prefix*` (its
/// connection list lags a few seconds behind).
pub async fn wait_visible(amqp: &Amqp, prefix: &str) {
    let mgmt = amqp.management();
    for _ in 0..200 {
        if !mgmt.connections_named(prefix).await.unwrap().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("connection {prefix}* never showed up in the management API");
}

/// The management API's view of the connections named `prefix*` (at least
/// one: waits until they are listed).
pub async fn connections_as_listed(amqp: &Amqp, prefix: &str) -> Vec<serde_json::Value> {
    wait_visible(amqp, prefix).await;
    let all: Vec<serde_json::Value> = reqwest::Client::new()
        .get(format!("{}/api/connections", amqp.management().base_url()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ours: Vec<_> = all
        .into_iter()
        .filter(|c| {
            c["client_properties"]["connection_name"]
                .as_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    assert!(!ours.is_empty());
    ours
}

/// Closes every connection named `prefix*`, waiting until at least one is visible.
pub async fn close_connections(amqp: &Amqp, prefix: &str) -> usize {
    wait_visible(amqp, prefix).await;
    amqp.management()
        .close_connections_named(prefix)
        .await
        .unwrap()
}
