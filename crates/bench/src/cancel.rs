//! `sandfleet-bench cancel`: random cancels across queued, delayed and
//! running tasks on kube-sim with the real broker, while worker processes
//! are killed (SIGKILL) and restarted. Measures cancel → pod gone and checks
//! that no pod is left, no Job was created after its task's cancel was
//! acknowledged, and every task has exactly one final result.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use sandfleet_amqp::{Amqp, Topology};
use sandfleet_kube_sim::{KubeSim, PodScript, SimOptions};
use sandfleet_producer::Producer;
use sandfleet_proto::{CancelTarget, Cancellation, Limits, Outcome, TaskId};
use sandfleet_results::{ResultSubscriber, StartAt};
use sandfleet_sandbox::job::{LABEL_TASK_ID, MANAGED_SELECTOR};
use sandfleet_settings::{ExecutorKind, Settings};

use crate::pipeline::{WorkerProcess, task};

/// How long the tail of the run may take: every task final, every pod gone.
const SETTLE_DEADLINE: Duration = Duration::from_secs(240);

/// Options of the cancel benchmark.
#[derive(Debug, clap::Args)]
pub(crate) struct CancelArgs {
    /// Tasks published, each cancelled once at a random moment.
    #[arg(long, default_value_t = 1000)]
    cancels: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Tasks each worker runs at once.
    #[arg(long, default_value_t = 20)]
    concurrency: u16,
    /// One worker is SIGKILLed and a new one started after every this many cancels.
    #[arg(long, default_value_t = 100)]
    kill_every: usize,
    /// Time between two cancels, in milliseconds.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// Broker URL.
    #[arg(
        long,
        env = "AMQP_ADDR",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub(crate) url: String,
}

/// xorshift64*: a reproducible shuffle without a dependency.
fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        let r = seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
        v.swap(i, (r % (i as u64 + 1)) as usize);
    }
}

fn task_of(pod: &serde_json::Value) -> Option<TaskId> {
    pod.pointer("/metadata/labels")?
        .get(LABEL_TASK_ID)?
        .as_str()?
        .parse()
        .ok()
}

/// Runs the benchmark and prints the figures; the last line is JSON.
pub(crate) async fn run(args: CancelArgs) -> anyhow::Result<()> {
    if args.cancels == 0 || args.workers == 0 || args.concurrency == 0 {
        bail!("--cancels, --workers and --concurrency must be at least 1");
    }
    let run_id = std::process::id();
    let sim = KubeSim::start(SimOptions::default())
        .await
        .context("starting kube-sim")?;
    // Sandboxes run until deleted: only a cancel ends them.
    sim.script_pods(MANAGED_SELECTOR, PodScript::Hang);
    let namespace = "bench";
    let kubeconfig = std::env::temp_dir().join(format!("sfbench-{run_id}-cancel-kubeconfig"));
    std::fs::write(&kubeconfig, sim.kubeconfig_yaml(namespace))?;
    let mut settings = Settings::default();
    settings.amqp.url = args.url.clone();
    settings.topology.prefix = format!("sfbench-{run_id}-cancel");
    settings.topology.retry_delays_secs = vec![1, 2, 5];
    settings.retry.base_delay_secs = 1;
    settings.retry.max_delay_secs = 5;
    settings.worker.concurrency = args.concurrency;
    settings.worker.executor = ExecutorKind::Kubernetes;
    // Several workers on one host: each its own free port.
    settings.worker.http_addr = "127.0.0.1:0".into();
    settings.sandbox.kubernetes.namespace = namespace.into();
    settings.telemetry.log_filter = "warn".into();
    let amqp = Amqp::connect(&settings.amqp, "bench").await?;
    let topology = Topology::new(&settings.topology);
    topology.apply(&amqp).await?;
    let out = measure(&args, &settings, &amqp, &topology, &sim, &kubeconfig).await;
    let _ = topology.delete(&amqp).await;
    amqp.close();
    let _ = std::fs::remove_file(&kubeconfig);
    sim.stop().await;
    let f = out?;
    let p = |q: f64| -> u64 {
        if f.pod_gone_ms.is_empty() {
            return 0;
        }
        let i = ((f.pod_gone_ms.len() as f64 - 1.0) * q).round() as usize;
        f.pod_gone_ms[i]
    };
    println!(
        "cancels: {} ({} met a running sandbox, {} a task that then ended cancelled before starting), workers killed and restarted: {}",
        args.cancels,
        f.pod_gone_ms.len(),
        f.before_start,
        f.kills
    );
    println!(
        "cancel acknowledged -> pod gone: p50 {} ms  p99 {} ms  max {} ms",
        p(0.5),
        p(0.99),
        p(1.0)
    );
    println!(
        "pods left: {}  Jobs created after their cancel was acknowledged: {} (after their worker had read it: {})  tasks without exactly one final result: {}  ended otherwise first: {:?}",
        f.pods_left,
        f.started_after_cancel,
        f.started_after_cancel_read,
        f.tasks_without_one_final,
        f.not_cancelled
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "cancel",
            "cancels": args.cancels,
            "pod_gone_p99_ms": p(0.99),
            "pods_left": f.pods_left,
            "started_after_cancel": f.started_after_cancel,
            "started_after_cancel_read": f.started_after_cancel_read,
            "tasks_without_one_final": f.tasks_without_one_final,
        })
    );
    Ok(())
}

