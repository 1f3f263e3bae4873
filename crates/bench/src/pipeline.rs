//! `sandfleet-bench pipeline`: tasks through the whole fleet — producer →
//! RabbitMQ → worker process → results stream → subscriber — against a raw
//! lapin request/reply round trip in the same run.
//!
//! The worker is a separate process (this binary's hidden `pipeline-worker`
//! subcommand), so its CPU time is read from `/proc/<pid>/stat` without the
//! producer's and subscriber's share. Two fleets are measured:
//!
//! - `instant`: the real dispatch loop, RabbitMQ broker and results publisher
//!   with [`InstantExecutor`], an executor that completes every attempt
//!   in-process at once. What remains is the fleet's own overhead.
//! - `kube`: the real worker (`sandfleet_worker::run`) with the Kubernetes
//!   executor on kube-sim, pods scripted `Instant`.
//! - `local`: the real worker with the local executor, each task one `true`
//!   step, one task in flight by default (`--local-concurrency`): the
//!   latency a user of the embedded executor sees, and the CPU of the worker
//!   *and* its sandboxes (the worker's own time plus that of the children it
//!   reaped: the script shells and every process they waited for).
//!
//! The raw round trip is the least a broker-based request/reply can do:
//! publish the request with a confirm, consume it, publish the reply with a
//! confirm, ack the request; the client consumes the reply and acks it. It
//! runs in this process with the same number in flight. Latency is measured
//! from just before the enqueue to the arrival of the final result (reply).

use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sandfleet_amqp::{Amqp, Publisher, Topology};
use sandfleet_kube_sim::{KubeSim, PodScript, SimOptions};
use sandfleet_producer::Producer;
use sandfleet_proto::{Limits, Outcome, Provider, SandboxSpec, Source, Task, TaskId};
use sandfleet_results::{ResultPublisher, ResultSubscriber, StartAt};
use sandfleet_sandbox::job::MANAGED_SELECTOR;
use sandfleet_sandbox::{ExecError, Execution, Executor, RunContext};
use sandfleet_settings::{ExecutorKind, Settings};
use sandfleet_worker::Dispatcher;
use sandfleet_worker::rabbit::RabbitBroker;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// Environment variable carrying the worker's settings as JSON.
const SETTINGS_ENV: &str = "SANDFLEET_BENCH_SETTINGS_JSON";

/// How long a warm-up task or the timed phase may take before the run fails.
const PHASE_DEADLINE: Duration = Duration::from_secs(300);

/// Options of the pipeline benchmark.
#[derive(Debug, clap::Args)]
pub(crate) struct PipelineArgs {
    /// Tasks per fleet (and round trips of the raw client).
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Tasks in flight at once (enqueued and without a final result).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Skip the Kubernetes fleet (b).
    #[arg(long)]
    no_kube: bool,
    /// Tasks through the local executor fleet (c); 0 skips it.
    #[arg(long, default_value_t = 300)]
    local_tasks: usize,
    /// Tasks in flight at once in the local executor fleet (c).
    #[arg(long, default_value_t = 1)]
    local_concurrency: usize,
    /// Runtime threads of the worker processes; 0 lets tokio count the
    /// CPUs. See [`default_worker_threads`].
    #[arg(long, default_value_t = default_worker_threads())]
    worker_threads: usize,
    /// Broker URL.
    #[arg(
        long,
        env = "AMQP_ADDR",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub(crate) url: String,
}

/// Options of the hidden worker process.
#[derive(Debug, clap::Args)]
pub(crate) struct WorkerArgs {
    /// Run the dispatch loop with the in-process instant executor instead of
    /// the executor the settings choose.
    #[arg(long)]
    instant: bool,
}

/// An executor that completes every attempt in-process at once: each step
/// "exits 0" with no output. The bench's own implementation of the trait,
/// so the dispatch loop, broker and results publisher around it are the
/// production ones.
pub(crate) struct InstantExecutor;

