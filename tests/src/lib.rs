//! sandfleet's end-to-end test harness.
//!
//! Every test builds an [`Env`]: its own topology prefix on the real RabbitMQ
//! (127.0.0.1:5672, deleted again by [`Env::cleanup`]), a results log read
//! from the results stream, a dead-letter log read from the dead-letter
//! queue, and optionally its own kube-sim. [`Env::spawn_worker`] starts a real
//! worker *process* (the `sandfleet-test-worker` binary of this package, which
//! calls `sandfleet_worker::run`) so tests can SIGKILL it, SIGTERM it, or cut
//! its broker connections through the management API.
//!
//! [`History`] is the checker for the invariants of the guarantees table in
//! `docs/worker.md`: **L** every task ends with exactly one final
//! outcome or a dead letter; **D** at most one Job per (task, attempt);
//! **R** no two different final results for one task.

// A test harness: a misused fixture is a bug in the test, and a panic is
// the clearest report of it.
#![allow(clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sandfleet_amqp::{Amqp, Consumer, ConsumerOptions, OutgoingMessage, Publisher, Topology};
use sandfleet_kube_sim::{KubeSim, SimOptions};
use sandfleet_proto::{
    CONTENT_TYPE, Outcome, Provider, SandboxSpec, Source, TASK_MESSAGE_TYPE, Task, TaskId,
    TaskResult,
};
use sandfleet_results::{ResultSubscriber, StartAt};
use sandfleet_settings::{ExecutorKind, Settings};
use tokio_util::sync::CancellationToken;

/// The AMQP URL of the test broker (`AMQP_ADDR` overrides).
pub fn amqp_url() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A valid task whose one step runs `script` (POSIX sh).
pub fn task(script: &str) -> Task {
    let mut t = Task::fix_attempt(
        Source {
            provider: Provider::Api,
            repository: "acme/widgets".into(),
            commit: "1c9e7a5b3d2f4e6a8c0b1d3f5e7a9c2b4d6f8e0a".into(),
            git_ref: None,
            ci_run_id: None,
            pull_request: None,
            url: None,
        },
        SandboxSpec {
            image: "docker.io/library/alpine:3.20".into(),
            resources: Default::default(),
            env: BTreeMap::new(),
            deadline_secs: 300,
            pending_timeout_secs: 30,
        },
    )
    .with_step("run", script, 240);
    t.retry.max_attempts = 3;
    t
}

/// A message seen on the dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The body.
    pub body: Vec<u8>,
    /// `x-sandfleet-reject-code`, when the worker dead-lettered it.
    pub code: Option<String>,
    /// `x-sandfleet-reject-reason`, when the worker dead-lettered it.
    pub reason: Option<String>,
    /// `x-first-death-reason`, when the broker dead-lettered it (`delivery_limit`).
    pub death_reason: Option<String>,
    /// The task id, when the body is a task.
    pub task_id: Option<TaskId>,
}

type Shared<T> = Arc<Mutex<Vec<T>>>;

fn snapshot<T: Clone>(v: &Shared<T>) -> Vec<T> {
    v.lock().map(|g| g.clone()).unwrap_or_default()
}

/// A kube-sim for one test, with a kubeconfig file workers can read.
pub struct Sim {
    /// The simulator.
    pub sim: KubeSim,
    /// Namespace the workers use.
    pub namespace: String,
    kubeconfig: tempfile::NamedTempFile,
}

impl Sim {
    /// Path of the kubeconfig file.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.kubeconfig.path().to_owned()
    }
}

/// The messages on `topology`'s cancellations stream with their offsets, up
/// to the one with id `sentinel`: [`sandfleet_amqp::testing::cancellations_up_to`]
/// (which the worker crate's tests, which cannot depend on this crate, use too).
pub async fn cancellations_up_to(
    amqp: &Amqp,
    topology: &Topology,
    sentinel: uuid::Uuid,
) -> Result<Vec<(u64, sandfleet_proto::Cancellation)>> {
    sandfleet_amqp::testing::cancellations_up_to(amqp, topology, sentinel)
        .await
        .map_err(|e| anyhow::anyhow!(e))
}

