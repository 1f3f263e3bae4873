//! A console on the real RabbitMQ with its own topology prefix, and
//! optionally a real worker (local executor) it watches.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use sandfleet_amqp::testing::{delete_declared, delete_declared_blocking};
use sandfleet_amqp::{Amqp, OutgoingMessage, Publisher, Topology};
use sandfleet_console::Console;
use sandfleet_gateway::{BrokerSink, TaskSink};
use sandfleet_proto::{Provider, SandboxSpec, Source, Task};
use sandfleet_settings::{ConsoleRole, ConsoleToken, ExecutorKind, Settings};
use tokio_util::sync::CancellationToken;

pub const OPERATOR: &str = "operator-token-0123456789abcdef";
pub const VIEWER: &str = "viewer-token-0123456789abcdef";

pub struct Env {
    pub settings: Settings,
    pub amqp: Amqp,
    pub topology: Topology,
    pub console: SocketAddr,
    /// The prefix of the console's own broker connection names.
    pub console_connections: String,
    pub worker: Option<String>,
    pub stop: CancellationToken,
    pub _dir: tempfile::TempDir,
    /// `cleanup` ran; otherwise `Drop` deletes what the test declared.
    cleaned: bool,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Env {
    /// `with_worker`: also run a worker with the local executor.
    pub async fn start(with_worker: bool, read_requires_token: bool) -> Env {
        Env::start_with(with_worker, read_requires_token, |_| {}).await
    }

    /// Like [`Env::start`], with the settings (the console's, the topology,
    /// the worker's) adjusted by `tune`.
    pub async fn start_with(
        with_worker: bool,
        read_requires_token: bool,
        tune: impl FnOnce(&mut Settings),
    ) -> Env {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.topology.prefix = format!("sf-console-{suffix}");
        settings.amqp.connection_name = Some(format!("sandfleet-console-test-{suffix}"));
        let amqp = Amqp::connect(&settings.amqp, "console-test")
            .await
            .unwrap_or_else(|e| {
                panic!("RabbitMQ must be running on 127.0.0.1:5672 for the console tests: {e}")
            });
        let worker_port = with_worker.then(free_port);
        let worker = worker_port.map(|port| format!("http://127.0.0.1:{port}"));
        settings.console.listen_addr = "127.0.0.1:0".to_owned();
        settings.console.refresh_secs = 1;
        settings.console.read_requires_token = read_requires_token;
        settings.console.workers = worker.iter().cloned().collect();
        settings.console.tokens = vec![
            ConsoleToken {
                name: "olivia".into(),
                token: OPERATOR.into(),
                role: ConsoleRole::Operator,
            },
            ConsoleToken {
                name: "victor".into(),
                token: VIEWER.into(),
                role: ConsoleRole::Viewer,
            },
        ];
        // Before the worker starts: the topology (e.g. task shards) is the
        // worker's too.
        tune(&mut settings);
        settings.validate().unwrap();
        let topology = Topology::new(&settings.topology);
        topology.apply(&amqp).await.unwrap();
        let stop = CancellationToken::new();
        if let Some(port) = worker_port {
            let mut ws = settings.clone();
            ws.worker.executor = ExecutorKind::Local;
            ws.worker.concurrency = 2;
            ws.worker.http_addr = format!("127.0.0.1:{port}");
            ws.worker.name = Some(format!("console-test-{suffix}"));
            ws.sandbox.local.work_dir = Some(dir.path().display().to_string());
            let s = stop.clone();
            tokio::spawn(async move {
                if let Err(e) = sandfleet_worker::run(ws, s).await {
                    eprintln!("worker ended: {e}");
                }
            });
        }
        // Its own connection name, so a test can cut the console's
        // connections and no other.
        let mut cs = settings.clone();
        cs.amqp.connection_name = Some(format!("sandfleet-console-test-{suffix}-console"));
        let console_connections = cs.amqp.connection_name.clone().unwrap();
        let console = Console::start(cs, stop.clone()).await.unwrap();
        Env {
            settings,
            amqp,
            topology,
            console: console.addr,
            console_connections,
            worker,
            stop,
            _dir: dir,
            cleaned: false,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.console)
    }

    /// Waits until the worker answers ready.
    pub async fn worker_ready(&self) {
        let url = format!("{}/readyz", self.worker.as_ref().unwrap());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker never became ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn enqueue(&self, task: &Task) {
        let sink = BrokerSink::new(&self.amqp, &self.topology, self.settings.limits.clone())
            .await
            .unwrap();
        sink.enqueue(task).await.unwrap();
    }

    /// Puts `task` in the dead-letter queue the way the worker does.
    pub async fn dead_letter(&self, task: &Task, code: &str, reason: &str) {
        let publisher = Publisher::new(&self.amqp).await.unwrap();
        let msg = OutgoingMessage::new(
            "",
            self.topology.dead_queue.as_str(),
            serde_json::to_vec(task).unwrap(),
        )
        .message_id(task.id.to_string())
        .kind("sandfleet.task.v1")
        .attempt(3)
        .header("x-sandfleet-reject-code", code)
        .header("x-sandfleet-reject-reason", reason);
        publisher.publish(&msg).await.unwrap();
    }

    /// Publishes a result to the results exchange, as the worker does.
    pub async fn publish_result(&self, r: &sandfleet_proto::TaskResult) {
        let publisher = Publisher::new(&self.amqp).await.unwrap();
        let key = format!(
            "{}.{}",
            r.outcome.as_str(),
            if r.is_final { "final" } else { "retrying" }
        );
        let msg = OutgoingMessage::new(
            self.topology.results_exchange.as_str(),
            key,
            serde_json::to_vec(r).unwrap(),
        )
        .message_id(format!("{}-{}", r.task_id, r.attempt))
        .kind("sandfleet.result.v1");
        publisher.publish(&msg).await.unwrap();
    }

    pub async fn cleanup(mut self) {
        self.stop.cancel();
        // Leave the worker a moment to drain; deletion then removes what is left.
        delete_declared(&self.amqp, &self.topology, &[self.ledger()]).await;
        self.cleaned = true;
    }

    /// The replay ledger a replay declares (`<prefix>.replays`), not part of
    /// the topology.
    fn ledger(&self) -> String {
        sandfleet_ops::ledger::queue_name(&self.settings.topology.prefix)
    }
}

impl Drop for Env {
    /// A test that ended without `cleanup` (a failed assertion): the same
    /// deletions, on a thread and runtime of their own.
    fn drop(&mut self) {
        self.stop.cancel();
        if self.cleaned {
            return;
        }
        delete_declared_blocking(
            self.settings.amqp.clone(),
            self.topology.clone(),
            vec![self.ledger()],
        );
    }
}

/// A final failed result of `task`, carrying the task (what replay needs).
pub fn failed_result(task: &Task) -> sandfleet_proto::TaskResult {
    serde_json::from_value(serde_json::json!({
        "schema_version": 1, "task_id": task.id, "attempt": 1, "outcome": "failed",
        "final": true, "finished_at": chrono::Utc::now(), "worker": "test-worker",
        "source": task.source, "task": task, "exit_code": 2,
        "error": "step test exited with 2",
    }))
    .unwrap()
}

pub fn task(repo: &str, steps: &[(&str, &str)]) -> Task {
    let mut t = Task::fix_attempt(
        Source {
            provider: Provider::Api,
            repository: repo.to_owned(),
            commit: "3484a3fb816e0859fd6e1cea078d76385ff50625".to_owned(),
            git_ref: Some("main".to_owned()),
            ci_run_id: None,
            pull_request: None,
            url: None,
        },
        SandboxSpec {
            image: "docker.io/library/alpine:3.20".to_owned(),
            resources: Default::default(),
            env: Default::default(),
            deadline_secs: 120,
            pending_timeout_secs: 60,
        },
    );
    for (name, run) in steps {
        t = t.with_step(name, run, 60);
    }
    t
}