#[async_trait]
impl Executor for InstantExecutor {
    async fn run(
        &self,
        task: &Task,
        attempt: u32,
        _ctx: &RunContext,
    ) -> Result<Execution, ExecError> {
        let now = chrono::Utc::now();
        Ok(Execution {
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            steps: task
                .steps
                .iter()
                .map(|s| sandfleet_proto::StepResult {
                    name: s.name.clone(),
                    exit_code: Some(0),
                    duration_ms: 0,
                    timed_out: false,
                    skipped: false,
                    output_tail: String::new(),
                    output_truncated: false,
                })
                .collect(),
            log_tail: String::new(),
            log_truncated: false,
            artifacts: Vec::new(),
            started_at: Some(now),
            finished_at: now,
            sandbox: format!("instant-{}-{attempt}", task.id),
            error: None,
            adopted: false,
            admission_wait: None,
        })
    }

    async fn cancel(&self, _task_id: TaskId, _attempt: u32) -> Result<(), ExecError> {
        Ok(())
    }
}

/// The hidden `pipeline-worker` subcommand: one worker process with the
/// settings the parent passed in [`SETTINGS_ENV`]; runs until killed.
pub(crate) async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let json = std::env::var(SETTINGS_ENV).with_context(|| format!("{SETTINGS_ENV} unset"))?;
    let settings: Settings = serde_json::from_str(&json).context("decoding the settings")?;
    let shutdown = CancellationToken::new();
    // SIGTERM drains, as `sandfleet worker` does (a second one exits at once).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let draining = shutdown.clone();
    tokio::spawn(async move {
        term.recv().await;
        draining.cancel();
        term.recv().await;
        std::process::exit(130);
    });
    if !args.instant {
        return sandfleet_worker::run(settings, shutdown)
            .await
            .context("worker");
    }
    // The same wiring as the worker's local executor path, with the
    // instant executor in its place (the topology is the parent's).
    let amqp = Amqp::connect(&settings.amqp, "worker").await?;
    let topology = Topology::new(&settings.topology);
    let publisher = Publisher::new(&amqp).await?;
    let results = ResultPublisher::from_publisher(publisher.clone(), &topology);
    let config = sandfleet_worker::dispatch_config(&settings);
    let prefetch = u16::try_from(config.concurrency).unwrap_or(u16::MAX);
    let broker = Arc::new(RabbitBroker::new(amqp, topology, publisher, prefetch));
    Dispatcher::new(
        broker,
        Arc::new(InstantExecutor),
        results,
        config,
        Arc::new(sandfleet_worker::metrics::Metrics::new()),
        Arc::new(sandfleet_worker::health::Health::new()),
    )
    .run(shutdown)
    .await?;
    Ok(())
}

/// One task as the fleets run it: two steps, like the `kube` bench.
pub(crate) fn task(i: usize) -> Task {
    Task::fix_attempt(
        Source {
            provider: Provider::Api,
            repository: "bench/pipeline".into(),
            commit: format!("{i:040x}"),
            git_ref: None,
            ci_run_id: None,
            pull_request: None,
            url: None,
        },
        SandboxSpec {
            image: "docker.io/library/alpine:3.20".into(),
            resources: Default::default(),
            env: Default::default(),
            deadline_secs: 60,
            pending_timeout_secs: 60,
        },
    )
    .with_step("build", "make", 30)
    .with_step("test", "make test", 30)
}

/// One task of the local fleet: a single `true` step.
fn local_task(i: usize) -> Task {
    let mut t = task(i);
    t.steps.truncate(1);
    t.steps[0].run = "true".into();
    t
}

/// The executor a fleet's worker process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// [`InstantExecutor`] in the dispatch loop.
    Instant,
    /// `sandfleet_worker::run` with the executor its settings choose.
    Worker,
}

/// What one fleet (or the raw client) measured.
#[derive(Debug, Clone, Copy)]
struct Figures {
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Worker-process CPU per task, when a worker process ran.
    cpu_ms_per_task: Option<f64>,
    /// Worker RSS after the warm-up task, and its peak at the end, in MiB.
    rss_mib: Option<(f64, f64)>,
}

/// The worker's runtime threads by default (`worker.runtime_threads`, one;
/// in a pod with the Deployment's CPU limit, 200m, tokio would count one CPU
/// too). The worker benchmarks default to it; `--worker-threads 0` gives the
/// worker one thread per CPU of this machine instead.
pub(crate) fn default_worker_threads() -> usize {
    usize::from(sandfleet_settings::WorkerSettings::default().runtime_threads)
}

