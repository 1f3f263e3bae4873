//! Worker-process faults with the Kubernetes executor on kube-sim and the
//! real RabbitMQ: SIGKILL mid-task, SIGTERM past the drain deadline, broker
//! connections cut mid-flight. The invariant in each: the running Job is
//! adopted by the redelivery — exactly one Job per attempt — and exactly one
//! final outcome is published.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sandfleet_e2e::{Env, task};
use sandfleet_proto::Outcome;
use sandfleet_sandbox::job::job_name;

const BIN: &str = env!("CARGO_BIN_EXE_sandfleet-test-worker");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_task_the_redelivery_adopts_the_running_job() {
    let env = Env::new("kill9", BIN, true, |_| {}).await.unwrap();
    let mut w1 = env.spawn_worker("w1", |_| {}).unwrap();
    w1.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    let t = task("sleep 5; echo done");
    let name = job_name(t.id, 1);
    env.publish(&t).await.unwrap();
    env.until("the job running", Duration::from_secs(30), |e| {
        e.job_running(&name)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w1.log_tail()));
    w1.kill9().unwrap();
    assert!(env.job_exists(&name), "the crash left the Job running");

    let w2 = env.spawn_worker("w2", |_| {}).unwrap();
    env.until("the final result", Duration::from_secs(60), |e| {
        !e.finals(t.id).is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w2.log_tail()));
    // Give stray duplicates a moment to show up before judging.
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(env.job_created(&name), 1, "exactly one Job for the attempt");
    assert!(
        env.job_requests(&name).contains(&("POST".into(), 409)),
        "the redelivery adopted it (create answered 409): {:?}",
        env.job_requests(&name)
    );
    let finals = env.finals(t.id);
    assert!(!finals.is_empty());
    assert!(
        finals
            .iter()
            .all(|r| r.attempt == 1 && r.outcome == Outcome::Succeeded && r.worker == "w2"),
        "{finals:?}"
    );
    assert!(finals[0].log_tail.contains("done"));
    let report = env.history().check();
    assert!(report.ok(), "{report:?}");
    drop(w2);
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_drain_deadline_keeps_the_job_for_another_worker() {
    let env = Env::new("term", BIN, true, |s| {
        s.worker.drain_timeout_secs = 1;
    })
    .await
    .unwrap();
    let mut w1 = env.spawn_worker("w1", |_| {}).unwrap();
    w1.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    let t = task("sleep 6; echo done");
    let name = job_name(t.id, 1);
    env.publish(&t).await.unwrap();
    env.until("the job running", Duration::from_secs(30), |e| {
        e.job_running(&name)
    })
    .await
    .unwrap();
    w1.term().unwrap();
    let status = w1.wait_exit(Duration::from_secs(15)).await.unwrap();
    assert!(status.success(), "{status:?}\n{}", w1.log_tail());
    assert!(
        env.job_exists(&name),
        "shutdown never deletes a running Job"
    );
    assert!(
        !env.job_requests(&name).iter().any(|(m, _)| m == "DELETE"),
        "no delete was even attempted"
    );
    assert!(env.finals(t.id).is_empty());

    let w2 = env.spawn_worker("w2", |_| {}).unwrap();
    env.until("the final result", Duration::from_secs(60), |e| {
        !e.finals(t.id).is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w2.log_tail()));
    assert_eq!(env.job_created(&name), 1);
    let finals = env.finals(t.id);
    assert!(
        finals
            .iter()
            .all(|r| r.worker == "w2" && r.attempt == 1 && r.outcome == Outcome::Succeeded)
    );
    assert!(env.history().check().ok());
    drop(w2);
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_cut_mid_flight_lose_no_task_and_duplicate_no_job() {
    let env = Env::new("kconn", BIN, true, |_| {}).await.unwrap();
    let w = env.spawn_worker("w1", |_| {}).unwrap();
    w.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    let tasks: Vec<_> = (0..3)
        .map(|i| task(&format!("sleep 12; echo {i}")))
        .collect();
    for t in &tasks {
        env.publish(t).await.unwrap();
    }
    env.until("3 jobs running", Duration::from_secs(30), |e| {
        tasks.iter().all(|t| e.job_running(&job_name(t.id, 1)))
    })
    .await
    .unwrap();
    let closed = env.close_connections_of(&w).await.unwrap();
    assert!(closed >= 1);
    assert!(
        tasks.iter().all(|t| env.job_running(&job_name(t.id, 1))),
        "cut while the Jobs ran"
    );
    env.until("every task finished", Duration::from_secs(90), |e| {
        tasks.iter().all(|t| !e.finals(t.id).is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.log_tail()));
    for t in &tasks {
        let name = job_name(t.id, 1);
        assert_eq!(env.job_created(&name), 1, "one Job for {name}");
        assert!(
            env.job_requests(&name).contains(&("POST".into(), 409)),
            "adopted after the redelivery"
        );
        assert!(
            env.finals(t.id)
                .iter()
                .all(|r| r.attempt == 1 && r.outcome == Outcome::Succeeded)
        );
    }
    let report = env.history().check();
    assert!(report.ok(), "{report:?}");
    assert!(env.dead_letters().is_empty());
    drop(w);
    env.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redelivery_of_a_finished_attempt_adopts_its_job_despite_the_orphan_collector() {
    use sandfleet_amqp::lapin::options::QueueBindOptions;
    use sandfleet_amqp::lapin::types::FieldTable;

    // Both workers collect garbage every second.
    let env = Env::new("gcadopt", BIN, true, |s| {
        s.sandbox.kubernetes.gc_interval_secs = 1;
    })
    .await
    .unwrap();
    let w1 = env.spawn_worker("w1", |_| {}).unwrap();
    let w2 = env.spawn_worker("w2", |_| {}).unwrap();
    w1.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    w2.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    // No result can be published: the attempt finishes, but its delivery
    // stays unsettled and goes back and forth between the workers.
    let ch = env.amqp.channel().await.unwrap();
    let (queue, exchange) = (
        env.topology.results_stream.clone(),
        env.topology.results_exchange.clone(),
    );
    ch.queue_unbind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "#".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let t = task("echo ran");
    let name = job_name(t.id, 1);
    env.publish(&t).await.unwrap();
    let finished = |e: &Env| {
        let sim = e.kube();
        sim.sim.jobs(&sim.namespace).iter().any(|j| {
            j.pointer("/metadata/name").and_then(|n| n.as_str()) == Some(name.as_str())
                && j.pointer("/status/succeeded").and_then(|n| n.as_i64()) == Some(1)
        })
    };
    env.until("the job finished", Duration::from_secs(30), finished)
        .await
        .unwrap();
    // Several collection rounds of both workers pass while the finished Job
    // waits for its delivery to settle.
    let gc_lists = |e: &Env| {
        e.kube()
            .sim
            .request_log()
            .iter()
            .filter(|r| {
                r.method == "GET" && r.path.ends_with("/jobs") && !r.query.contains("watch")
            })
            .count()
    };
    let before = gc_lists(&env);
    env.until("six collection rounds", Duration::from_secs(30), |e| {
        gc_lists(e) >= before + 6
    })
    .await
    .unwrap();
    assert!(
        env.job_exists(&name),
        "the collector deleted a finished Job whose delivery is not settled: {:?}",
        env.job_requests(&name)
    );
    // Results flow again: the redelivery adopts the finished Job.
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    env.until("the final result", Duration::from_secs(60), |e| {
        !e.finals(t.id).is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", w1.log_tail(), w2.log_tail()));
    assert_eq!(
        env.job_created(&name),
        1,
        "the attempt ran once: {:?}",
        env.job_requests(&name)
    );
    assert!(env.job_requests(&name).contains(&("POST".into(), 409)));
    assert_eq!(env.finals(t.id)[0].outcome, Outcome::Succeeded);
    let report = env.history().check();
    assert!(report.ok(), "{report:?}");
    drop((w1, w2));
    env.cleanup().await.unwrap();
}