/// Of the Jobs the API accepted (kube-sim's request log), those created
/// after their task's cancel was acknowledged (`acked`): each with whether
/// its worker had already read that cancel, by stream offset (the Job's
/// `sandfleet.dev/cancels-read-to` against the cancel's offset in
/// `offsets`). A create that had not is the race docs/cancellation.md
/// names; one that had is a start the read barrier should have prevented.
pub fn jobs_created_after_cancel(
    log: &[sandfleet_kube_sim::RequestRecord],
    acked: &HashMap<TaskId, std::time::SystemTime>,
    offsets: &HashMap<TaskId, u64>,
) -> Vec<LateCreate> {
    log.iter()
        .filter(|r| !r.query.contains("dryRun"))
        .filter(|r| r.method == "POST" && r.path.ends_with("/jobs") && r.status == 201)
        .filter_map(|r| {
            let meta = r.body.as_ref()?.get("metadata")?;
            let task: TaskId = meta
                .pointer("/labels/sandfleet.dev~1task-id")?
                .as_str()?
                .parse()
                .ok()?;
            let job = meta.get("name")?.as_str()?.to_owned();
            (r.at > *acked.get(&task)?).then(|| LateCreate {
                job,
                read_to: meta
                    .pointer("/annotations/sandfleet.dev~1cancels-read-to")
                    .and_then(|v| v.as_str()?.parse().ok()),
                cancel_at: offsets.get(&task).copied(),
            })
        })
        .collect()
}

/// A Job created after its task's cancel was acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateCreate {
    /// The Job's name.
    pub job: String,
    /// How far its worker had read the cancellations stream.
    pub read_to: Option<u64>,
    /// The cancel's offset on the stream.
    pub cancel_at: Option<u64>,
}

impl LateCreate {
    /// The creating worker had not read up to the cancel: its barrier's
    /// marker was published before the cancel was confirmed.
    pub fn raced(&self) -> bool {
        matches!((self.read_to, self.cancel_at), (Some(read), Some(cancel)) if read < cancel)
    }
}

/// One test's world: topology prefix, broker handles, logs, kube-sim.
pub struct Env {
    /// Topology prefix (`e2e-<name>-<random>`).
    pub prefix: String,
    /// Base settings for workers of this test.
    pub settings: Settings,
    /// The test's own broker handle (connection name `sandfleet-e2e-<prefix>`).
    pub amqp: Amqp,
    /// Names.
    pub topology: Topology,
    publisher: Publisher,
    results: Shared<sandfleet_results::Received>,
    dead: Shared<DeadLetter>,
    published: Mutex<Vec<Task>>,
    /// The simulated cluster, when the test uses the Kubernetes executor.
    pub sim: Option<Sim>,
    stop: CancellationToken,
    cleaned: bool,
    bin: PathBuf,
    log_dir: tempfile::TempDir,
}

impl Env {
    /// Declares a fresh topology and starts the logs. `bin` is
    /// `env!("CARGO_BIN_EXE_sandfleet-test-worker")`; `tweak` adjusts the
    /// worker settings (the topology prefix and AMQP URL are set already).
    pub async fn new(
        name: &str,
        bin: &str,
        kube_sim: bool,
        tweak: impl FnOnce(&mut Settings),
    ) -> Result<Env> {
        Env::with_sim(name, bin, kube_sim.then(SimOptions::default), tweak).await
    }