/// The distinct `(attempt, outcome)` final results read per task.
type Finals = HashMap<TaskId, HashSet<(u32, Outcome)>>;

struct Figures {
    pod_gone_ms: Vec<u64>,
    before_start: usize,
    kills: usize,
    pods_left: usize,
    started_after_cancel: usize,
    /// Of those, Jobs whose worker had read the cancel before creating them.
    started_after_cancel_read: usize,
    tasks_without_one_final: usize,
    /// Final outcomes other than `cancelled` (tasks that ended first).
    not_cancelled: HashMap<Outcome, usize>,
}

async fn measure(
    args: &CancelArgs,
    settings: &Settings,
    amqp: &Amqp,
    topology: &Topology,
    sim: &KubeSim,
    kubeconfig: &std::path::Path,
) -> anyhow::Result<Figures> {
    let producer = Producer::with_amqp(amqp, topology.clone(), Limits::default(), false).await?;
    let finals: Arc<Mutex<Finals>> = Arc::default();
    // Why a few tasks ended otherwise than cancelled (for the report).
    let others: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut sub = ResultSubscriber::new(amqp, topology)
        .prefetch(1000)
        .subscribe(StartAt::First)
        .await?;
    let reader = {
        let finals = finals.clone();
        let others = others.clone();
        tokio::spawn(async move {
            while let Some(Ok(r)) = sub.next().await {
                if r.result.is_final
                    && r.result.outcome != Outcome::Cancelled
                    && let Ok(mut o) = others.lock()
                    && o.len() < 3
                {
                    o.push(format!(
                        "{} attempt {}: {} ({})",
                        r.result.task_id,
                        r.result.attempt,
                        r.result.outcome,
                        r.result.error.as_deref().unwrap_or("-")
                    ));
                }
                if r.result.is_final
                    && let Ok(mut f) = finals.lock()
                {
                    f.entry(r.result.task_id)
                        .or_default()
                        .insert((r.result.attempt, r.result.outcome));
                }
            }
        })
    };
    let ns = settings.sandbox.kubernetes.namespace.clone();
    // Cancel time of each task whose pod ran when it was cancelled; a poller
    // records when the pod is gone.
    let awaiting: Mutex<HashMap<TaskId, Instant>> = Mutex::default();
    let gone: Mutex<Vec<u64>> = Mutex::default();
    let stop_poll = tokio_util::sync::CancellationToken::new();
    // Polled beside the cancel loop (both borrow the simulator).
    let poll = async {
        while !stop_poll.is_cancelled() {
            let live: HashSet<TaskId> = sim.pods(&ns).iter().filter_map(task_of).collect();
            if let Ok(mut a) = awaiting.lock() {
                a.retain(|id, at| {
                    if live.contains(id) {
                        return true;
                    }
                    if let Ok(mut g) = gone.lock() {
                        g.push(at.elapsed().as_millis() as u64);
                    }
                    false
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let work = async {
        let mut workers: Vec<WorkerProcess> = (0..args.workers)
            .map(|_| WorkerProcess::spawn(settings, false, Some(kubeconfig), 0))
            .collect::<anyhow::Result<_>>()?;
        let mut tasks: Vec<_> = (0..args.cancels).map(task).collect();
        for t in &mut tasks {
            t.retry.max_attempts = 10;
            // One long step: an evicted pod is still running at its
            // eviction (a `make` with no Makefile would exit 2 first).
            t.steps.truncate(1);
            t.steps[0].run = "sleep 600".into();
        }
        // Every fifth task is evicted each attempt: it cycles through the retry
        // delay queues, where some cancels meet it.
        for t in tasks.iter().step_by(5) {
            sim.script_pods(
                &format!("{LABEL_TASK_ID}={}", t.id),
                PodScript::Evict {
                    after: Duration::from_millis(200),
                },
            );
        }
        let report = producer.enqueue_batch(tasks.clone()).await;
        if !report.all_accepted() {
            bail!("not every task was enqueued");
        }
        // Let the fleet start: some sandboxes running before the first cancel.
        let warm = Instant::now() + Duration::from_secs(60);
        while sim.pods(&ns).len() < args.workers && Instant::now() < warm {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut order: Vec<usize> = (0..tasks.len()).collect();
        shuffle(&mut order, 0x9E37_79B9_7F4A_7C15);
        let mut acked: HashMap<TaskId, SystemTime> = HashMap::with_capacity(tasks.len());
        let mut kills = 0usize;
        for (n, i) in order.into_iter().enumerate() {
            if n > 0 && n % args.kill_every == 0 {
                let victim = n / args.kill_every % workers.len();
                // Dropping the process handle SIGKILLs it (kill_on_drop).
                workers[victim] = WorkerProcess::spawn(settings, false, Some(kubeconfig), 0)?;
                kills += 1;
            }
            let t = &tasks[i];
            let running = sim.pods(&ns).iter().any(|p| task_of(p) == Some(t.id));
            let asked = Instant::now();
            producer
                .publish_cancellation(&Cancellation::task(t.id, "bench", "random cancel"))
                .await?;
            acked.insert(t.id, SystemTime::now());
            if running && let Ok(mut a) = awaiting.lock() {
                a.insert(t.id, asked);
            }
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
        let deadline = Instant::now() + SETTLE_DEADLINE;
        loop {
            let done = finals
                .lock()
                .map(|f| tasks.iter().all(|t| f.contains_key(&t.id)))
                .unwrap_or(false);
            let empty = sim.pods(&ns).is_empty();
            if (done && empty) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Duplicate final deliveries may still be in flight: a short grace.
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop_poll.cancel();
        drop(workers);
        Ok::<_, anyhow::Error>((tasks, acked, kills))
    };
    let (worked, ()) = tokio::join!(work, poll);
    reader.abort();
    let (tasks, acked, kills) = worked?;

    // Jobs created after their cancel's acknowledgement, and of those the
    // ones whose worker had already read the cancel (by stream offset).
    let sentinel = Cancellation::marker("bench");
    producer.publish_cancellation(&sentinel).await?;
    let offsets: HashMap<TaskId, u64> =
        sandfleet_e2e::cancellations_up_to(amqp, topology, sentinel.id)
            .await?
            .into_iter()
            .filter_map(|(offset, c)| match c.target {
                CancelTarget::Task { task_id } => Some((task_id, offset)),
                _ => None,
            })
            .collect();
    let late = sandfleet_e2e::jobs_created_after_cancel(&sim.request_log(), &acked, &offsets);
    let created_after_read = late.iter().filter(|l| !l.raced()).count();
    let finals = finals.lock().map(|f| f.clone()).unwrap_or_default();
    let tasks_without_one_final = tasks
        .iter()
        .filter(|t| finals.get(&t.id).is_none_or(|s| s.len() != 1))
        .count();
    let mut not_cancelled: HashMap<Outcome, usize> = HashMap::new();
    for t in &tasks {
        for (_, o) in finals.get(&t.id).into_iter().flatten() {
            if *o != Outcome::Cancelled {
                *not_cancelled.entry(*o).or_default() += 1;
            }
        }
    }
    for line in others.lock().map(|o| o.clone()).unwrap_or_default() {
        println!("ended otherwise: {line}");
    }
    let mut pod_gone_ms = gone.lock().map(|g| g.clone()).unwrap_or_default();
    pod_gone_ms.sort_unstable();
    let running_cancels = pod_gone_ms.len();
    Ok(Figures {
        pod_gone_ms,
        before_start: tasks.len().saturating_sub(running_cancels),
        kills,
        pods_left: sim.pods(&ns).len(),
        started_after_cancel: late.len(),
        started_after_cancel_read: created_after_read,
        tasks_without_one_final,
        not_cancelled,
    })
}