/// A running worker process, killed on drop.
pub(crate) struct WorkerProcess {
    // Held for `kill_on_drop`.
    _child: tokio::process::Child,
    pub(crate) pid: u32,
}

impl WorkerProcess {
    /// Sends SIGTERM: the worker drains (its `drain_timeout_secs`) and exits.
    pub(crate) fn terminate(&self) {
        if let Some(pid) = i32::try_from(self.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }

    /// Waits at most `timeout` for the process to exit; true when it did.
    pub(crate) async fn wait_exit(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self._child.wait())
            .await
            .is_ok()
    }
}

impl WorkerProcess {
    /// The hidden `pipeline-worker` of this binary; `threads` as
    /// `--worker-threads` (0: tokio's default).
    pub(crate) fn spawn(
        settings: &Settings,
        instant: bool,
        kubeconfig: Option<&std::path::Path>,
        threads: usize,
    ) -> anyhow::Result<WorkerProcess> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("pipeline-worker")
            .env(SETTINGS_ENV, serde_json::to_string(settings)?)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        if instant {
            cmd.arg("--instant");
        }
        if let Some(k) = kubeconfig {
            cmd.env("KUBECONFIG", k);
        }
        runtime_threads(&mut cmd, threads);
        let child = cmd.spawn().context("spawning the worker process")?;
        let pid = child.id().context("worker pid")?;
        Ok(WorkerProcess { _child: child, pid })
    }

    /// `sandfleet worker` from `binary`, the process operators run, with
    /// the parts of `settings` a worker benchmark sets (broker, prefix,
    /// concurrency, executor, HTTP address, namespace) as its flags and
    /// `SANDFLEET__*` variables; everything else at its default.
    pub(crate) fn spawn_sandfleet(
        binary: &std::path::Path,
        settings: &Settings,
        kubeconfig: Option<&std::path::Path>,
        threads: usize,
    ) -> anyhow::Result<WorkerProcess> {
        let executor = match settings.worker.executor {
            ExecutorKind::Kubernetes => "kubernetes",
            ExecutorKind::Local => "local",
        };
        let mut cmd = tokio::process::Command::new(binary);
        cmd.args(["--amqp-url", &settings.amqp.url])
            .args(["--prefix", &settings.topology.prefix])
            .args(["--log", "warn", "worker"])
            .args(["--http-addr", &settings.worker.http_addr])
            .args(["--concurrency", &settings.worker.concurrency.to_string()])
            .args(["--executor", executor])
            .env(
                "SANDFLEET__SANDBOX__KUBERNETES__NAMESPACE",
                &settings.sandbox.kubernetes.namespace,
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(k) = kubeconfig {
            cmd.env("KUBECONFIG", k);
        }
        runtime_threads(&mut cmd, threads);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} worker", binary.display()))?;
        let pid = child.id().context("worker pid")?;
        Ok(WorkerProcess { _child: child, pid })
    }

    /// User + system CPU of the process so far.
    fn cpu(&self) -> Duration {
        crate::procfs::cpu_of(self.pid)
    }

    /// User + system CPU of the process and of the children it has reaped.
    fn cpu_with_children(&self) -> Duration {
        crate::procfs::cpu_with_children(self.pid)
    }
}

