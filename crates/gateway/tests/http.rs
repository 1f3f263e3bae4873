//! The gateway over HTTP: a real server on 127.0.0.1:0, real GitHub and
//! GitLab payloads (tests/fixtures), and the real RabbitMQ on 127.0.0.1:5672
//! with a per-test topology prefix. RabbitMQ must be running; these tests
//! fail (never skip) when it is not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sandfleet_amqp::{Amqp, Consumer, ConsumerOptions, Delivery, Topology};
use sandfleet_gateway::signature::github_signature;
use sandfleet_gateway::{BrokerSink, Gateway};
use sandfleet_proto::{Limits, Task};
use sandfleet_settings::{AmqpSettings, GatewaySettings, TopologySettings};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "It's a Secret to Everybody";
const GITLAB_TOKEN: &str = "gl-token-123";
const API_TOKEN: &str = "api-token-456";

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The fixture with the JSON string at `pointer` set to `value`.
fn with(name: &str, pointer: &str, value: &str) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&fixture(name)).unwrap();
    *v.pointer_mut(pointer).unwrap() = Value::String(value.to_owned());
    serde_json::to_vec(&v).unwrap()
}

/// A TCP proxy in front of RabbitMQ that the test can cut: "the broker is
/// down" without touching the shared server.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    cut: CancellationToken,
}

impl Proxy {
    async fn start() -> Proxy {
        Proxy::start_with(true).await
    }

    async fn start_with(up: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(up));
        let cut = CancellationToken::new();
        let (up2, cut2) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let cut = cut2.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect("127.0.0.1:5672").await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Proxy { port, up, cut }
    }

    /// Lets new connections through (after `start` with `up = false`).
    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Drops every proxied connection and refuses new ones.
    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.cancel();
    }
}

struct Harness {
    settings: AmqpSettings,
    url: String,
    http: reqwest::Client,
    amqp: Amqp,
    topology: Topology,
    stop: CancellationToken,
    proxy: Proxy,
}

impl Harness {
    async fn start() -> Harness {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let proxy = Proxy::start().await;
        let direct = AmqpSettings {
            connection_name: Some(format!("sandfleet-gwtest-{suffix}")),
            connect_timeout_secs: 2,
            reconnect_max_delay_secs: 1,
            ..AmqpSettings::default()
        };
        let amqp = Amqp::connect(&direct, "gateway-test")
            .await
            .unwrap_or_else(|e| {
                panic!("RabbitMQ must be running on 127.0.0.1:5672 for the gateway tests: {e}")
            });
        let topology = Topology::new(&TopologySettings {
            prefix: format!("sf-gwtest-{suffix}"),
            ..TopologySettings::default()
        });
        topology.apply(&amqp).await.unwrap();
        // The gateway's own connection goes through the proxy, so a test can
        // take the broker away from it alone.
        let proxied = AmqpSettings {
            url: format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port),
            connection_name: Some(format!("sandfleet-gwtest-{suffix}-gateway")),
            ..direct.clone()
        };
        let gw_amqp = Amqp::connect(&proxied, "gateway").await.unwrap();
        let sink = BrokerSink::new(&gw_amqp, &topology, Limits::default())
            .await
            .unwrap();
        let settings = GatewaySettings {
            listen_addr: "127.0.0.1:0".to_owned(),
            github_secret: Some(SECRET.to_owned()),
            gitlab_token: Some(GITLAB_TOKEN.to_owned()),
            api_tokens: vec![API_TOKEN.to_owned()],
            allowed_repositories: vec![
                "octo-org/*".to_owned(),
                "Codertocat/Hello-World".to_owned(),
                "gitlab-org/gitlab-test".to_owned(),
            ],
            max_body_bytes: 64 * 1024,
            ..GatewaySettings::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        tokio::spawn(Gateway::new(settings, Arc::new(sink)).serve(listener, stop.clone()));
        Harness {
            settings: direct,
            url,
            http: reqwest::Client::new(),
            amqp,
            topology,
            stop,
            proxy,
        }
    }

    async fn github(
        &self,
        event: &str,
        delivery: &str,
        body: Vec<u8>,
        secret: &str,
    ) -> (u16, Value) {
        let sig = github_signature(secret.as_bytes(), &body);
        self.github_signed(event, delivery, body, &sig).await
    }

