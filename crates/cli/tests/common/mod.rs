//! Shared harness for the CLI's RabbitMQ tests: a per-test topology prefix on
//! the real broker (127.0.0.1:5672), the `sandfleet` binary run with
//! `--prefix <it> --json`, and helpers to put messages where a worker would.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sandfleet_amqp::{Amqp, Consumer, ConsumerOptions, OutgoingMessage, Publisher, Topology};
use sandfleet_proto::{Outcome, Provider, SandboxSpec, Source, Task, TaskResult};
use sandfleet_settings::{AmqpSettings, TopologySettings};
use serde_json::Value;

pub struct Env {
    pub settings: AmqpSettings,
    pub prefix: String,
    pub amqp: Amqp,
    pub topology: Topology,
    pub publisher: Publisher,
    pub dir: tempfile::TempDir,
}

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub lines: Vec<Value>,
    pub stderr: String,
}

impl Run {
    /// Lines with `"status": status`.
    pub fn with_status(&self, status: &str) -> Vec<&Value> {
        self.lines
            .iter()
            .filter(|l| l["status"] == status)
            .collect()
    }

    /// The summary line of a replay.
    pub fn summary(&self) -> &Value {
        &self
            .lines
            .iter()
            .find(|l| l.get("summary").is_some())
            .unwrap_or_else(|| panic!("no summary in {self:?}"))["summary"]
    }
}

pub fn task(repo: &str) -> Task {
    Task::fix_attempt(
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
            deadline_secs: 600,
            pending_timeout_secs: 300,
        },
    )
    .with_step("test", "make test", 300)
}

/// A final (or retrying) result of `task`, as a worker publishes it.
pub fn result(
    task: &Task,
    outcome: Outcome,
    is_final: bool,
    finished_at: DateTime<Utc>,
) -> TaskResult {
    let v = serde_json::json!({
        "schema_version": 1, "task_id": task.id, "attempt": 1, "outcome": outcome, "final": is_final,
        "finished_at": finished_at, "worker": "test-worker", "source": task.source, "task": task,
        "exit_code": if outcome.is_success() { 0 } else { 1 },
    });
    serde_json::from_value(v).unwrap()
}

impl Env {
    pub async fn new() -> Env {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let prefix = format!("sf-clitest-{suffix}");
        let settings = AmqpSettings {
            connection_name: Some(format!("sandfleet-clitest-{suffix}")),
            ..AmqpSettings::default()
        };
        let amqp = Amqp::connect(&settings, "cli-test")
            .await
            .unwrap_or_else(|e| {
                panic!("RabbitMQ must be running on 127.0.0.1:5672 for the CLI tests: {e}")
            });
        let topology = Topology::new(&TopologySettings {
            prefix: prefix.clone(),
            ..TopologySettings::default()
        });
        topology.apply(&amqp).await.unwrap();
        let publisher = Publisher::new(&amqp).await.unwrap();
        Env {
            settings,
            prefix,
            amqp,
            topology,
            publisher,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// `sandfleet --prefix <prefix> <args>` to start: in the test's
    /// directory, with an empty environment but `PATH` and `vars`, stdout and
    /// stderr discarded (set them again to read them).
    pub fn command(&self, args: &[&str], vars: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandfleet"));
        cmd.args(["--prefix", &self.prefix])
            .args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// Runs `sandfleet --prefix <prefix> --json <args>` in an empty directory
    /// with an empty environment.
    pub fn sandfleet(&self, args: &[&str]) -> Run {
        self.sandfleet_prefixed(&self.prefix, args)
    }

    /// Like [`Env::sandfleet`] with another prefix.
    pub fn sandfleet_prefixed(&self, prefix: &str, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_sandfleet"))
            .args(["--prefix", prefix, "--json"])
            .args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        Run {
            code: out.status.code().unwrap_or(-1),
            lines,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Puts `task` in the dead-letter queue the way the worker does.
    pub async fn dead_letter(&self, task: &Task, code: &str, reason: &str) {
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
        self.publisher.publish(&msg).await.unwrap();
    }

    /// Publishes a result to the results exchange, as the worker does.
    pub async fn publish_result(&self, r: &TaskResult) {
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
        self.publisher.publish(&msg).await.unwrap();
    }

    pub async fn depth(&self, queue: &str) -> u32 {
        self.amqp.queue_depth(queue).await.unwrap()
    }

    /// The ready count once it settles at `expected` (quorum queues apply
    /// returns asynchronously), or the last count seen after 5 s.
    pub async fn settled_depth(&self, queue: &str, expected: u32) -> u32 {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let d = self.depth(queue).await;
            if d == expected || std::time::Instant::now() > deadline {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Consumes and acks every task in the task queue (until 1 s passes
    /// without one).
    pub async fn take_tasks(&self) -> Vec<Task> {
        let mut c = Consumer::start(
            &self.amqp,
            ConsumerOptions::new(&self.topology.tasks_queue, 100),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        while let Ok(Some(d)) =
            tokio::time::timeout(Duration::from_secs(1), c.next_delivery()).await
        {
            d.ack().await.unwrap();
            out.push(serde_json::from_slice(d.body()).unwrap());
        }
        c.cancel();
        out
    }

    pub async fn cleanup(self) {
        // Cleanup happens in Drop, which also runs when an assertion failed.
        drop(self);
    }
}

impl Drop for Env {
    /// Deletes the test's topology and replay ledger, also after a failed
    /// assertion: on a fresh thread and runtime, since this one may be unwinding.
    fn drop(&mut self) {
        sandfleet_amqp::testing::delete_declared_blocking(
            self.settings.clone(),
            self.topology.clone(),
            vec![format!("{}.replays", self.prefix)],
        );
    }
}

/// A local address nobody listens on (yet).
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// GET `path` from `addr`: the status code and the whole response, or None
/// when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    stream.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, buf))
}

/// The status code of GET `path` from `addr`, or None when nothing answers.
pub fn http_status(addr: &str, path: &str) -> Option<u16> {
    http_get(addr, path).map(|(status, _)| status)
}
