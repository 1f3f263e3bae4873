//! The simulated Kueue: suspended Jobs with a queue label are admitted against
//! the quota in FIFO order, a suspended Job runs nothing, and a preempted Job
//! loses its pod, is not failed, and runs again once re-admitted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use sandfleet_kube_sim::{KubeSim, SimOptions};
use serde_json::Value;

const QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";

async fn sim(quota: usize) -> KubeSim {
    KubeSim::start(SimOptions {
        kueue_quota: Some(quota),
        ..SimOptions::default()
    })
    .await
    .unwrap()
}

fn queued_job(name: &str, script: &str, queue: Option<&str>) -> Job {
    let mut job = shell_job(name, script);
    if let Some(q) = queue {
        job.metadata
            .labels
            .get_or_insert_default()
            .insert(QUEUE_LABEL.into(), q.into());
    }
    job.spec.as_mut().unwrap().suspend = Some(true);
    job
}

fn suspended(j: &Value) -> bool {
    j.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true)
}

fn condition_status(j: &Value, ty: &str) -> Option<String> {
    j.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == ty)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn admits_at_most_the_quota_in_arrival_order_and_the_rest_wait_without_pods() {
    let sim = sim(2).await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    // Each runs until its marker file appears, so the admitted ones hold the quota.
    let dir = tempfile::tempdir().unwrap();
    for i in 0..5 {
        let script = format!(
            "while [ ! -e {}/go-{i} ]; do sleep 0.02; done",
            dir.path().display()
        );
        jobs.create(
            &PostParams::default(),
            &queued_job(&format!("q-{i}"), &script, Some("team")),
        )
        .await
        .unwrap();
    }
    // An unlabelled suspended Job is not Kueue's: it stays suspended.
    jobs.create(&PostParams::default(), &queued_job("plain", "true", None))
        .await
        .unwrap();

    let admitted = |sim: &KubeSim| -> Vec<String> {
        let mut v: Vec<String> = sim
            .jobs(NS)
            .iter()
            .filter(|j| !suspended(j))
            .map(|j| j["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    eventually(10, "two pods", || async {
        (sim.pods(NS).len() == 2).then_some(())
    })
    .await;
    assert_eq!(admitted(&sim), ["q-0", "q-1"], "FIFO: the first two");
    let waiting = sim.jobs(NS);
    for j in waiting.iter().filter(|j| suspended(j)) {
        let name = j["metadata"]["name"].as_str().unwrap();
        assert_eq!(
            condition_status(j, "Suspended").as_deref(),
            Some("True"),
            "{name} carries Suspended=True"
        );
        assert!(
            j.pointer("/status/startTime").is_none(),
            "{name} has not started"
        );
    }
    let pods_of = |sim: &KubeSim| -> Vec<String> {
        sim.pods(NS)
            .iter()
            .map(|p| p["metadata"]["labels"]["job"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(pods_of(&sim).iter().all(|j| j == "q-0" || j == "q-1"));

    // One finishes: the next in line is admitted, never more than two.
    std::fs::write(dir.path().join("go-0"), "").unwrap();
    eventually(10, "q-2 admitted", || async {
        admitted(&sim).contains(&"q-2".to_owned()).then_some(())
    })
    .await;
    let running = sim
        .jobs(NS)
        .iter()
        .filter(|j| !suspended(j) && condition_status(j, "Complete").is_none())
        .count();
    assert_eq!(running, 2);
    let q2 = jobs.get("q-2").await.unwrap();
    assert_eq!(
        condition(&q2, "Suspended").map(|c| c.0).as_deref(),
        Some("False"),
        "resumed Jobs say so"
    );
    assert!(q2.status.unwrap().start_time.is_some());
    for i in 1..5 {
        std::fs::write(dir.path().join(format!("go-{i}")), "").unwrap();
    }
    eventually(20, "all five complete", || async {
        let done = sim
            .jobs(NS)
            .iter()
            .filter(|j| condition_status(j, "Complete").as_deref() == Some("True"))
            .count();
        (done == 5).then_some(())
    })
    .await;
    assert!(suspended(
        &sim.jobs(NS)
            .into_iter()
            .find(|j| j["metadata"]["name"] == "plain")
            .unwrap()
    ));
    sim.stop().await;
}

#[tokio::test]
async fn a_preempted_job_loses_its_pod_waits_and_runs_again_without_failing() {
    let sim = sim(1).await;
    let client = client(&sim).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client, NS);
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "echo run >> {d}/runs; while [ ! -e {d}/go ]; do sleep 0.02; done",
        d = dir.path().display()
    );
    jobs.create(
        &PostParams::default(),
        &queued_job("victim", &script, Some("team")),
    )
    .await
    .unwrap();
    jobs.create(
        &PostParams::default(),
        &queued_job("other", "true", Some("team")),
    )
    .await
    .unwrap();
    let first = eventually(10, "the victim's pod", || async {
        let list = pods
            .list(&ListParams::default().labels("job=victim"))
            .await
            .unwrap();
        list.items.into_iter().next().and_then(|p| p.metadata.name)
    })
    .await;
    eventually(10, "the first run", || async {
        std::fs::read_to_string(dir.path().join("runs")).ok()
    })
    .await;

    assert!(sim.kueue_preempt(NS, "victim"));
    // The other Job takes the slot; the victim waits, suspended, with no pod,
    // and its stopped pod is not counted as a failure.
    eventually(10, "the other job completes", || async {
        let j = jobs.get("other").await.unwrap();
        condition(&j, "Complete").is_some().then_some(())
    })
    .await;
    let v = eventually(10, "the victim re-admitted with a new pod", || async {
        let list = pods
            .list(&ListParams::default().labels("job=victim"))
            .await
            .unwrap();
        list.items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .find(|n| *n != first)
    })
    .await;
    assert_ne!(v, first);
    std::fs::write(dir.path().join("go"), "").unwrap();
    let done = eventually(10, "the victim completes", || async {
        let j = jobs.get("victim").await.unwrap();
        condition(&j, "Complete").is_some().then_some(j)
    })
    .await;
    let status = done.status.unwrap();
    assert_eq!(status.failed.unwrap_or(0), 0, "preemption is not a failure");
    assert_eq!(status.succeeded, Some(1));
    let runs = std::fs::read_to_string(dir.path().join("runs")).unwrap();
    assert_eq!(runs.lines().count(), 2, "it ran again after re-admission");
    sim.stop().await;
}
