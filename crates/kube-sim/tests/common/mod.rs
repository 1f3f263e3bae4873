//! Helpers shared by the integration tests: a kube client for a sim, Job builders and
//! polling with a deadline.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use sandfleet_kube_sim::{KubeSim, SimOptions};
use serde_json::json;

pub const NS: &str = "sim-test";

pub async fn start() -> KubeSim {
    KubeSim::start(SimOptions::default())
        .await
        .expect("start kube-sim")
}

/// A client through the production path: kubeconfig → Config → Client.
pub async fn client(sim: &KubeSim) -> Client {
    client_with(sim, true).await
}

/// A client; `retry: false` turns off kube's built-in 429/503/504 retries.
pub async fn client_with(sim: &KubeSim, retry: bool) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&sim.kubeconfig_yaml(NS)).expect("kubeconfig parses");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config from kubeconfig");
    config.default_retry = retry;
    Client::try_from(config).expect("client")
}

/// A Job running `script` with `sh -c`.
pub fn shell_job(name: &str, script: &str) -> Job {
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app": "sim-test"}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": "sim-test", "job": name}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "main",
                        "image": "busybox:1.36",
                        "command": ["sh", "-c", script],
                    }],
                },
            },
        },
    }))
    .expect("job json")
}

/// Polls `f` every 20 ms until it returns `Some`, panicking after `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The status of a condition type on a Job, if present.
pub fn condition(job: &Job, ty: &str) -> Option<(String, Option<String>)> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == ty)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Waits until the Job has a `Complete` or `Failed` condition and returns it.
pub async fn finished(jobs: &kube::Api<Job>, name: &str) -> Job {
    eventually(30, "job to finish", || async {
        let j = jobs.get(name).await.ok()?;
        let done = condition(&j, "Complete").is_some_and(|c| c.0 == "True")
            || condition(&j, "Failed").is_some_and(|c| c.0 == "True");
        done.then_some(j)
    })
    .await
}

/// Starts a Job `name` with this one container (JSON), waits until its pod
/// runs and returns the pod's name.
pub async fn running_pod_with(sim: &KubeSim, name: &str, container: serde_json::Value) -> String {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams, PostParams};

    let c = client(sim).await;
    let job: Job = serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"labels": {"running-pod-test": name}},
            "spec": {"restartPolicy": "Never", "containers": [container]},
        }},
    }))
    .unwrap();
    Api::<Job>::namespaced(c.clone(), NS)
        .create(&PostParams::default(), &job)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(c, NS);
    let sel = format!("running-pod-test={name}");
    eventually(10, "the pod runs", || {
        let pods = pods.clone();
        let sel = sel.clone();
        async move {
            let list = pods.list(&ListParams::default().labels(&sel)).await.ok()?;
            list.items.into_iter().find_map(|p| {
                let running = p
                    .status
                    .as_ref()?
                    .container_statuses
                    .as_ref()?
                    .iter()
                    .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
                running.then(|| p.metadata.name.clone()).flatten()
            })
        }
    })
    .await
}
