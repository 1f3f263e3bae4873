//! Trace context end to end: the task message's `traceparent` becomes the
//! parent of the worker's task span, and the same trace reaches the Job's
//! annotation and the result's `traceparent` header.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sandfleet_e2e::{Env, task};
use sandfleet_sandbox::job::job_name;

const BIN: &str = env!("CARGO_BIN_EXE_sandfleet-test-worker");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_continues_from_the_message_to_the_job_and_the_result() {
    let env = Env::new("trace", BIN, true, |_| {}).await.unwrap();
    let w = env.spawn_worker("w1", |_| {}).unwrap();
    w.wait_ready(200, Duration::from_secs(30)).await.unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let t = task("echo traced");
    env.publish_with(&t, Some(&incoming)).await.unwrap();
    env.until("the final result", Duration::from_secs(30), |e| {
        !e.finals(t.id).is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.log_tail()));

    let name = job_name(t.id, 1);
    let create = env
        .kube()
        .sim
        .request_log()
        .into_iter()
        .find(|r| {
            r.method == "POST"
                && r.status == 201
                && r.body.as_ref().and_then(|b| b.pointer("/metadata/name"))
                    == Some(&serde_json::Value::String(name.clone()))
        })
        .expect("the Job's create request");
    let annotation = create
        .body
        .as_ref()
        .and_then(|b| b.pointer("/metadata/annotations/sandfleet.dev~1traceparent"))
        .and_then(|v| v.as_str())
        .expect("traceparent annotation on the Job")
        .to_owned();
    assert_eq!(
        sandfleet_telemetry::trace_id(&annotation).as_deref(),
        Some(trace_id),
        "Job annotation {annotation}"
    );
    let received = env
        .received()
        .into_iter()
        .find(|r| r.result.task_id == t.id)
        .unwrap();
    let header = received.traceparent.expect("traceparent on the result");
    assert_eq!(
        sandfleet_telemetry::trace_id(&header).as_deref(),
        Some(trace_id),
        "result header {header}"
    );
    drop(w);
    env.cleanup().await.unwrap();
}
