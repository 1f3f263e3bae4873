//! Fair sharing over task queue shards on the real RabbitMQ (127.0.0.1:5672,
//! `AMQP_ADDR` overrides): a noisy repository's backlog does not starve quiet
//! ones across two workers, per-key caps hold without spending the delivery
//! budget, and the queue depth the autoscaler sees is the total over shards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sandfleet_amqp::{Amqp, OutgoingMessage, Publisher, Topology};
use sandfleet_proto::shard_for;
use sandfleet_settings::{FairShare, FairnessSettings, TopologySettings};
use sandfleet_worker::fair::rabbit_shards;
use sandfleet_worker::metrics::Metrics;
use sandfleet_worker::{Broker, Delivery};
use tokio::sync::Semaphore;

const SHARDS: u16 = 16;

async fn connect(name: &str) -> Amqp {
    common::connect(&format!("sandfleet-fair-it-{name}"), "fair-it").await
}

async fn topology(amqp: &Amqp, name: &str) -> Topology {
    let t = Topology::new(&TopologySettings {
        prefix: common::unique_prefix("fair-it", name),
        retry_delays_secs: vec![1],
        task_shards: SHARDS,
        ..TopologySettings::default()
    });
    t.apply(amqp).await.unwrap();
    t
}

/// Publishes `n` tasks of repository `repo` the way the producer routes them.
async fn enqueue(publisher: &Publisher, t: &Topology, repo: &str, n: usize) {
    for i in 0..n {
        let body = serde_json::json!({"source": {"repository": repo}, "n": i});
        let m = OutgoingMessage::new(
            &t.tasks_exchange,
            t.routing_key_for(repo),
            serde_json::to_vec(&body).unwrap(),
        );
        publisher.publish(&m).await.unwrap();
    }
}

fn repo_of(d: &impl Delivery) -> String {
    let v: serde_json::Value = serde_json::from_slice(d.body()).unwrap();
    v["source"]["repository"].as_str().unwrap().to_owned()
}

#[derive(Default)]
struct Log {
    started: Vec<String>,
    running: HashMap<String, u32>,
    max_running: HashMap<String, u32>,
    budget_spent: u32,
}

