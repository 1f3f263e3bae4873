//! CRUD, selectors, defaulting, validation and Status errors through the kube client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{NS, client, shell_job, start};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn api_error(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn labelled(name: &str, labels: &[(&str, &str)]) -> Job {
    let mut j = shell_job(name, "true");
    j.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    j
}

async fn names(jobs: &Api<Job>, lp: &ListParams) -> Vec<String> {
    let mut n: Vec<String> = jobs
        .list(lp)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|j| j.metadata.name)
        .collect();
    n.sort();
    n
}

#[tokio::test]
async fn create_applies_server_side_defaults() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    let mut job = shell_job("defaults", "true");
    job.spec.as_mut().unwrap().backoff_limit = None;
    let created = jobs.create(&PostParams::default(), &job).await.unwrap();
    let spec = created.spec.unwrap();
    assert_eq!(spec.backoff_limit, Some(6));
    assert_eq!(spec.completions, Some(1));
    assert_eq!(spec.parallelism, Some(1));
    assert_eq!(spec.completion_mode.as_deref(), Some("NonIndexed"));
    assert_eq!(spec.suspend, Some(false));
    let uid = created.metadata.uid.unwrap();
    let selector = spec.selector.unwrap().match_labels.unwrap();
    assert_eq!(
        selector.get("batch.kubernetes.io/controller-uid"),
        Some(&uid)
    );
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    assert_eq!(labels.get("job-name").map(String::as_str), Some("defaults"));
    assert_eq!(labels.get("controller-uid"), Some(&uid));
    let pod_spec = spec.template.spec.unwrap();
    assert_eq!(pod_spec.termination_grace_period_seconds, Some(30));
    assert_eq!(pod_spec.dns_policy.as_deref(), Some("ClusterFirst"));
    let c = &pod_spec.containers[0];
    assert_eq!(
        c.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.resource_version.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
}

#[tokio::test]
async fn invalid_jobs_are_rejected_with_422_causes() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    let long = "a".repeat(64);
    let err = api_error(
        jobs.create(&PostParams::default(), &shell_job(&long, "true"))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    assert!(
        err.message.contains("must be no more than 63 characters"),
        "{}",
        err.message
    );
    let details = err.details.unwrap();
    assert_eq!(details.kind, "Job");
    assert_eq!(details.group, "batch");
    assert!(details.causes.iter().any(|c| c.field == "metadata.name"));

    let mut always = shell_job("always", "true");
    always
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .restart_policy = Some("Always".into());
    let err = api_error(
        jobs.create(&PostParams::default(), &always)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 422);
    assert!(
        err.details
            .unwrap()
            .causes
            .iter()
            .any(|c| c.field == "spec.template.spec.restartPolicy")
    );
}

#[tokio::test]
async fn crud_conflicts_and_not_found_use_status_errors() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    jobs.create(&PostParams::default(), &shell_job("a", "true"))
        .await
        .unwrap();
    let err = api_error(
        jobs.create(&PostParams::default(), &shell_job("a", "true"))
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "AlreadyExists"));

    let err = api_error(jobs.get("missing").await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (404, "NotFound"));
    assert_eq!(err.message, "jobs.batch \"missing\" not found");
    let d = err.details.unwrap();
    assert_eq!(
        (d.name.as_str(), d.group.as_str(), d.kind.as_str()),
        ("missing", "batch", "jobs")
    );

    // generateName gets 5 random characters.
    let mut generated = shell_job("", "true");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let g = jobs
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    let gname = g.metadata.name.unwrap();
    assert!(gname.starts_with("gen-") && gname.len() == 9, "{gname}");

    // Merge patch of labels, JSON patch of an annotation, status patch.
    let patched = jobs
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "x"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched
            .metadata
            .labels
            .unwrap()
            .get("tier")
            .map(String::as_str),
        Some("x")
    );
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/metadata/annotations", "value": {"note": "y"}}
    ]))
    .unwrap();
    let patched = jobs
        .patch("a", &PatchParams::default(), &Patch::<()>::Json(ops))
        .await
        .unwrap();
    assert_eq!(
        patched
            .metadata
            .annotations
            .unwrap()
            .get("note")
            .map(String::as_str),
        Some("y")
    );

    // A stale resourceVersion conflicts.
    let mut stale = shell_job("a", "true");
    stale.metadata.resource_version = Some("1".into());
    let err = api_error(
        jobs.replace("a", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));

    // Status writes go through the status subresource only.
    let st = jobs
        .patch_status(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ready": 7}})),
        )
        .await
        .unwrap();
    assert_eq!(st.status.unwrap().ready, Some(7));
    let ignored = jobs
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ready": 9}})),
        )
        .await
        .unwrap();
    assert_ne!(ignored.status.unwrap().ready, Some(9));
}

#[tokio::test]
async fn label_selectors_support_the_full_grammar_through_kube() {
    let sim = start().await;
    let jobs: Api<Job> = Api::namespaced(client(&sim).await, NS);
    for (name, labels) in [
        ("s1", vec![("app", "sandbox"), ("tier", "a")]),
        (
            "s2",
            vec![("app", "sandbox"), ("tier", "b"), ("legacy", "1")],
        ),
        ("s3", vec![("app", "other")]),
    ] {
        jobs.create(&PostParams::default(), &labelled(name, &labels))
            .await
            .unwrap();
    }
    let lp = |s: &str| ListParams::default().labels(s);
    assert_eq!(names(&jobs, &lp("app in (sandbox)")).await, ["s1", "s2"]);
    assert_eq!(names(&jobs, &lp("app notin (sandbox)")).await, ["s3"]);
    assert_eq!(names(&jobs, &lp("app=sandbox,!legacy")).await, ["s1"]);
    assert_eq!(names(&jobs, &lp("legacy")).await, ["s2"]);
    assert_eq!(names(&jobs, &lp("tier!=a")).await, ["s2", "s3"]);
    assert_eq!(names(&jobs, &lp("app==other")).await, ["s3"]);
    assert_eq!(
        names(&jobs, &ListParams::default().fields("metadata.name=s2")).await,
        ["s2"]
    );
    let err = api_error(jobs.list(&lp("app in (sandbox")).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (400, "BadRequest"));

    // Pagination: limit + continue, and a collection resourceVersion.
    let page = jobs.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    let token = page.metadata.continue_.clone().unwrap();
    let rest = jobs
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert!(
        page.metadata
            .resource_version
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 1
    );

    // All-namespaces list.
    let all: Api<Job> = Api::all(client(&sim).await);
    assert_eq!(all.list(&lp("app=sandbox")).await.unwrap().items.len(), 2);
}

#[tokio::test]
async fn version_endpoint_answers() {
    let sim = start().await;
    let v = client(&sim).await.apiserver_version().await.unwrap();
    assert_eq!(v.major, "1");
}
