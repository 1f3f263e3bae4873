//! How many Jobs the sim carries from create to Complete: a sanity bound so that
//! benchmarks and soak tests built on it measure the code under test, not the fake.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{NS, client, shell_job};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, PostParams};
use sandfleet_kube_sim::{KubeSim, PodScript, SimOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_instant_jobs_complete_quickly() {
    let sim = KubeSim::start(SimOptions {
        pod_start_delay: Duration::ZERO,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    sim.script_pods("", PodScript::Instant { exit_code: 0 });
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    let n = 200;
    let started = Instant::now();
    let creates = (0..n).map(|i| {
        let jobs = jobs.clone();
        async move {
            jobs.create(&PostParams::default(), &shell_job(&format!("t{i}"), "true"))
                .await
                .unwrap();
        }
    });
    futures::future::join_all(creates).await;
    let created = started.elapsed();
    let done = common::eventually(60, "all jobs complete", || async {
        let list = jobs.list(&ListParams::default()).await.ok()?;
        let complete = list
            .items
            .iter()
            .filter(|j| common::condition(j, "Complete").is_some_and(|c| c.0 == "True"))
            .count();
        (complete == n).then(|| started.elapsed())
    })
    .await;
    eprintln!(
        "kube-sim: {n} jobs created in {created:?}, all Complete after {done:?} ({:.0} jobs/s)",
        n as f64 / done.as_secs_f64()
    );
    assert!(done < Duration::from_secs(60));
}
