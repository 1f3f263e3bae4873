//! Supersede and the cancel API through the gateway: a GitHub webhook for a
//! newer commit on the same branch cancels the running attempt of the older
//! one (real gateway over HTTP, real worker process, RabbitMQ, kube-sim);
//! `POST /v1/tasks/{id}/cancel` cancels the newer one and says when a task
//! already finished or is unknown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use sandfleet_e2e::Env;
use sandfleet_gateway::signature::github_signature;
use sandfleet_gateway::{BrokerSink, Gateway};
use sandfleet_proto::{Limits, Outcome, Step, TaskId};
use sandfleet_settings::{FixTemplate, GatewaySettings};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_sandfleet-test-worker");
const SECRET: &str = "supersede-secret";
const TOKEN: &str = "supersede-api-token-0123456789abcdef";

fn failed_run(commit: &str) -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crates/gateway/tests/fixtures/github/workflow_run.completed.json"
    );
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["workflow_run"]["conclusion"] = "failure".into();
    v["workflow_run"]["head_sha"] = commit.into();
    serde_json::to_vec(&v).unwrap()
}

/// True once a pod of task `id` has printed `text`.
fn printed(env: &Env, id: TaskId, text: &str) -> bool {
    let sim = env.kube();
    env.pods().iter().any(|p| {
        p.pointer("/metadata/labels/sandfleet.dev~1task-id")
            .and_then(|v| v.as_str())
            == Some(id.to_string().as_str())
            && p.pointer("/metadata/name")
                .and_then(|n| n.as_str())
                .and_then(|n| sim.sim.pod_log(&sim.namespace, n))
                .is_some_and(|log| log.contains(text))
    })
}

fn pods_of(env: &Env, id: TaskId) -> usize {
    env.pods()
        .iter()
        .filter(|p| {
            p.pointer("/metadata/labels/sandfleet.dev~1task-id")
                .and_then(|v| v.as_str())
                == Some(id.to_string().as_str())
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_for_a_newer_commit_cancels_the_running_attempt_of_the_older_one() {
    let env = Env::new("supersede", BIN, true, |_| {}).await.unwrap();
    let w = env.spawn_worker("w1", |_| {}).unwrap();
    w.wait_ready(200, Duration::from_secs(30)).await.unwrap();

    let sink = BrokerSink::new(&env.amqp, &env.topology, Limits::default())
        .await
        .unwrap();
    let settings = GatewaySettings {
        listen_addr: "127.0.0.1:0".to_owned(),
        github_secret: Some(SECRET.to_owned()),
        api_tokens: vec![TOKEN.to_owned()],
        allowed_repositories: vec!["octo-org/*".to_owned()],
        template: FixTemplate {
            // A step's output reaches the pod log when the step ends: the
            // first step's output is the partial log a cancel must keep.
            steps: vec![
                Step {
                    name: "prepare".into(),
                    run: "echo working on $SANDFLEET_COMMIT".into(),
                    timeout_secs: 60,
                    env: Default::default(),
                    continue_on_error: false,
                },
                Step {
                    name: "fix".into(),
                    run: "sleep 60".into(),
                    timeout_secs: 120,
                    env: Default::default(),
                    continue_on_error: false,
                },
            ],
            deadline_secs: 180,
            pending_timeout_secs: 30,
            ..FixTemplate::default()
        },
        ..GatewaySettings::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(Gateway::new(settings, Arc::new(sink)).serve(listener, stop.clone()));
    let http = reqwest::Client::new();
    let webhook = |delivery: &'static str, commit: &'static str| {
        let body = failed_run(commit);
        let req = http
            .post(format!("{url}/webhooks/github"))
            .header("X-GitHub-Event", "workflow_run")
            .header("X-GitHub-Delivery", delivery)
            .header(
                "X-Hub-Signature-256",
                github_signature(SECRET.as_bytes(), &body),
            )
            .header("Content-Type", "application/json")
            .body(body);
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 202);
            let v: Value = resp.json().await.unwrap();
            v["task_id"].as_str().unwrap().parse::<TaskId>().unwrap()
        }
    };
    let cancel = |id: String| {
        let req = http
            .post(format!("{url}/v1/tasks/{id}/cancel"))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({ "reason": "operator stop", "by": "alice" }));
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };

    let older = webhook("d-older", "1111111111111111111111111111111111111111").await;
    env.until("the older attempt working", Duration::from_secs(30), |e| {
        printed(e, older, "working on 1111111")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.log_tail()));

    let newer = webhook("d-newer", "2222222222222222222222222222222222222222").await;
    env.until("the older task final", Duration::from_secs(30), |e| {
        !e.finals(older).is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", w.log_tail()));
    let finals = env.finals(older);
    assert!(
        finals.iter().all(|r| r.outcome == Outcome::Cancelled),
        "{finals:#?}"
    );
    let info = finals[0].cancellation.clone().unwrap();
    assert_eq!(info.superseded_by, Some(newer));
    assert!(
        finals[0].log_tail.contains("working on 1111111"),
        "the partial log is kept: {:?}",
        finals[0].log_tail
    );
    env.until("the older pod gone", Duration::from_secs(10), |e| {
        pods_of(e, older) == 0
    })
    .await
    .unwrap();
    env.until("the newer attempt running", Duration::from_secs(30), |e| {
        pods_of(e, newer) > 0
    })
    .await
    .unwrap();
    assert!(
        env.finals(newer).is_empty(),
        "the newer task was cancelled too"
    );

    // The cancel API: the newer one now, by an operator.
    let (status, body) = cancel(newer.to_string()).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "recorded");
    env.until("the newer task final", Duration::from_secs(30), |e| {
        !e.finals(newer).is_empty()
    })
    .await
    .unwrap();
    let r = &env.finals(newer)[0];
    assert_eq!(r.outcome, Outcome::Cancelled);
    assert_eq!(
        r.error.as_deref(),
        Some("cancelled by alice: operator stop")
    );
    // A finished task and an unknown one say so.
    let (status, body) = cancel(older.to_string()).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (409, Some("already_finished")),
        "{body}"
    );
    assert_eq!(body["outcome"], "cancelled");
    let (status, body) = cancel(uuid::Uuid::new_v4().to_string()).await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = cancel("not-a-task".into()).await;
    assert_eq!(status, 404);
    env.until("no pods left", Duration::from_secs(10), |e| {
        e.pods().is_empty()
    })
    .await
    .unwrap();
    stop.cancel();
    drop(w);
    env.cleanup().await.unwrap();
}
