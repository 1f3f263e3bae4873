//! Deletion with Background, Foreground and no propagation policy; TTL after finish.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{NS, client, eventually, finished, shell_job, start};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

async fn pod_count(pods: &Api<Pod>, job: &str) -> usize {
    pods.list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .unwrap()
        .items
        .len()
}

async fn running_job(jobs: &Api<Job>, pods: &Api<Pod>, name: &str) {
    jobs.create(&PostParams::default(), &shell_job(name, "sleep 30"))
        .await
        .unwrap();
    eventually(15, "pod created", || async {
        (pod_count(pods, name).await == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn background_delete_removes_job_at_once_and_pods_shortly_after() {
    let sim = start().await;
    let c = client(&sim).await;
    let jobs: Api<Job> = Api::namespaced(c.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(c, NS);
    running_job(&jobs, &pods, "bg").await;
    let res = jobs
        .delete("bg", &DeleteParams::background())
        .await
        .unwrap();
    let status = res
        .right()
        .expect("background delete answers with a Status");
    assert_eq!(status.details.unwrap().name, "bg");
    assert!(jobs.get_opt("bg").await.unwrap().is_none());
    eventually(20, "pods garbage-collected", || async {
        (pod_count(&pods, "bg").await == 0).then_some(())
    })
    .await;
    let delete = sim
        .request_log()
        .into_iter()
        .find(|r| r.verb() == "delete")
        .unwrap();
    assert_eq!(delete.propagation_policy().as_deref(), Some("Background"));
    assert_eq!(delete.resource(), "jobs");
}

#[tokio::test]
async fn foreground_delete_keeps_the_job_until_its_pods_are_gone() {
    let sim = start().await;
    let c = client(&sim).await;
    let jobs: Api<Job> = Api::namespaced(c.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(c, NS);
    running_job(&jobs, &pods, "fg").await;
    let res = jobs
        .delete("fg", &DeleteParams::foreground())
        .await
        .unwrap();
    let job = res
        .left()
        .expect("foreground returns the terminating object");
    assert!(job.metadata.deletion_timestamp.is_some());
    assert!(
        job.metadata
            .finalizers
            .unwrap()
            .contains(&"foregroundDeletion".to_owned())
    );
    eventually(20, "job gone after its pods", || async {
        jobs.get_opt("fg").await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(pod_count(&pods, "fg").await, 0);
}

#[tokio::test]
async fn delete_without_policy_orphans_pods_with_a_warning() {
    let sim = start().await;
    let c = client(&sim).await;
    let jobs: Api<Job> = Api::namespaced(c.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(c.clone(), NS);
    running_job(&jobs, &pods, "orph").await;
    let req = axum::http::Request::delete(format!("/apis/batch/v1/namespaces/{NS}/jobs/orph"))
        .body(kube::client::Body::empty())
        .unwrap();
    let res = c.send(req).await.unwrap();
    let warning = res
        .headers()
        .get("warning")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        warning.starts_with("299 - \"child pods are preserved"),
        "{warning}"
    );
    assert!(jobs.get_opt("orph").await.unwrap().is_none());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let left = pods
        .list(&ListParams::default().labels("job-name=orph"))
        .await
        .unwrap()
        .items;
    assert_eq!(left.len(), 1, "orphaned pod is kept");
    assert!(
        left[0]
            .metadata
            .owner_references
            .as_ref()
            .is_none_or(Vec::is_empty)
    );
}

#[tokio::test]
async fn ttl_after_finished_deletes_the_job() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    let mut job = shell_job("ttl", "true");
    job.spec.as_mut().unwrap().ttl_seconds_after_finished = Some(0);
    jobs.create(&PostParams::default(), &job).await.unwrap();
    eventually(20, "ttl deletion", || async {
        jobs.get_opt("ttl").await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(sim.jobs(NS).is_empty());
}

#[tokio::test]
async fn deleting_a_running_pod_kills_it_and_counts_as_a_failure() {
    let sim = start().await;
    let c = client(&sim).await;
    let jobs: Api<Job> = Api::namespaced(c.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(c, NS);
    let mut job = shell_job("repl", "sleep 30");
    job.spec.as_mut().unwrap().backoff_limit = Some(0);
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let first = eventually(15, "running pod", || async {
        let p = pods
            .list(&ListParams::default().labels("job-name=repl"))
            .await
            .ok()?
            .items
            .into_iter()
            .next()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(p)
    })
    .await;
    let deleted = pods
        .delete(
            first.metadata.name.as_deref().unwrap(),
            &DeleteParams::default(),
        )
        .await
        .unwrap();
    let pod = deleted.left().expect("pods answer with the object");
    assert!(pod.metadata.deletion_timestamp.is_some());
    // The killed pod counts as a failure; backoffLimit 0 fails the Job (the replacement
    // created meanwhile is then deleted and counted too, as on a real cluster).
    let job = finished(&jobs, "repl").await;
    assert_eq!(
        common::condition(&job, "Failed").unwrap().1.as_deref(),
        Some("BackoffLimitExceeded")
    );
    assert!(job.status.unwrap().failed.unwrap() >= 1);
}