    async fn github_signed(
        &self,
        event: &str,
        delivery: &str,
        body: Vec<u8>,
        sig: &str,
    ) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/webhooks/github", self.url))
            .header("X-GitHub-Event", event)
            .header("X-GitHub-Delivery", delivery)
            .header("X-Hub-Signature-256", sig)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn gitlab(&self, token: &str, body: Vec<u8>) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/webhooks/gitlab", self.url))
            .header("X-Gitlab-Event", "Pipeline Hook")
            .header("X-Gitlab-Token", token)
            .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Every message now in the task queue (consumed and acked).
    async fn drain_tasks(&self) -> Vec<(Task, Delivery)> {
        let n = self
            .amqp
            .queue_depth(&self.topology.tasks_queue)
            .await
            .unwrap() as usize;
        let mut out = Vec::new();
        if n == 0 {
            return out;
        }
        let mut c = Consumer::start(
            &self.amqp,
            ConsumerOptions::new(&self.topology.tasks_queue, 100),
        )
        .await
        .unwrap();
        while out.len() < n {
            let d = tokio::time::timeout(Duration::from_secs(5), c.next_delivery())
                .await
                .unwrap()
                .unwrap();
            d.ack().await.unwrap();
            out.push((serde_json::from_slice(d.body()).unwrap(), d));
        }
        c.cancel();
        out
    }

    async fn finish(self) {
        // Cleanup happens in Drop, which also runs when an assertion failed.
        drop(self);
    }
}

impl Drop for Harness {
    /// Deletes the test's topology, also after a failed assertion: on a
    /// fresh thread and runtime, since this one may be unwinding.
    fn drop(&mut self) {
        self.stop.cancel();
        let settings = self.settings.clone();
        let topology = self.topology.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Runtime::new() else {
                return;
            };
            rt.block_on(async {
                if let Ok(amqp) = Amqp::connect(&settings, "gateway-test-cleanup").await {
                    let _ = topology.delete(&amqp).await;
                    amqp.close();
                }
            });
        })
        .join();
    }
}

/// A valid task for the API, with no event values.
fn api_task() -> Task {
    Task::fix_attempt(
        sandfleet_proto::Source {
            provider: sandfleet_proto::Provider::Api,
            repository: "octo-org/octo-repo".to_owned(),
            commit: "3484a3fb816e0859fd6e1cea078d76385ff50625".to_owned(),
            git_ref: None,
            ci_run_id: None,
            pull_request: None,
            url: None,
        },
        sandfleet_proto::SandboxSpec {
            image: "docker.io/library/alpine:3.20".to_owned(),
            resources: Default::default(),
            env: Default::default(),
            deadline_secs: 600,
            pending_timeout_secs: 300,
        },
    )
    .with_step("test", "make test", 300)
}

fn task_id(body: &Value) -> String {
    body["task_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no task_id in {body}"))
        .to_owned()
}