    /// Like [`Env::new`], with a kube-sim started with `sim` (e.g. a Kueue
    /// quota) when it is `Some`.
    pub async fn with_sim(
        name: &str,
        bin: &str,
        sim: Option<SimOptions>,
        tweak: impl FnOnce(&mut Settings),
    ) -> Result<Env> {
        let prefix = format!(
            "e2e-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut settings = Settings::default();
        settings.amqp.url = amqp_url();
        settings.amqp.connect_timeout_secs = 5;
        settings.amqp.reconnect_max_delay_secs = 2;
        settings.topology.prefix = prefix.clone();
        settings.topology.retry_delays_secs = vec![1, 2, 5];
        settings.retry.base_delay_secs = 1;
        settings.retry.max_delay_secs = 5;
        settings.retry.jitter = 0.2;
        settings.worker.concurrency = 4;
        settings.worker.drain_timeout_secs = 5;
        settings.worker.queue_depth_poll_secs = 1;
        settings.telemetry.log_filter = "info,sandfleet_worker=debug".into();

        let sim = if let Some(options) = sim {
            let sim = KubeSim::start(options).await.context("starting kube-sim")?;
            let namespace = "sandboxes".to_owned();
            let mut kubeconfig = tempfile::NamedTempFile::new()?;
            std::io::Write::write_all(&mut kubeconfig, sim.kubeconfig_yaml(&namespace).as_bytes())?;
            settings.worker.executor = ExecutorKind::Kubernetes;
            settings.sandbox.kubernetes.namespace = namespace.clone();
            settings.sandbox.kubernetes.request_timeout_secs = 5;
            Some(Sim {
                sim,
                namespace,
                kubeconfig,
            })
        } else {
            None
        };
        tweak(&mut settings);

        let mut amqp_settings = settings.amqp.clone();
        amqp_settings.connection_name = Some(format!("sandfleet-e2e-{prefix}"));
        let amqp = Amqp::connect(&amqp_settings, "e2e")
            .await
            .with_context(|| {
                format!(
                    "RabbitMQ must be running on {} for the end-to-end tests",
                    amqp_url()
                )
            })?;
        let topology = Topology::new(&settings.topology);
        topology
            .apply(&amqp)
            .await
            .context("declaring the test topology")?;
        let publisher = Publisher::new(&amqp).await?;
        let stop = CancellationToken::new();

        let results: Shared<sandfleet_results::Received> = Arc::default();
        let mut sub = ResultSubscriber::new(&amqp, &topology)
            .subscribe(StartAt::First)
            .await?;
        {
            let results = results.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = sub.next() => match r {
                            Some(Ok(r)) => if let Ok(mut v) = results.lock() { v.push(r) },
                            Some(Err(e)) => tracing::warn!(error = %e, "results stream"),
                            None => return,
                        },
                    }
                }
            });
        }
        let dead: Shared<DeadLetter> = Arc::default();
        let mut dlq = Consumer::start(
            &amqp,
            ConsumerOptions::new(topology.dead_queue.clone(), 100),
        )
        .await?;
        {
            let dead = dead.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let d = tokio::select! {
                        _ = stop.cancelled() => return,
                        d = dlq.next_delivery() => match d { Some(d) => d, None => return },
                    };
                    let body = d.body().to_vec();
                    let task_id = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v.get("id")?.as_str()?.parse().ok());
                    let entry = DeadLetter {
                        code: d
                            .header_str(sandfleet_amqp::HEADER_REJECT_CODE)
                            .map(str::to_owned),
                        reason: d
                            .header_str(sandfleet_amqp::HEADER_REJECT_REASON)
                            .map(str::to_owned),
                        death_reason: d.header_str("x-first-death-reason").map(str::to_owned),
                        task_id,
                        body,
                    };
                    let _ = d.ack().await;
                    if let Ok(mut v) = dead.lock() {
                        v.push(entry);
                    }
                }
            });
        }
        Ok(Env {
            prefix,
            settings,
            amqp,
            topology,
            publisher,
            results,
            dead,
            published: Mutex::new(Vec::new()),
            sim,
            stop,
            cleaned: false,
            bin: PathBuf::from(bin),
            log_dir: tempfile::tempdir()?,
        })
    }

    /// Publishes a task (attempt 1), confirmed, and remembers it for [`Env::history`].
    pub async fn publish(&self, task: &Task) -> Result<()> {
        self.publish_with(task, None).await
    }

    /// Publishes a task with a `traceparent` header.
    pub async fn publish_with(&self, task: &Task, traceparent: Option<&str>) -> Result<()> {
        let body = serde_json::to_vec(task)?;
        // The producer's routing: `task`, or the task's shard when the
        // topology has shards (docs/fairness.md).
        let routing_key = self
            .topology
            .routing_key_for(&sandfleet_proto::FairKey::of(task).key);
        let m = OutgoingMessage::new(&self.topology.tasks_exchange, routing_key, body)
            .message_id(task.id.to_string())
            .kind(TASK_MESSAGE_TYPE)
            .content_type(CONTENT_TYPE)
            .attempt(1)
            .traceparent(traceparent);
        self.publisher.publish(&m).await?;
        if let Ok(mut p) = self.published.lock() {
            p.push(task.clone());
        }
        Ok(())
    }

    /// Publishes raw bytes to the task exchange (for bad-message tests).
    pub async fn publish_raw(&self, body: Vec<u8>) -> Result<()> {
        let m = OutgoingMessage::new(
            &self.topology.tasks_exchange,
            sandfleet_amqp::TASK_ROUTING_KEY,
            body,
        );
        self.publisher.publish(&m).await?;
        Ok(())
    }

    /// Records a cancel of `id` on the cancellations stream (confirmed, as
    /// `Producer::cancel` does) and returns when the broker acknowledged it.
    pub async fn cancel(
        &self,
        id: TaskId,
        by: &str,
        reason: &str,
    ) -> Result<std::time::SystemTime> {
        self.publish_cancellation(&sandfleet_proto::Cancellation::task(id, by, reason))
            .await
    }

    /// Publishes a cancellation (confirmed); the acknowledgement's time.
    pub async fn publish_cancellation(
        &self,
        c: &sandfleet_proto::Cancellation,
    ) -> Result<std::time::SystemTime> {
        let m = OutgoingMessage::new(
            &self.topology.cancellations_exchange,
            "",
            serde_json::to_vec(c)?,
        )
        .message_id(c.id.to_string())
        .kind(sandfleet_proto::CANCELLATION_MESSAGE_TYPE)
        .content_type(CONTENT_TYPE);
        self.publisher.publish(&m).await?;
        Ok(std::time::SystemTime::now())
    }

    /// Every message on this test's cancellations stream with its offset,
    /// read from the first up to a marker published now.
    pub async fn cancellations_on_stream(
        &self,
    ) -> Result<Vec<(u64, sandfleet_proto::Cancellation)>> {
        let sentinel = sandfleet_proto::Cancellation::marker("e2e");
        self.publish_cancellation(&sentinel).await?;
        cancellations_up_to(&self.amqp, &self.topology, sentinel.id).await
    }

    /// Pods in the simulated cluster now.
    pub fn pods(&self) -> Vec<serde_json::Value> {
        let sim = self.kube();
        sim.sim.pods(&sim.namespace)
    }

    /// Every result read from the stream so far (duplicates included).
    pub fn results(&self) -> Vec<TaskResult> {
        snapshot(&self.results)
            .into_iter()
            .map(|r| r.result)
            .collect()
    }

    /// Results with their trace context.
    pub fn received(&self) -> Vec<sandfleet_results::Received> {
        snapshot(&self.results)
    }

    /// Final results of `id` (duplicates included).
    pub fn finals(&self, id: TaskId) -> Vec<TaskResult> {
        self.results()
            .into_iter()
            .filter(|r| r.task_id == id && r.is_final)
            .collect()
    }

    /// Dead letters seen so far.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        snapshot(&self.dead)
    }

    /// Ready messages in the task queue (a passive declare: exact, unlike
    /// the management API's statistics, which lag by seconds).
    pub async fn ready_tasks(&self) -> Result<u64> {
        Ok(u64::from(
            self.amqp.queue_depth(&self.topology.tasks_queue).await?,
        ))
    }

    /// Starts a worker process named `name` with this test's settings,
    /// changed by `tweak`.
    pub fn spawn_worker(
        &self,
        name: &str,
        tweak: impl FnOnce(&mut Settings),
    ) -> Result<WorkerProc> {
        let mut s = self.settings.clone();
        let port = free_port()?;
        s.worker.http_addr = format!("127.0.0.1:{port}");
        s.worker.name = Some(name.to_owned());
        let conn_name = format!("sandfleet-e2e-worker-{}-{name}", self.prefix);
        s.amqp.connection_name = Some(conn_name.clone());
        tweak(&mut s);
        let log = self.log_dir.path().join(format!("{name}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.env("SANDFLEET_TEST_SETTINGS_JSON", serde_json::to_string(&s)?)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        if let Some(sim) = &self.sim {
            cmd.env("KUBECONFIG", sim.kubeconfig_path());
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        Ok(WorkerProc {
            child,
            http: SocketAddr::from(([127, 0, 0, 1], port)),
            name: name.to_owned(),
            connection_name: conn_name,
            log,
        })
    }

    /// Closes the broker connections of `worker` (management API), as a
    /// network fault or a broker restart would.
    /// The management API lists new connections only after its next stats
    /// collection (about 5 s), so this waits up to 15 s for them to appear.
    pub async fn close_connections_of(&self, worker: &WorkerProc) -> Result<usize> {
        let m = self.amqp.management();
        let start = Instant::now();
        loop {
            let n = m.close_connections_named(&worker.connection_name).await?;
            if n > 0 || start.elapsed() > Duration::from_secs(15) {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until `cond` holds, polling every 100 ms; fails after `timeout`.
    pub async fn until(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Env) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        while !cond(self) {
            if start.elapsed() > timeout {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// The history of this test, for the invariant checks.
    pub fn history(&self) -> History {
        let published = self.published.lock().map(|p| p.clone()).unwrap_or_default();
        let log = self
            .sim
            .as_ref()
            .map(|s| s.sim.request_log())
            .unwrap_or_default();
        let job_creates: Vec<(String, std::time::SystemTime)> = log
            .iter()
            // A dry run (the worker's probe of `create jobs`) persists nothing.
            .filter(|r| !r.query.contains("dryRun"))
            .filter(|r| r.method == "POST" && r.path.ends_with("/jobs") && r.status == 201)
            .filter_map(|r| {
                let name = r.body.as_ref()?.pointer("/metadata/name")?.as_str()?;
                Some((name.to_owned(), r.at))
            })
            .collect();
        let job_deletes: Vec<(String, std::time::SystemTime)> = log
            .iter()
            .filter(|r| !r.query.contains("dryRun"))
            .filter(|r| r.method == "DELETE" && r.path.contains("/jobs/") && r.status < 300)
            .filter_map(|r| Some((r.path.rsplit('/').next()?.to_owned(), r.at)))
            .collect();
        History {
            published: published.iter().map(|t| t.id).collect(),
            results: self.results(),
            dead: self.dead_letters(),
            job_creates,
            job_deletes,
        }
    }

    /// The kube-sim (panics when the test did not ask for one).
    pub fn kube(&self) -> &Sim {
        self.sim.as_ref().expect("this test has no kube-sim")
    }

    /// API requests for Job `name`: (method, status), in order. Creates are
    /// `POST .../jobs` whose body names the Job.
    pub fn job_requests(&self, name: &str) -> Vec<(String, u16)> {
        self.kube()
            .sim
            .request_log()
            .into_iter()
            .filter(|r| {
                r.path.ends_with(&format!("/jobs/{name}"))
                    || (r.method == "POST"
                        && r.path.ends_with("/jobs")
                        && r.body.as_ref().and_then(|b| b.pointer("/metadata/name"))
                            == Some(&serde_json::Value::String(name.to_owned())))
            })
            .map(|r| (r.method, r.status))
            .collect()
    }

    /// Times Job `name` was created (201).
    pub fn job_created(&self, name: &str) -> usize {
        self.job_requests(name)
            .iter()
            .filter(|(m, s)| m == "POST" && *s == 201)
            .count()
    }

    /// True while Job `name` exists in the simulated cluster.
    pub fn job_exists(&self, name: &str) -> bool {
        let sim = self.kube();
        sim.sim
            .jobs(&sim.namespace)
            .iter()
            .any(|j| j.pointer("/metadata/name").and_then(|n| n.as_str()) == Some(name))
    }

    /// True while a pod of Job `name` is running.
    pub fn job_running(&self, name: &str) -> bool {
        let sim = self.kube();
        sim.sim.pods(&sim.namespace).iter().any(|p| {
            p.pointer("/metadata/labels/sandfleet.dev~1job")
                .and_then(|n| n.as_str())
                == Some(name)
                && p.pointer("/status/phase").and_then(|n| n.as_str()) == Some("Running")
        })
    }

    /// Stops the logs, deletes the topology and stops the kube-sim. A test
    /// that panics before calling it is cleaned up by `Drop`.
    pub async fn cleanup(mut self) -> Result<()> {
        self.stop.cancel();
        self.topology.delete(&self.amqp).await?;
        self.cleaned = true;
        self.amqp.close();
        if let Some(sim) = self.sim.take() {
            sim.sim.stop().await;
        }
        Ok(())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        self.stop.cancel();
        // A failed test: delete its queues anyway (the broker is shared), on
        // a runtime of its own since `Drop` cannot await.
        sandfleet_amqp::testing::delete_declared_blocking(
            self.settings.amqp.clone(),
            Topology::new(&self.settings.topology),
            Vec::new(),
        );
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A running worker process. Dropping it kills it.
pub struct WorkerProc {
    child: Child,
    /// Its `/healthz`, `/readyz`, `/metrics` address.
    pub http: SocketAddr,
    /// Its worker name.
    pub name: String,
    /// The prefix of its broker connection names.
    pub connection_name: String,
    log: PathBuf,
}

impl WorkerProc {
    /// SIGKILL: a crash.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM: the start of a graceful shutdown.
    pub fn term(&self) -> Result<()> {
        // The shell's builtin `kill`: no procps needed.
        let status = Command::new("/bin/sh")
            .args(["-c", &format!("kill -TERM {}", self.child.id())])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        Ok(())
    }

    /// Waits for the process to exit (polling), at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if start.elapsed() > timeout {
                bail!("worker {} did not exit within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET `path` on the worker's HTTP port: (status, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        let resp = reqwest::Client::new()
            .get(format!("http://{}{path}", self.http))
            .timeout(Duration::from_secs(2))
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }

    /// The `/readyz` status code (0 when the port does not answer).
    pub async fn readyz(&self) -> u16 {
        self.get("/readyz").await.map(|r| r.0).unwrap_or(0)
    }

    /// The value of a metric line starting with `prefix` in `/metrics`.
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await.ok()?;
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// Waits until `/readyz` answers `status`.
    pub async fn wait_ready(&self, status: u16, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.readyz().await == status {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "worker {} /readyz never answered {status}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last 60 lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What happened in one test: published tasks, every result, every dead
/// letter, and every Job the API server created.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Ids of the tasks published.
    pub published: Vec<TaskId>,
    /// Results, duplicates included.
    pub results: Vec<TaskResult>,
    /// Dead letters.
    pub dead: Vec<DeadLetter>,
    /// Jobs created (201): name and time, in order.
    pub job_creates: Vec<(String, std::time::SystemTime)>,
    /// Jobs deleted: name and time, in order.
    pub job_deletes: Vec<(String, std::time::SystemTime)>,
}

/// What [`History::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Tasks with neither a final result nor a dead letter (invariant L).
    pub lost: Vec<TaskId>,
    /// Tasks with two final results that differ in attempt or outcome (R).
    pub conflicting_finals: Vec<TaskId>,
    /// Tasks that had two Jobs at the same time (D): the same attempt's Job
    /// created again before it was deleted, or two attempts overlapping.
    pub concurrent_jobs: Vec<String>,
    /// Job names created more than once one after the other (a finished
    /// attempt re-run after a crash between its Job's deletion and the ack;
    /// allowed by D, reported for information).
    pub recreated_jobs: Vec<String>,
    /// Final results (deduplicated by task).
    pub finished: usize,
    /// Duplicate deliveries of the same final result (allowed; consumers dedup).
    pub duplicate_final_deliveries: usize,
}

impl Report {
    /// True when L, D and R hold.
    pub fn ok(&self) -> bool {
        self.lost.is_empty()
            && self.conflicting_finals.is_empty()
            && self.concurrent_jobs.is_empty()
    }
}

impl History {
    /// Checks invariants L, D and R.
    pub fn check(&self) -> Report {
        let mut finals: HashMap<TaskId, Vec<&TaskResult>> = HashMap::new();
        for r in self.results.iter().filter(|r| r.is_final) {
            finals.entry(r.task_id).or_default().push(r);
        }
        let dead: HashSet<TaskId> = self.dead.iter().filter_map(|d| d.task_id).collect();
        let mut report = Report::default();
        for id in &self.published {
            if !finals.contains_key(id) && !dead.contains(id) {
                report.lost.push(*id);
            }
        }
        for (id, rs) in &finals {
            let distinct: HashSet<(u32, Outcome)> =
                rs.iter().map(|r| (r.attempt, r.outcome)).collect();
            if distinct.len() > 1 {
                report.conflicting_finals.push(*id);
            }
            report.duplicate_final_deliveries += rs.len() - 1;
        }
        report.finished = finals.len();
        // Lifetimes of every Job, grouped by task (`sf-<task>-a<attempt>`).
        let mut lives: HashMap<&str, Vec<(&str, std::time::SystemTime, std::time::SystemTime)>> =
            HashMap::new();
        let mut deletes: HashMap<&str, Vec<std::time::SystemTime>> = HashMap::new();
        for (name, at) in &self.job_deletes {
            deletes.entry(name.as_str()).or_default().push(*at);
        }
        let mut created: HashMap<&str, usize> = HashMap::new();
        for (name, born) in &self.job_creates {
            *created.entry(name.as_str()).or_default() += 1;
            let died = deletes
                .get(name.as_str())
                .and_then(|d| d.iter().find(|t| *t >= born).copied())
                .unwrap_or(std::time::UNIX_EPOCH + Duration::from_secs(u32::MAX as u64));
            let task = name.rsplit_once("-a").map_or(name.as_str(), |(t, _)| t);
            lives
                .entry(task)
                .or_default()
                .push((name.as_str(), *born, died));
        }
        for (name, n) in created {
            if n > 1 {
                report.recreated_jobs.push(name.to_owned());
            }
        }
        for (task, mut l) in lives {
            l.sort_by_key(|x| x.1);
            if l.windows(2).any(|w| w[1].1 < w[0].2) {
                report.concurrent_jobs.push(task.to_owned());
            }
        }
        report
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn result(t: &Task, attempt: u32, outcome: Outcome, is_final: bool) -> TaskResult {
        let mut r = TaskResult::from_task(t, attempt, outcome, "w");
        r.is_final = is_final;
        r
    }

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    #[test]
    fn the_checker_finds_lost_conflicting_and_concurrent() {
        let (a, b, c, d) = (task("true"), task("true"), task("true"), task("true"));
        let job = |t: &Task, n: u32| format!("sf-{}-a{n}", t.id.simple());
        let history = History {
            published: vec![a.id, b.id, c.id, d.id],
            results: vec![
                // a: a non-final attempt, then a final one delivered twice.
                result(&a, 1, Outcome::Evicted, false),
                result(&a, 2, Outcome::Succeeded, true),
                result(&a, 2, Outcome::Succeeded, true),
                // b: two different final outcomes.
                result(&b, 1, Outcome::Succeeded, true),
                result(&b, 1, Outcome::Failed, true),
                // c: nothing final, and not dead-lettered either → lost.
                result(&c, 1, Outcome::Evicted, false),
            ],
            dead: vec![DeadLetter {
                body: Vec::new(),
                code: Some("max_attempts".into()),
                reason: None,
                death_reason: None,
                task_id: Some(d.id),
            }],
            job_creates: vec![
                (job(&a, 1), at(0)),
                (job(&a, 2), at(10)),
                (job(&b, 1), at(0)),
                (job(&b, 1), at(20)),
                (job(&c, 1), at(0)),
                (job(&c, 2), at(5)),
            ],
            job_deletes: vec![
                (job(&a, 1), at(5)),
                (job(&a, 2), at(15)),
                (job(&b, 1), at(10)),
                // c's attempt 1 is still alive when attempt 2 is created.
                (job(&c, 1), at(8)),
            ],
        };
        let r = history.check();
        assert_eq!(r.lost, vec![c.id]);
        assert_eq!(r.conflicting_finals, vec![b.id]);
        assert_eq!(r.duplicate_final_deliveries, 2);
        assert_eq!(r.concurrent_jobs, vec![format!("sf-{}", c.id.simple())]);
        assert_eq!(r.recreated_jobs, vec![job(&b, 1)]);
        assert_eq!(r.finished, 2);
        assert!(!r.ok());
    }

    #[test]
    fn a_clean_history_passes() {
        let t = task("true");
        let name = format!("sf-{}-a1", t.id.simple());
        let h = History {
            published: vec![t.id],
            results: vec![result(&t, 1, Outcome::Succeeded, true)],
            dead: Vec::new(),
            job_creates: vec![(name.clone(), at(0))],
            job_deletes: vec![(name, at(3))],
        };
        assert!(h.check().ok());
    }
}
