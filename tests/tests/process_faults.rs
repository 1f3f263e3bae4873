//! Worker-process faults with the local executor on the real RabbitMQ:
//! graceful drain on SIGTERM, broker connections cut under a running worker,
//! and a broker that is down when the worker starts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sandfleet_e2e::{Env, free_port, task};
use sandfleet_proto::Outcome;

const BIN: &str = env!("CARGO_BIN_EXE_sandfleet-test-worker");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_finishes_short_tasks_and_hands_long_ones_to_another_worker() {
    let env = Env::new("drain", BIN, false, |s| {
        s.worker.drain_timeout_secs = 3;
    })
    .await
    .unwrap();
    let mut w1 = env.spawn_worker("w1", |_| {}).unwrap();
    w1.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    let short = task("sleep 1; echo short");
    let long = task("sleep 6; echo long");
    env.publish(&short).await.unwrap();
    env.publish(&long).await.unwrap();
    for _ in 0..100 {
        if w1.metric("sandfleet_tasks_in_flight").await == Some(2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(w1.metric("sandfleet_tasks_in_flight").await, Some(2.0));
    let queued = task("echo queued");
    w1.term().unwrap();
    env.publish(&queued).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w1.readyz().await, 503, "draining is not ready");
    let status = w1.wait_exit(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "clean exit after the drain: {status:?}");

    // The short task finished inside the drain; the long one was handed back.
    let f = env.finals(short.id);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].worker, "w1");
    assert!(env.finals(long.id).is_empty(), "not finished by w1");
    assert!(env.finals(queued.id).is_empty(), "not taken while draining");

    let w2 = env.spawn_worker("w2", |_| {}).unwrap();
    env.until("w2 finishes the rest", Duration::from_secs(60), |e| {
        !e.finals(long.id).is_empty() && !e.finals(queued.id).is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w2.log_tail()));
    let f = env.finals(long.id);
    assert_eq!(f.len(), 1);
    assert_eq!(
        (f[0].worker.as_str(), f[0].outcome),
        ("w2", Outcome::Succeeded)
    );
    assert!(env.history().check().ok());
    drop(w2);
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_broker_connections_mid_flight_loses_no_task() {
    let env = Env::new("connloss", BIN, false, |_| {}).await.unwrap();
    let w = env.spawn_worker("w1", |_| {}).unwrap();
    w.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    let tasks: Vec<_> = (0..3)
        .map(|i| task(&format!("sleep 15; echo {i}")))
        .collect();
    for t in &tasks {
        env.publish(t).await.unwrap();
    }
    for _ in 0..100 {
        if w.metric("sandfleet_tasks_in_flight").await == Some(3.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let closed = env.close_connections_of(&w).await.unwrap();
    assert!(
        closed >= 1,
        "the worker's connections were found and closed"
    );
    assert_eq!(
        w.metric("sandfleet_tasks_in_flight").await,
        Some(3.0),
        "cut mid-flight"
    );
    env.until("every task finished", Duration::from_secs(90), |e| {
        tasks.iter().all(|t| !e.finals(t.id).is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.log_tail()));
    let report = env.history().check();
    assert!(report.ok(), "{report:?}");
    for t in &tasks {
        let f = env.finals(t.id);
        assert_eq!(f.len(), 1, "one final result, the lost run published none");
        assert!(
            f.iter()
                .all(|r| r.outcome == Outcome::Succeeded && r.attempt == 1)
        );
    }
    assert!(env.dead_letters().is_empty());
    w.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    assert_eq!(env.ready_tasks().await.unwrap(), 0);
    assert!(
        w.log_tail().contains("delivery lost"),
        "the lost deliveries were forgotten, not settled:\n{}",
        w.log_tail()
    );
    drop(w);
    env.cleanup().await.unwrap();
}

/// A TCP proxy to RabbitMQ that only starts listening when told to.
async fn proxy(port: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_at_start_up_means_not_ready_then_consuming_once_it_is_up() {
    let env = Env::new("startdown", BIN, false, |_| {}).await.unwrap();
    let port = free_port().unwrap();
    let mut w = env
        .spawn_worker("w1", |s| {
            s.amqp.url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
            s.amqp.connect_timeout_secs = 1;
            s.amqp.reconnect_max_delay_secs = 1;
        })
        .unwrap();
    let t = task("echo late");
    env.publish(&t).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (code, body) = w.get("/readyz").await.unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("broker not connected"), "{body}");
    assert_eq!(w.get("/healthz").await.unwrap().0, 200, "alive meanwhile");
    assert!(
        w.wait_exit(Duration::from_millis(10)).await.is_err(),
        "no crash"
    );
    let p = tokio::spawn(proxy(port));
    w.wait_ready(200, Duration::from_secs(20)).await.unwrap();
    env.until("the task's result", Duration::from_secs(30), |e| {
        !e.finals(t.id).is_empty()
    })
    .await
    .unwrap();
    p.abort();
    drop(w);
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_result_holds_the_task_in_the_queue_until_results_can_be_delivered() {
    use sandfleet_amqp::lapin::options::QueueBindOptions;
    use sandfleet_amqp::lapin::types::FieldTable;

    let env = Env::new("unroutable", BIN, false, |_| {}).await.unwrap();
    let ch = env.amqp.channel().await.unwrap();
    let (queue, exchange) = (
        env.topology.results_stream.clone(),
        env.topology.results_exchange.clone(),
    );
    let w = env.spawn_worker("w1", |_| {}).unwrap();
    w.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    // After the worker declared its topology: an operator's mistake.
    ch.queue_unbind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "#".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let t = task("echo hi");
    env.publish(&t).await.unwrap();
    // The worker cannot publish the result, so it releases the task (a fresh
    // copy; no delivery budget spent) and tries again, over and over.
    for _ in 0..300 {
        if w.metric("sandfleet_task_releases_total").await >= Some(2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(w.metric("sandfleet_task_releases_total").await >= Some(2.0));
    assert!(env.results().is_empty(), "nowhere to route results");
    assert!(env.dead_letters().is_empty(), "not dead-lettered for it");
    assert_eq!(
        w.metric("sandfleet_tasks_total{outcome=\"succeeded\"}")
            .await
            .unwrap_or(0.0),
        0.0,
        "not counted as done"
    );
    // Results can be routed again: the task completes.
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    env.until("the final result", Duration::from_secs(30), |e| {
        !e.finals(t.id).is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.log_tail()));
    assert_eq!(env.finals(t.id)[0].outcome, Outcome::Succeeded);
    assert_eq!(env.ready_tasks().await.unwrap(), 0);
    drop(w);
    env.cleanup().await.unwrap();
}