#[tokio::test]
async fn failed_workflow_run_becomes_one_confirmed_task_with_event_values_in_env() {
    let h = Harness::start().await;
    let body = with(
        "github/workflow_run.completed.json",
        "/workflow_run/conclusion",
        "failure",
    );
    let (status, resp) = h.github("workflow_run", "delivery-1", body, SECRET).await;
    assert_eq!(status, 202, "{resp}");
    let id = task_id(&resp);
    let tasks = h.drain_tasks().await;
    assert_eq!(tasks.len(), 1);
    let (task, delivery) = &tasks[0];
    assert_eq!(task.id.to_string(), id);
    assert_eq!(delivery.message_id(), Some(id.as_str()));
    assert_eq!(delivery.idempotency_key(), Some("github:delivery-1"));
    assert_eq!(task.idempotency_key, "github:delivery-1");
    assert_eq!(task.source.repository, "octo-org/octo-repo");
    let env = &task.sandbox.env;
    assert_eq!(env["SANDFLEET_REPOSITORY"], "octo-org/octo-repo");
    assert_eq!(
        env["SANDFLEET_COMMIT"],
        "3484a3fb816e0859fd6e1cea078d76385ff50625"
    );
    assert_eq!(env["SANDFLEET_REF"], "master");
    assert_eq!(
        env["SANDFLEET_CLONE_URL"],
        "https://github.com/octo-org/octo-repo.git"
    );
    for step in &task.steps {
        assert!(
            !step.run.contains("3484a3fb"),
            "event values never reach a command: {}",
            step.run
        );
    }
    let metrics = h
        .http
        .get(format!("{}/metrics", h.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("sandfleet_gateway_tasks_enqueued_total{provider=\"github\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "sandfleet_gateway_requests_total{route=\"/webhooks/github\",status=\"202\"} 1"
        ),
        "{metrics}"
    );
    h.finish().await;
}

#[tokio::test]
async fn failed_check_suite_and_timed_out_run_become_tasks() {
    let h = Harness::start().await;
    let body = with(
        "github/check_suite.completed.json",
        "/check_suite/conclusion",
        "failure",
    );
    let (status, resp) = h.github("check_suite", "cs-1", body, SECRET).await;
    assert_eq!(status, 202, "{resp}");
    let body = with(
        "github/workflow_run.completed.with-pull-requests.json",
        "/workflow_run/conclusion",
        "timed_out",
    );
    let (status, resp) = h.github("workflow_run", "wr-timeout", body, SECRET).await;
    assert_eq!(status, 202, "{resp}");
    let tasks = h.drain_tasks().await;
    let repos: Vec<_> = tasks
        .iter()
        .map(|(t, _)| t.source.repository.as_str())
        .collect();
    assert_eq!(repos, ["Codertocat/Hello-World", "octo-org/octo-repo"]);
    assert!(tasks[1].0.source.pull_request.is_some());
    h.finish().await;
}

#[tokio::test]
async fn bad_signatures_are_401_and_enqueue_nothing() {
    let h = Harness::start().await;
    let body = with(
        "github/workflow_run.completed.json",
        "/workflow_run/conclusion",
        "failure",
    );
    // Signed, then tampered with.
    let sig = github_signature(SECRET.as_bytes(), &body);
    let mut tampered = body.clone();
    let pos = tampered.iter().position(|b| *b == b'3').unwrap();
    tampered[pos] = b'4';
    let (status, resp) = h.github_signed("workflow_run", "t-1", tampered, &sig).await;
    assert_eq!(status, 401, "{resp}");
    // Signed with the wrong secret.
    let (status, _) = h
        .github("workflow_run", "t-2", body.clone(), "not the secret")
        .await;
    assert_eq!(status, 401);
    // No signature at all.
    let resp = h
        .http
        .post(format!("{}/webhooks/github", h.url))
        .header("X-GitHub-Event", "workflow_run")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    // GitLab with the wrong token.
    let gl = with(
        "gitlab/pipeline.json",
        "/object_attributes/status",
        "failed",
    );
    let (status, _) = h.gitlab("wrong-token", gl).await;
    assert_eq!(status, 401);
    assert!(h.drain_tasks().await.is_empty(), "nothing may be enqueued");
    h.finish().await;
}

#[tokio::test]
async fn github_documented_test_vector_passes_the_signature_check_over_http() {
    let h = Harness::start().await;
    // GitHub's documented vector: secret "It's a Secret to Everybody",
    // payload "Hello, World!".
    let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
    let (status, resp) = h
        .github_signed("ping", "vector", b"Hello, World!".to_vec(), sig)
        .await;
    // Authenticated (not 401); the body is not a JSON ping, so 400 with the reason.
    assert_eq!(status, 400, "{resp}");
    assert!(
        resp["error"].as_str().unwrap().contains("malformed"),
        "{resp}"
    );
    let (status, _) = h
        .github_signed("ping", "vector", b"Hello, World?".to_vec(), sig)
        .await;
    assert_eq!(status, 401);
    h.finish().await;
}

#[tokio::test]
async fn duplicate_delivery_enqueues_one_task() {
    let h = Harness::start().await;
    let body = with(
        "github/workflow_run.completed.json",
        "/workflow_run/conclusion",
        "failure",
    );
    let (s1, r1) = h
        .github("workflow_run", "dup-1", body.clone(), SECRET)
        .await;
    let (s2, r2) = h
        .github("workflow_run", "dup-1", body.clone(), SECRET)
        .await;
    assert_eq!((s1, s2), (202, 202), "{r1} {r2}");
    assert_eq!(
        task_id(&r1),
        task_id(&r2),
        "the duplicate answers with the first task's id"
    );
    assert_eq!(r2["status"], "duplicate");
    let (s3, r3) = h.github("workflow_run", "dup-2", body, SECRET).await;
    assert_eq!(s3, 202);
    assert_ne!(
        task_id(&r3),
        task_id(&r1),
        "another delivery is another task"
    );
    assert_eq!(h.drain_tasks().await.len(), 2);
    h.finish().await;
}

#[tokio::test]
async fn ping_successes_and_unlisted_repositories_are_acknowledged_and_ignored() {
    let h = Harness::start().await;
    let (status, resp) = h
        .github("ping", "p-1", fixture("github/ping.json"), SECRET)
        .await;
    assert_eq!((status, resp["status"].as_str()), (200, Some("pong")));
    let (status, resp) = h
        .github(
            "workflow_run",
            "ok-1",
            fixture("github/workflow_run.completed.json"),
            SECRET,
        )
        .await;
    assert_eq!((status, resp["status"].as_str()), (200, Some("ignored")));
    assert!(
        resp["reason"].as_str().unwrap().contains("success"),
        "{resp}"
    );
    let (status, resp) = h.github("push", "push-1", b"{}".to_vec(), SECRET).await;
    assert_eq!((status, resp["status"].as_str()), (200, Some("ignored")));
    let mut v: Value = serde_json::from_slice(&with(
        "github/workflow_run.completed.json",
        "/workflow_run/conclusion",
        "failure",
    ))
    .unwrap();
    v["repository"]["full_name"] = "evil-org/repo".into();
    let (status, resp) = h
        .github(
            "workflow_run",
            "unlisted",
            serde_json::to_vec(&v).unwrap(),
            SECRET,
        )
        .await;
    assert_eq!((status, resp["status"].as_str()), (200, Some("ignored")));
    assert!(
        resp["reason"]
            .as_str()
            .unwrap()
            .contains("allowed_repositories"),
        "{resp}"
    );
    let (status, _) = h
        .gitlab(GITLAB_TOKEN, fixture("gitlab/pipeline.json"))
        .await;
    assert_eq!(status, 200, "a successful pipeline is ignored");
    assert!(h.drain_tasks().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn failed_gitlab_pipeline_becomes_a_task() {
    let h = Harness::start().await;
    let body = with(
        "gitlab/pipeline.json",
        "/object_attributes/status",
        "failed",
    );
    let (status, resp) = h.gitlab(GITLAB_TOKEN, body).await;
    assert_eq!(status, 202, "{resp}");
    let tasks = h.drain_tasks().await;
    assert_eq!(tasks.len(), 1);
    let t = &tasks[0].0;
    assert_eq!(t.source.repository, "gitlab-org/gitlab-test");
    assert_eq!(
        t.sandbox.env["SANDFLEET_COMMIT"],
        "bcbb5ec396a2c0f828686f14fac9b80b780504f2"
    );
    assert_eq!(
        t.sandbox.env["SANDFLEET_CLONE_URL"],
        "http://192.168.64.1:3005/gitlab-org/gitlab-test.git"
    );
    h.finish().await;
}

#[tokio::test]
async fn oversize_and_malformed_bodies_are_refused_with_a_reason() {
    let h = Harness::start().await;
    let big = vec![b' '; 65 * 1024];
    let (status, _) = h.github("workflow_run", "big", big, SECRET).await;
    assert_eq!(status, 413);
    let (status, resp) = h
        .github(
            "workflow_run",
            "bad",
            b"{\"action\": \"completed\"}".to_vec(),
            SECRET,
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        resp["error"].as_str().unwrap().contains("workflow_run"),
        "{resp}"
    );
    assert!(h.drain_tasks().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn task_api_takes_a_task_with_a_bearer_token() {
    let h = Harness::start().await;
    let task = api_task();
    let post = |token: &str, body: Vec<u8>| {
        h.http
            .post(format!("{}/v1/tasks", h.url))
            .bearer_auth(token)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
    };
    let resp = post(API_TOKEN, serde_json::to_vec(&task).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(task_id(&body), task.id.to_string());
    let resp = post("wrong", serde_json::to_vec(&task).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let mut invalid = task.clone();
    invalid.id = uuid::Uuid::now_v7();
    invalid.idempotency_key = "another".to_owned();
    invalid.steps.clear();
    let resp = post(API_TOKEN, serde_json::to_vec(&invalid).unwrap())
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        400,
        "a task without steps is invalid"
    );
    let tasks = h.drain_tasks().await;
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].0, task);
    h.finish().await;
}

/// The wrong kind of credential, or a wrong token, gets an error that says
/// what the task API takes, never one about webhook signatures.
#[tokio::test]
async fn task_api_credential_errors_name_the_bearer_token() {
    let h = Harness::start().await;
    let body = serde_json::to_vec(&api_task()).unwrap();
    let send = |auth: Option<&str>| {
        let mut req = h
            .http
            .post(format!("{}/v1/tasks", h.url))
            .header("Content-Type", "application/json")
            .body(body.clone());
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        req.send()
    };
    for (auth, expect) in [
        (
            Some("Basic YWRtaW46c2VjcmV0"),
            "the task API takes `Authorization: Bearer <token>` with one of gateway.api_tokens, not a \"Basic\" credential",
        ),
        (
            Some("Bearer not-a-configured-token"),
            "the bearer token is not one of gateway.api_tokens",
        ),
        (None, "missing Authorization header"),
    ] {
        let resp = send(auth).await.unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{auth:?}");
        assert_eq!(
            resp.headers()["www-authenticate"].to_str().unwrap(),
            "Bearer"
        );
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"], expect, "{auth:?}");
    }
    assert!(h.drain_tasks().await.is_empty(), "nothing was enqueued");
    h.finish().await;
}

/// A task whose deadline no default worker would run is refused at intake
/// with the reason the worker would give, and never reaches the queue.
#[tokio::test]
async fn task_api_refuses_a_deadline_no_worker_would_run_with_the_workers_reason() {
    let h = Harness::start().await;
    let mut task = api_task();
    task.sandbox.deadline_secs = 3600; // + 300 s pending > 1800 s - 60 s
    task.steps[0].timeout_secs = 3000;
    let resp = h
        .http
        .post(format!("{}/v1/tasks", h.url))
        .bearer_auth(API_TOKEN)
        .json(&task)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.unwrap();
    let error = v["error"].as_str().unwrap();
    let worker_reason = sandfleet_proto::check_consumer_timeout(
        &task,
        std::time::Duration::from_secs(Limits::default().broker_consumer_timeout_secs),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains(&worker_reason) && error.contains(sandfleet_proto::DEADLINE_TOO_LONG_CODE),
        "{error}"
    );
    assert!(h.drain_tasks().await.is_empty(), "nothing was enqueued");
    h.finish().await;
}

#[tokio::test]
async fn broker_down_answers_503_and_not_ready() {
    let h = Harness::start().await;
    let ready = h
        .http
        .get(format!("{}/readyz", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    h.proxy.down();
    let resp = h
        .http
        .post(format!("{}/v1/tasks", h.url))
        .bearer_auth(API_TOKEN)
        .json(&api_task())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503, "the task API answers 503 too");
    assert!(resp.headers().contains_key("retry-after"));
    let body = with(
        "github/workflow_run.completed.json",
        "/workflow_run/conclusion",
        "failure",
    );
    let (status, resp) = h
        .github("workflow_run", "down-1", body.clone(), SECRET)
        .await;
    assert_eq!(status, 503, "{resp}");
    let ready = h
        .http
        .get(format!("{}/readyz", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    assert!(h.drain_tasks().await.is_empty(), "nothing was enqueued");
    let metrics = h
        .http
        .get(format!("{}/metrics", h.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("sandfleet_gateway_requests_total"),
        "{metrics}"
    );
    assert!(metrics.contains("status=\"503\""), "{metrics}");
    h.finish().await;
}

#[tokio::test]
async fn gateway_serves_before_the_broker_is_up_and_connects_later() {
    let h = Harness::start().await;
    let proxy = Proxy::start_with(false).await;
    let amqp = AmqpSettings {
        url: format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port),
        connection_name: Some(format!(
            "{}-late",
            h.settings.connection_name.clone().unwrap()
        )),
        ..h.settings.clone()
    };
    let stop = CancellationToken::new();
    let sink = sandfleet_gateway::ConnectingSink::connect_in_background(
        amqp,
        h.topology.clone(),
        Limits::default(),
        stop.clone(),
    );
    let settings = GatewaySettings {
        api_tokens: vec![API_TOKEN.to_owned()],
        ..GatewaySettings::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(Gateway::new(settings, sink).serve(listener, stop.clone()));
    let get = |path: &'static str| {
        let (http, url) = (h.http.clone(), url.clone());
        async move {
            http.get(format!("{url}{path}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let post = || {
        let (http, url) = (h.http.clone(), url.clone());
        async move {
            http.post(format!("{url}/v1/tasks"))
                .bearer_auth(API_TOKEN)
                .json(&api_task())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get("/healthz").await, 200, "alive without a broker");
    assert_eq!(get("/readyz").await, 503);
    assert_eq!(post().await, 503);
    proxy.up();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while get("/readyz").await != 200 {
        assert!(std::time::Instant::now() < deadline, "never connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(post().await, 202);
    assert_eq!(h.drain_tasks().await.len(), 1);
    stop.cancel();
    h.finish().await;
}