/// One worker: takes deliveries while it has a free slot, "runs" each for
/// `work`, acks; stops after `stop_after` tasks in all (shared count).
async fn worker<B: Broker>(
    broker: Arc<B>,
    concurrency: usize,
    work: Duration,
    log: Arc<Mutex<Log>>,
    total: usize,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    loop {
        if log.lock().unwrap().started.len() >= total {
            break;
        }
        let permit = slots.clone().acquire_owned().await.unwrap();
        let d = match tokio::time::timeout(Duration::from_millis(500), broker.next_delivery()).await
        {
            Ok(d) => d.unwrap(),
            Err(_) => continue,
        };
        let repo = repo_of(&d);
        {
            let mut l = log.lock().unwrap();
            l.started.push(repo.clone());
            l.budget_spent += d.delivery_count();
            let r = l.running.entry(repo.clone()).or_default();
            *r += 1;
            let r = *r;
            let m = l.max_running.entry(repo.clone()).or_default();
            *m = (*m).max(r);
        }
        let log = log.clone();
        tokio::spawn(async move {
            tokio::time::sleep(work).await;
            *log.lock().unwrap().running.get_mut(&repo).unwrap() -= 1;
            d.ack().await.unwrap();
            drop(permit);
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_repository_does_not_starve_quiet_ones_across_two_workers() {
    let amqp = connect("noisy").await;
    let t = topology(&amqp, "noisy").await;
    let publisher = Publisher::new(&amqp).await.unwrap();
    let noisy = "noisy/app";
    let quiet = ["quiet-a/app", "quiet-b/app"];
    // Collisions are the documented limit of sharding; this test is about
    // the scheduler, so its repositories sit on different shards.
    let mut shards: Vec<u16> = quiet.iter().map(|r| shard_for(r, SHARDS)).collect();
    shards.push(shard_for(noisy, SHARDS));
    shards.sort_unstable();
    shards.dedup();
    assert_eq!(shards.len(), 3, "test repositories must not share a shard");
    // The noisy backlog is enqueued first: in one FIFO every quiet task
    // would wait behind all 200.
    enqueue(&publisher, &t, noisy, 200).await;
    for q in quiet {
        enqueue(&publisher, &t, q, 20).await;
    }
    let total = 240;
    let settings = FairnessSettings::default();
    let log = Arc::new(Mutex::new(Log::default()));
    let mut workers = Vec::new();
    let mut brokers = Vec::new();
    for w in 0..2 {
        let amqp = connect(&format!("noisy-w{w}")).await;
        let publisher = Publisher::new(&amqp).await.unwrap();
        let broker = Arc::new(rabbit_shards(
            &amqp,
            &t,
            &publisher,
            &settings,
            4,
            Arc::new(Metrics::new()),
        ));
        brokers.push(broker.clone());
        workers.push(tokio::spawn(worker(
            broker,
            4,
            Duration::from_millis(20),
            log.clone(),
            total,
        )));
    }
    // The autoscaler's signal is the total over the task queue and shards.
    let depth = brokers[0].queue_depth().await.unwrap();
    assert!(depth <= 240, "{depth}");
    tokio::time::timeout(Duration::from_secs(90), async {
        for w in workers {
            w.await.unwrap();
        }
    })
    .await
    .expect("all tasks served within 90 s");
    {
        let l = log.lock().unwrap();
        assert_eq!(l.started.len(), total);
        // Three keys with work share equally: each quiet repository's 20 tasks
        // are done within about the first 60 starts (20 each); allow for the
        // two workers' buffers and refill latency.
        for q in quiet {
            let last = l.started.iter().rposition(|r| r == q).unwrap();
            assert!(
                last < 90,
                "{q}'s last task started at position {last} of {total}: {:?}",
                &l.started[..100]
            );
        }
        assert_eq!(l.budget_spent, 0, "no delivery was returned to the broker");
    }
    for b in brokers {
        b.close().await.unwrap();
    }
    t.delete(&amqp).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_caps_hold_without_spending_the_delivery_budget() {
    let amqp = connect("caps").await;
    let t = topology(&amqp, "caps").await;
    let publisher = Publisher::new(&amqp).await.unwrap();
    let capped = "capped/app";
    let free = "free/app";
    enqueue(&publisher, &t, capped, 24).await;
    enqueue(&publisher, &t, free, 24).await;
    let settings = FairnessSettings {
        keys: vec![FairShare {
            name: capped.into(),
            weight: 1,
            cap: 2,
        }],
        ..FairnessSettings::default()
    };
    let log = Arc::new(Mutex::new(Log::default()));
    let broker = Arc::new(rabbit_shards(
        &amqp,
        &t,
        &publisher,
        &settings,
        6,
        Arc::new(Metrics::new()),
    ));
    let metrics_probe = broker.clone();
    tokio::time::timeout(
        Duration::from_secs(60),
        worker(broker, 6, Duration::from_millis(50), log.clone(), 48),
    )
    .await
    .expect("all tasks served within 60 s");
    // Let the last acks land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    {
        let l = log.lock().unwrap();
        assert_eq!(l.started.len(), 48);
        assert_eq!(l.max_running[capped], 2, "the cap of 2 held");
        assert!(
            l.max_running[free] >= 4,
            "the free key used the slots the capped one could not: {:?}",
            l.max_running
        );
        assert_eq!(l.budget_spent, 0, "holding a capped delivery spent nothing");
    }
    assert_eq!(metrics_probe.queue_depth().await.unwrap(), 0);
    metrics_probe.close().await.unwrap();
    t.delete(&amqp).await.unwrap();
}
