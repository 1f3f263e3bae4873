//! The request log gives the (verb, resource) pairs a client used, e.g. to check an
//! RBAC Role against what the code really does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::{NS, client, finished, shell_job, start};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};

#[tokio::test]
async fn records_verbs_resources_bodies_and_statuses() {
    let sim = start().await;
    let c = client(&sim).await;
    let jobs: Api<Job> = Api::namespaced(c.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(c, NS);
    jobs.create(&PostParams::default(), &shell_job("rl", "echo x"))
        .await
        .unwrap();
    finished(&jobs, "rl").await;
    let pod = pods
        .list(&ListParams::default().labels("job-name=rl"))
        .await
        .unwrap()
        .items
        .remove(0);
    let name = pod.metadata.name.unwrap();
    pods.get(&name).await.unwrap();
    pods.logs(&name, &LogParams::default()).await.unwrap();
    jobs.delete("rl", &DeleteParams::background())
        .await
        .unwrap();

    let log = sim.request_log();
    let pairs: BTreeSet<(String, String)> = log
        .iter()
        .filter(|r| !r.resource().is_empty())
        .map(|r| (r.verb().to_owned(), r.resource().to_owned()))
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("create", "jobs"),
        ("get", "jobs"),
        ("list", "pods"),
        ("get", "pods"),
        ("get", "pods/log"),
        ("delete", "jobs"),
    ]
    .into_iter()
    .map(|(v, r)| (v.to_owned(), r.to_owned()))
    .collect();
    assert_eq!(pairs, expected);

    let create = log.iter().find(|r| r.verb() == "create").unwrap();
    assert_eq!(create.status, 201);
    assert_eq!(create.namespace(), Some(NS));
    assert_eq!(create.body.as_ref().unwrap()["metadata"]["name"], "rl");
    let delete = log.iter().find(|r| r.verb() == "delete").unwrap();
    assert_eq!(delete.propagation_policy().as_deref(), Some("Background"));
    assert_eq!(delete.name(), Some("rl"));
}
