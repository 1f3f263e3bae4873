//! Jobs end to end through the real kube client: the pod runs its command locally and
//! the Job ends Complete or Failed with the pod's exit code and log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{NS, client, condition, finished, shell_job, start};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, LogParams, PostParams};

async fn only_pod(pods: &Api<Pod>, job: &str) -> Pod {
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1, "one pod for {job}");
    list.items.into_iter().next().unwrap()
}

#[tokio::test]
async fn failing_command_fails_the_job_with_exit_code_and_log() {
    let sim = start().await;
    let client = client(&sim).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client, NS);

    jobs.create(
        &PostParams::default(),
        &shell_job("fails", "echo hi; exit 3"),
    )
    .await
    .unwrap();
    let job = finished(&jobs, "fails").await;
    assert_eq!(
        condition(&job, "Failed"),
        Some(("True".into(), Some("BackoffLimitExceeded".into())))
    );
    assert_eq!(
        condition(&job, "FailureTarget"),
        Some(("True".into(), Some("BackoffLimitExceeded".into())))
    );
    assert_eq!(job.status.as_ref().unwrap().failed, Some(1));

    let pod = only_pod(&pods, "fails").await;
    let status = pod.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    let terminated = status.container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(terminated.exit_code, 3);
    assert_eq!(terminated.reason.as_deref(), Some("Error"));
    let log = pods
        .logs(&pod.metadata.name.unwrap(), &LogParams::default())
        .await
        .unwrap();
    assert_eq!(log, "hi\n");
}

#[tokio::test]
async fn succeeding_command_completes_the_job() {
    let sim = start().await;
    let client = client(&sim).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    jobs.create(&PostParams::default(), &shell_job("ok", "echo done >&2"))
        .await
        .unwrap();
    let job = finished(&jobs, "ok").await;
    assert_eq!(
        condition(&job, "Complete").map(|c| c.0),
        Some("True".into())
    );
    assert_eq!(
        condition(&job, "SuccessCriteriaMet").map(|c| c.0),
        Some("True".into())
    );
    let status = job.status.unwrap();
    assert_eq!(status.succeeded, Some(1));
    assert!(status.completion_time.is_some());
    assert!(status.start_time.is_some());
    assert_eq!(status.active, None);
}