/// Runs the benchmark and prints the figures; the last line is JSON.
pub(crate) async fn run(args: PipelineArgs) -> anyhow::Result<()> {
    if args.tasks == 0 || args.concurrency == 0 {
        bail!("--tasks and --concurrency must be at least 1");
    }
    let run_id = std::process::id();
    println!("{}", threads_line(args.worker_threads));
    let mut base = Settings::default();
    base.amqp.url = args.url.clone();
    base.worker.concurrency =
        u16::try_from(args.concurrency).context("--concurrency exceeds 65535")?;
    base.topology.retry_delays_secs = vec![1, 2, 5];
    base.telemetry.log_filter = "warn".into();

    let raw = raw_round_trip(&args, &format!("sfbench-{run_id}-rawrr"))
        .await
        .context("raw lapin round trip")?;
    println!(
        "raw lapin request/reply:          {:>8.0} round trips/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
        raw.per_sec, raw.p50_ms, raw.p99_ms
    );

    let mut instant_settings = base.clone();
    instant_settings.topology.prefix = format!("sfbench-{run_id}-instant");
    let instant = fleet(&args, instant_settings, None)
        .await
        .context("instant fleet")?;
    print_fleet("(a) fleet, instant executor:     ", &instant);

    let kube = if args.no_kube {
        None
    } else {
        let sim = KubeSim::start(SimOptions::default())
            .await
            .context("starting kube-sim")?;
        sim.script_pods(MANAGED_SELECTOR, PodScript::Instant { exit_code: 0 });
        let namespace = "bench";
        let kubeconfig = std::env::temp_dir().join(format!("sfbench-{run_id}-kubeconfig"));
        std::fs::write(&kubeconfig, sim.kubeconfig_yaml(namespace))?;
        let mut s = base.clone();
        s.topology.prefix = format!("sfbench-{run_id}-kube");
        s.worker.executor = ExecutorKind::Kubernetes;
        s.sandbox.kubernetes.namespace = namespace.into();
        let figures = fleet(&args, s, Some(&kubeconfig)).await;
        let _ = std::fs::remove_file(&kubeconfig);
        sim.stop().await;
        let figures = figures.context("kubernetes fleet")?;
        print_fleet("(b) fleet, kubernetes (kube-sim):", &figures);
        Some(figures)
    };

    let local = if args.local_tasks == 0 {
        None
    } else {
        let mut s = base.clone();
        s.topology.prefix = format!("sfbench-{run_id}-local");
        s.worker.executor = ExecutorKind::Local;
        s.worker.concurrency =
            u16::try_from(args.local_concurrency.max(1)).context("--local-concurrency")?;
        let shape = Shape {
            tasks: args.local_tasks,
            concurrency: args.local_concurrency.max(1),
            task: local_task,
            threads: args.worker_threads,
        };
        let figures = fleet_with(&shape, s, None, Flavor::Worker)
            .await
            .context("local executor fleet")?;
        print_fleet("(c) fleet, local executor, `true`:", &figures);
        Some(figures)
    };

    let ratio = instant.per_sec / raw.per_sec;
    println!(
        "(a) / raw: rate ratio {ratio:.3}, p50 {:.2}x raw",
        instant.p50_ms / raw.p50_ms
    );
    // The keys first, in its order.
    println!(
        "{}",
        crate::json_line(
            "pipeline",
            &[
                ("ratio_vs_raw", json!(round3(ratio))),
                ("p50_ms", json!(round3(instant.p50_ms))),
                ("raw_p50_ms", json!(round3(raw.p50_ms))),
                (
                    "kube_cpu_ms_per_task",
                    json!(kube.and_then(|k| k.cpu_ms_per_task).map(round3)),
                ),
                ("tasks", json!(args.tasks)),
                ("concurrency", json!(args.concurrency)),
                ("p99_ms", json!(round3(instant.p99_ms))),
                ("raw_per_s", json!(raw.per_sec.round())),
                ("instant_per_s", json!(instant.per_sec.round())),
                (
                    "instant_cpu_ms_per_task",
                    json!(instant.cpu_ms_per_task.map(round3)),
                ),
                ("kube_per_s", json!(kube.map(|k| k.per_sec.round()))),
                ("kube_p50_ms", json!(kube.map(|k| round3(k.p50_ms)))),
                ("local_concurrency", json!(args.local_concurrency)),
                ("local_p50_ms", json!(local.map(|l| round3(l.p50_ms)))),
                ("local_p99_ms", json!(local.map(|l| round3(l.p99_ms)))),
                (
                    "local_cpu_ms_per_task",
                    json!(local.and_then(|l| l.cpu_ms_per_task).map(round3)),
                ),
                ("worker_threads", json!(args.worker_threads)),
            ],
        )
    );
    Ok(())
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn print_fleet(label: &str, f: &Figures) {
    println!(
        "{label} {:>8.0} tasks/s        p50 {:>6.2} ms  p99 {:>6.2} ms  worker CPU {:.3} ms/task  RSS {:.1} MiB after warm-up, peak {:.1} MiB",
        f.per_sec,
        f.p50_ms,
        f.p99_ms,
        f.cpu_ms_per_task.unwrap_or(f64::NAN),
        f.rss_mib.map_or(f64::NAN, |r| r.0),
        f.rss_mib.map_or(f64::NAN, |r| r.1),
    );
}

/// How many tasks a fleet runs, how many in flight, and what they are.
struct Shape {
    tasks: usize,
    concurrency: usize,
    task: fn(usize) -> Task,
    /// The worker process's runtime threads (0: tokio's default).
    threads: usize,
}

/// Declares the topology, starts a worker process, warms it up with one
/// task, then runs `args.tasks` with `args.concurrency` in flight; deletes
/// the topology whatever happened.
async fn fleet(
    args: &PipelineArgs,
    settings: Settings,
    kubeconfig: Option<&std::path::Path>,
) -> anyhow::Result<Figures> {
    let shape = Shape {
        tasks: args.tasks,
        concurrency: args.concurrency,
        task,
        threads: args.worker_threads,
    };
    let flavor = if kubeconfig.is_none() {
        Flavor::Instant
    } else {
        Flavor::Worker
    };
    fleet_with(&shape, settings, kubeconfig, flavor).await
}

async fn fleet_with(
    shape: &Shape,
    settings: Settings,
    kubeconfig: Option<&std::path::Path>,
    flavor: Flavor,
) -> anyhow::Result<Figures> {
    let amqp = Amqp::connect(&settings.amqp, "bench").await?;
    let topology = Topology::new(&settings.topology);
    topology.apply(&amqp).await?;
    let out = fleet_on(shape, &settings, &amqp, &topology, kubeconfig, flavor).await;
    let _ = topology.delete(&amqp).await;
    amqp.close();
    out
}

async fn fleet_on(
    args: &Shape,
    settings: &Settings,
    amqp: &Amqp,
    topology: &Topology,
    kubeconfig: Option<&std::path::Path>,
    flavor: Flavor,
) -> anyhow::Result<Figures> {
    let producer =
        Arc::new(Producer::with_amqp(amqp, topology.clone(), Limits::default(), false).await?);
    let mut sub = ResultSubscriber::new(amqp, topology)
        .prefetch(1000)
        .subscribe(StartAt::First)
        .await?;
    // Final results by task id, with their arrival time.
    let (tx, mut finals) = mpsc::unbounded_channel::<(TaskId, Outcome, Instant)>();
    let reader = tokio::spawn(async move {
        while let Some(Ok(r)) = sub.next().await {
            if r.result.is_final
                && tx
                    .send((r.result.task_id, r.result.outcome, Instant::now()))
                    .is_err()
            {
                return;
            }
        }
    });
    let worker = WorkerProcess::spawn(
        settings,
        flavor == Flavor::Instant,
        kubeconfig,
        args.threads,
    )?;
    // The local fleet counts its sandboxes' CPU too.
    let cpu_of = |w: &WorkerProcess| match (flavor, kubeconfig) {
        (Flavor::Worker, None) => w.cpu_with_children(),
        _ => w.cpu(),
    };
    let outcome = async {
        // Warm-up: connections, topology, watchers.
        let warm = (args.task)(usize::MAX);
        producer.enqueue(&warm).await?;
        let deadline = Instant::now() + PHASE_DEADLINE;
        loop {
            let Ok(Some((id, outcome, _))) =
                tokio::time::timeout_at(deadline.into(), finals.recv()).await
            else {
                bail!("no result for the warm-up task within {PHASE_DEADLINE:?}");
            };
            if id == warm.id {
                if outcome != Outcome::Succeeded {
                    bail!("warm-up task ended {outcome}");
                }
                break;
            }
        }
        let tasks: Vec<Task> = (0..args.tasks).map(args.task).collect();
        let idle = crate::procfs::rss_kib(worker.pid).map(|(rss, _)| rss);
        let cpu0 = cpu_of(&worker);
        let started = Instant::now();
        let window = Arc::new(Semaphore::new(args.concurrency));
        let mut sent: HashMap<TaskId, (Instant, tokio::sync::OwnedSemaphorePermit)> =
            HashMap::with_capacity(args.tasks);
        let mut latencies = Vec::with_capacity(args.tasks);
        let mut failed = 0usize;
        let (etx, mut enq_errors) = mpsc::unbounded_channel::<String>();
        let mut next = tasks.into_iter();
        let mut left = args.tasks;
        while left > 0 {
            tokio::select! {
                permit = window.clone().acquire_owned(), if next.len() > 0 => {
                    let permit = permit?;
                    if let Some(t) = next.next() {
                        sent.insert(t.id, (Instant::now(), permit));
                        let (p, etx) = (producer.clone(), etx.clone());
                        tokio::spawn(async move {
                            if let Err(e) = p.enqueue(&t).await {
                                let _ = etx.send(e.to_string());
                            }
                        });
                    }
                }
                Some(e) = enq_errors.recv() => bail!("enqueue failed: {e}"),
                r = tokio::time::timeout_at(deadline.into(), finals.recv()) => {
                    let Ok(Some((id, outcome, at))) = r else {
                        bail!("{left} tasks without a final result at the deadline");
                    };
                    // Duplicates (at-least-once) and the warm-up are not in `sent`.
                    if let Some((t0, _permit)) = sent.remove(&id) {
                        latencies.push(at.duration_since(t0));
                        if outcome != Outcome::Succeeded {
                            failed += 1;
                        }
                        left -= 1;
                    }
                }
            }
        }
        let elapsed = started.elapsed();
        let cpu = cpu_of(&worker).saturating_sub(cpu0);
        if failed > 0 {
            bail!("{failed} tasks did not succeed");
        }
        let mut f = figures(args.tasks, elapsed, latencies);
        f.cpu_ms_per_task = Some(cpu.as_secs_f64() * 1e3 / args.tasks as f64);
        let peak = crate::procfs::rss_kib(worker.pid).map(|(_, hwm)| hwm);
        f.rss_mib = idle
            .zip(peak)
            .map(|(i, p)| (i as f64 / 1024.0, p as f64 / 1024.0));
        Ok(f)
    }
    .await;
    drop(worker);
    reader.abort();
    outcome
}

fn figures(n: usize, elapsed: Duration, mut latencies: Vec<Duration>) -> Figures {
    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    Figures {
        per_sec: n as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        cpu_ms_per_task: None,
        rss_mib: None,
    }
}

/// The raw lapin request/reply round trip on two quorum queues: a server
/// (consume request, publish reply with confirm, ack) and a client (publish
/// request with confirm, consume reply, ack), `args.concurrency` in flight.
async fn raw_round_trip(args: &PipelineArgs, prefix: &str) -> anyhow::Result<Figures> {
    let props = || ConnectionProperties::default();
    let server_conn = Connection::connect(&args.url, props()).await?;
    let client_conn = Connection::connect(&args.url, props()).await?;
    let admin = client_conn.create_channel().await?;
    let (req_q, rep_q) = (format!("{prefix}.req"), format!("{prefix}.rep"));
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    for q in [&req_q, &rep_q] {
        admin
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                quorum.clone(),
            )
            .await?;
    }
    let out = raw_measure(args, &server_conn, &client_conn, &req_q, &rep_q).await;
    for q in [&req_q, &rep_q] {
        let _ = admin
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = server_conn.close(200, "done".into()).await;
    let _ = client_conn.close(200, "done".into()).await;
    out
}

async fn raw_measure(
    args: &PipelineArgs,
    server_conn: &Connection,
    client_conn: &Connection,
    req_q: &str,
    rep_q: &str,
) -> anyhow::Result<Figures> {
    let prefetch = u16::try_from(args.concurrency).unwrap_or(u16::MAX);
    // Server: one channel to consume, one confirmed channel to reply.
    let s_in = server_conn.create_channel().await?;
    s_in.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let s_out = server_conn.create_channel().await?;
    s_out
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut requests = s_in
        .basic_consume(
            req_q.into(),
            "raw-server".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let rep = rep_q.to_owned();
    let server = tokio::spawn(async move {
        while let Some(Ok(d)) = requests.next().await {
            let (s_out, rep) = (s_out.clone(), rep.clone());
            tokio::spawn(async move {
                let confirm = s_out
                    .basic_publish(
                        "".into(),
                        rep.as_str().into(),
                        BasicPublishOptions::default(),
                        &d.data,
                        d.properties.clone().with_delivery_mode(2),
                    )
                    .await;
                if let Ok(c) = confirm
                    && c.await.is_ok()
                {
                    let _ = d.ack(BasicAckOptions::default()).await;
                }
            });
        }
    });

    let c_out = client_conn.create_channel().await?;
    c_out
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let c_in = client_conn.create_channel().await?;
    c_in.basic_qos(prefetch.saturating_mul(2), BasicQosOptions::default())
        .await?;
    let mut replies = c_in
        .basic_consume(
            rep_q.into(),
            "raw-client".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // The same bodies the fleet carries.
    let bodies: Vec<(String, Vec<u8>)> = (0..args.tasks)
        .map(|i| {
            let t = task(i);
            serde_json::to_vec(&t).map(|b| (t.id.to_string(), b))
        })
        .collect::<Result<_, _>>()?;
    let deadline = Instant::now() + PHASE_DEADLINE;
    let window = Arc::new(Semaphore::new(args.concurrency));
    let mut sent: HashMap<String, (Instant, tokio::sync::OwnedSemaphorePermit)> = HashMap::new();
    let mut latencies = Vec::with_capacity(args.tasks);
    let (etx, mut errors) = mpsc::unbounded_channel::<String>();
    let mut next = bodies.into_iter();
    let mut left = args.tasks;
    let started = Instant::now();
    while left > 0 {
        tokio::select! {
            permit = window.clone().acquire_owned(), if next.len() > 0 => {
                let permit = permit?;
                if let Some((id, body)) = next.next() {
                    sent.insert(id.clone(), (Instant::now(), permit));
                    let (ch, q, etx) = (c_out.clone(), req_q.to_owned(), etx.clone());
                    tokio::spawn(async move {
                        let props = BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_message_id(id.into());
                        let r = match ch
                            .basic_publish("".into(), q.as_str().into(), BasicPublishOptions::default(), &body, props)
                            .await
                        {
                            Ok(c) => c.await.map(|_| ()),
                            Err(e) => Err(e),
                        };
                        if let Err(e) = r {
                            let _ = etx.send(e.to_string());
                        }
                    });
                }
            }
            Some(e) = errors.recv() => bail!("raw publish failed: {e}"),
            r = tokio::time::timeout_at(deadline.into(), replies.next()) => {
                let Ok(Some(Ok(d))) = r else {
                    bail!("{left} raw round trips unanswered at the deadline");
                };
                let at = Instant::now();
                d.ack(BasicAckOptions::default()).await?;
                let id = d.properties.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default();
                if let Some((t0, _permit)) = sent.remove(&id) {
                    latencies.push(at.duration_since(t0));
                    left -= 1;
                }
            }
        }
    }
    let elapsed = started.elapsed();
    server.abort();
    Ok(figures(args.tasks, elapsed, latencies))
}

/// The first line of a worker benchmark: the worker's runtime threads.
pub(crate) fn threads_line(threads: usize) -> String {
    match threads {
        0 => "worker runtime threads: one per CPU of this machine (tokio's default)".to_owned(),
        n => format!(
            "worker runtime threads: {n} (--worker-threads; the worker's default, worker.runtime_threads, is {})",
            default_worker_threads()
        ),
    }
}

/// Sets the runtime threads of a worker process (0: tokio's default, one per
/// CPU): `worker.runtime_threads` for `sandfleet worker`, and
/// `TOKIO_WORKER_THREADS` for this binary's `pipeline-worker`, whose runtime
/// is tokio's default one (an inherited value is dropped with 0).
pub(crate) fn runtime_threads(cmd: &mut tokio::process::Command, threads: usize) {
    cmd.env("SANDFLEET__WORKER__RUNTIME_THREADS", threads.to_string());
    if threads == 0 {
        cmd.env_remove("TOKIO_WORKER_THREADS");
    } else {
        cmd.env("TOKIO_WORKER_THREADS", threads.to_string());
    }
}
