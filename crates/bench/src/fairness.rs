//! `sandfleet-bench fairness`: fair sharing between repositories on a
//! saturated fleet: two worker processes, 8 sandboxes each (16 in all), the
//! Kubernetes executor on kube-sim, the real broker.
//!
//! Three kinds of run, each with the whole backlog enqueued before the
//! workers start (so the fleet is saturated from its first task to the last);
//! the fair and FIFO runs alternate `--pairs` times:
//!
//! 1. **fair**: 5 repositories (5 tenants, equal weights), one with 10× the
//!    others' backlog, `topology.task_shards` = `--shards`.
//! 2. **fifo**: the same tasks on the single FIFO queue (`task_shards = 0`),
//!    for throughput.
//! 3. **tenant split**: tenant `big` spreads its backlog over 20 repositories,
//!    tenant `small` has one; equal tenant weights.
//!
//! Service is measured where it is given: the order of kube-sim's Job creates
//! (one per task; every create is a sandbox started). The starts are cut into
//! windows of `--window` starts; in each window where the set of repositories
//! with work left is the same at its start and its end, every repository's
//! share of the window's starts is compared with its weight over the
//! weights of those repositories: `max_share_error` is the largest
//! |share − expected| / expected. `tenant_split_gain` is tenant `big`'s share
//! over such windows divided by its weighted share (1.0 = no gain).
//! Throughput is tasks over the time from the first Job create to the last
//! Job delete (the worker deletes a Job once its result is published and the
//! task acked); `throughput_vs_fifo` is fair / FIFO, the median over the
//! pairs. Beside it, figures the machine's load moves less: the share of
//! slot-time the Jobs held (idle slots would show the scheduler holding work
//! back) and the workers' CPU per task (`/proc`).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sandfleet_amqp::{Amqp, Topology};
use sandfleet_kube_sim::{KubeSim, SimOptions};
use sandfleet_producer::Producer;
use sandfleet_proto::{Limits, Task, shard_for};
use sandfleet_sandbox::job::{ANNOTATION_WORKER, LABEL_TASK_ID};
use sandfleet_settings::{ExecutorKind, Settings};

use crate::pipeline::{WorkerProcess, task};

/// Worker processes and sandboxes per worker: 16 sandboxes in all.
const WORKERS: usize = 2;
const PER_WORKER: u16 = 8;

/// How long one run may take.
const RUN_DEADLINE: Duration = Duration::from_secs(600);

/// Options of the fairness benchmark.
#[derive(Debug, clap::Args)]
pub(crate) struct FairnessArgs {
    /// Backlog of each quiet repository (the noisy one enqueues 10×).
    #[arg(long, default_value_t = 64)]
    backlog: usize,
    /// Task queue shards in the fair runs.
    #[arg(long, default_value_t = 32)]
    shards: u16,
    /// Starts per measuring window.
    #[arg(long, default_value_t = 160)]
    window: usize,
    /// How long each task's step runs in its sandbox, in milliseconds.
    #[arg(long, default_value_t = 300)]
    task_ms: u64,
    /// Fair and FIFO runs, alternated this many times: `throughput_vs_fifo`
    /// is the median of each pair's ratio (a pair's two runs are a minute
    /// apart, so a load change on a shared machine moves both), and
    /// `max_share_error` the worst over the fair runs.
    #[arg(long, default_value_t = 1)]
    pairs: usize,
    /// Broker URL.
    #[arg(
        long,
        env = "AMQP_ADDR",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub(crate) url: String,
}

/// What one run measured.
struct Run {
    /// Repository of each task started, in start order.
    starts: Vec<String>,
    tasks_per_sec: f64,
    /// CPU (user + system) of the worker processes per task, from `/proc`:
    /// where the fair path's own cost shows, apart from the machine's load.
    worker_cpu_per_task: Duration,
    /// CPU of this process per task over the same time: kube-sim (the API
    /// server, Job controller and kubelet) and the progress polling.
    sim_cpu_per_task: Duration,
    /// Mean time from a task's Job create to its delete: how long a task
    /// holds a sandbox slot.
    job_lifetime: Duration,
    /// The share of the fleet's slot-time (16 × the run's time) that Jobs
    /// held: below 1, slots stood idle between one task and the next.
    slots_busy: f64,
    /// How long after the run's first Job the last worker to start created
    /// its first: the slots that stood idle while it subscribed.
    start_skew: Duration,
}

/// Runs the benchmark and prints the figures; the last line is JSON.
pub(crate) async fn run(args: FairnessArgs) -> anyhow::Result<()> {
    if args.backlog == 0 || args.window == 0 || args.shards == 0 || args.pairs == 0 {
        bail!("--backlog, --window, --shards and --pairs must be at least 1");
    }
    let repos: Vec<String> = (0..5).map(|i| format!("team{i}/app")).collect();
    let mut backlog: Vec<(String, usize)> = repos
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (
                r.clone(),
                if i == 0 {
                    10 * args.backlog
                } else {
                    args.backlog
                },
            )
        })
        .collect();
    println!(
        "repositories (shard of {}): {}",
        args.shards,
        repos
            .iter()
            .map(|r| format!("{r}={}", shard_for(r, args.shards)))
            .collect::<Vec<_>>()
            .join(" ")
    );

    let weights: HashMap<String, f64> = repos.iter().map(|r| (r.clone(), 1.0)).collect();
    let totals: HashMap<String, usize> = backlog.iter().cloned().collect();
    let mut pairs = Vec::new();
    let mut fair_err: f64 = 0.0;
    let mut fair_windows = 0;
    for p in 0..args.pairs {
        let fair = fleet_run(&args, &format!("fair{p}"), args.shards, &backlog).await?;
        let fifo = fleet_run(&args, &format!("fifo{p}"), 0, &backlog).await?;
        let (err, windows) = share_error(&fair.starts, &totals, &weights, args.window);
        fair_err = fair_err.max(err);
        fair_windows += windows;
        println!(
            "pair {}: fair {:.1} vs fifo {:.1} tasks/s = {:.3}; sandbox slots busy {:.1}% vs {:.1}%; worker CPU per task {:.1} vs {:.1} ms; max share error {:.3}",
            p + 1,
            fair.tasks_per_sec,
            fifo.tasks_per_sec,
            fair.tasks_per_sec / fifo.tasks_per_sec,
            100.0 * fair.slots_busy,
            100.0 * fifo.slots_busy,
            fair.worker_cpu_per_task.as_secs_f64() * 1000.0,
            fifo.worker_cpu_per_task.as_secs_f64() * 1000.0,
            err,
        );
        pairs.push((fair, fifo));
    }
    // The pair with the median ratio is the one shown below.
    pairs.sort_by(|a, b| {
        (a.0.tasks_per_sec / a.1.tasks_per_sec).total_cmp(&(b.0.tasks_per_sec / b.1.tasks_per_sec))
    });
    let (fair, fifo) = pairs.swap_remove(pairs.len() / 2);
    let (fifo_err, _) = share_error(&fifo.starts, &totals, &weights, args.window);

    // Tenant split: `big` over 20 repositories, `small` with one.
    backlog = (0..20)
        .map(|i| (format!("big/r{i}"), args.backlog))
        .chain(std::iter::once(("small/app".to_owned(), 10 * args.backlog)))
        .collect();
    let split = fleet_run(&args, "split", args.shards, &backlog).await?;
    let tenant_of = |r: &str| r.split('/').next().unwrap_or(r).to_owned();
    let tenant_starts: Vec<String> = split.starts.iter().map(|r| tenant_of(r)).collect();
    let mut tenant_totals: HashMap<String, usize> = HashMap::new();
    for (r, n) in &backlog {
        *tenant_totals.entry(tenant_of(r)).or_default() += n;
    }
    let tenant_weights: HashMap<String, f64> =
        [("big".to_owned(), 1.0), ("small".to_owned(), 1.0)].into();
    let big_share = backlogged_share(&tenant_starts, &tenant_totals, "big", "small");
    let tenant_split_gain = big_share / 0.5;
    let (split_err, _) = share_error(&tenant_starts, &tenant_totals, &tenant_weights, args.window);

    let throughput_vs_fifo = fair.tasks_per_sec / fifo.tasks_per_sec;
    println!(
        "fair:  {:>6.1} tasks/s; max share error {:.3} over {} windows of {} starts ({} fair runs)",
        fair.tasks_per_sec, fair_err, fair_windows, args.window, args.pairs
    );
    println!(
        "fifo:  {:>6.1} tasks/s; max share error {:.3} (for comparison)",
        fifo.tasks_per_sec, fifo_err
    );
    println!(
        "split: {:>6.1} tasks/s; tenant big (20 repositories) got {:.3} of the service while both tenants had work (weighted share 0.5); tenant share error {:.3}",
        split.tasks_per_sec, big_share, split_err
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "CPU per task: workers {:.1} ms (fair) vs {:.1} ms (fifo) vs {:.1} ms (split); kube-sim and this process {:.1} / {:.1} / {:.1} ms",
        ms(fair.worker_cpu_per_task),
        ms(fifo.worker_cpu_per_task),
        ms(split.worker_cpu_per_task),
        ms(fair.sim_cpu_per_task),
        ms(fifo.sim_cpu_per_task),
        ms(split.sim_cpu_per_task),
    );
    println!(
        "sandbox slots busy: {:.1}% (fair) vs {:.1}% (fifo) vs {:.1}% (split); Job create to delete per task: {:.0} / {:.0} / {:.0} ms",
        100.0 * fair.slots_busy,
        100.0 * fifo.slots_busy,
        100.0 * split.slots_busy,
        ms(fair.job_lifetime),
        ms(fifo.job_lifetime),
        ms(split.job_lifetime),
    );
    println!(
        "the second worker's first Job came {:.0} ms (fair) / {:.0} ms (fifo) / {:.0} ms (split) after the first worker's",
        ms(fair.start_skew),
        ms(fifo.start_skew),
        ms(split.start_skew),
    );
    let quiet_done = |starts: &[String]| {
        starts
            .iter()
            .rposition(|r| r != &repos[0])
            .map_or(0, |i| i + 1)
    };
    println!(
        "the quiet repositories' last task started at start #{} (fair) vs #{} (fifo) of {}",
        quiet_done(&fair.starts),
        quiet_done(&fifo.starts),
        fair.starts.len()
    );
    let order = |starts: &[String]| {
        starts
            .iter()
            .take(120)
            .map(|r| r.trim_start_matches("team").chars().next().unwrap_or('?'))
            .collect::<String>()
    };
    println!(
        "start order, first 120 (digit = team<n>/app): fair {}",
        order(&fair.starts)
    );
    println!(
        "                                               fifo {}",
        order(&fifo.starts)
    );
    let r3 = |v: f64| (v * 1000.0).round() / 1000.0;
    println!(
        "{{\"bench\":\"fairness\",\"max_share_error\":{},\"tenant_split_gain\":{},\"throughput_vs_fifo\":{}}}",
        serde_json::Value::from(r3(fair_err)),
        serde_json::Value::from(r3(tenant_split_gain)),
        serde_json::Value::from(r3(throughput_vs_fifo)),
    );
    Ok(())
}

/// The largest relative share error over the windows where the set of keys
/// with work left does not change, and how many such windows there were.
fn share_error(
    starts: &[String],
    totals: &HashMap<String, usize>,
    weights: &HashMap<String, f64>,
    window: usize,
) -> (f64, usize) {
    let mut left: HashMap<&str, usize> = totals.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    let mut worst: f64 = 0.0;
    let mut windows = 0;
    for chunk in starts.chunks(window) {
        if chunk.len() < window {
            break;
        }
        let before: Vec<&str> = sorted_with_work(&left);
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for k in chunk {
            *counts.entry(k.as_str()).or_default() += 1;
            if let Some(n) = left.get_mut(k.as_str()) {
                *n = n.saturating_sub(1);
            }
        }
        // Keys whose work ran out within the window had work for part of
        // it only: such windows say nothing about shares.
        let after = sorted_with_work(&left);
        let drained_at_end = before
            .iter()
            .filter(|k| !after.contains(k))
            .all(|k| chunk.last().map(String::as_str) == Some(*k));
        if before != after && !drained_at_end {
            continue;
        }
        windows += 1;
        let total_w: f64 = before
            .iter()
            .map(|k| weights.get(*k).copied().unwrap_or(1.0))
            .sum();
        for k in &before {
            let expected = weights.get(*k).copied().unwrap_or(1.0) / total_w;
            let share = *counts.get(k).unwrap_or(&0) as f64 / chunk.len() as f64;
            worst = worst.max((share - expected).abs() / expected);
        }
    }
    (worst, windows)
}

fn sorted_with_work<'a>(left: &HashMap<&'a str, usize>) -> Vec<&'a str> {
    let mut v: Vec<&str> = left
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, _)| *k)
        .collect();
    v.sort_unstable();
    v
}

/// `a`'s share of the starts made while both `a` and `b` had work left.
fn backlogged_share(starts: &[String], totals: &HashMap<String, usize>, a: &str, b: &str) -> f64 {
    let mut left_a = totals.get(a).copied().unwrap_or(0);
    let mut left_b = totals.get(b).copied().unwrap_or(0);
    let (mut na, mut n) = (0usize, 0usize);
    for k in starts {
        if left_a == 0 || left_b == 0 {
            break;
        }
        n += 1;
        if k == a {
            na += 1;
            left_a -= 1;
        } else if k == b {
            left_b -= 1;
        }
    }
    if n == 0 {
        f64::NAN
    } else {
        na as f64 / n as f64
    }
}

/// One fleet run: a fresh kube-sim and topology, the backlog enqueued, two
/// worker processes started, until every Job was deleted.
async fn fleet_run(
    args: &FairnessArgs,
    label: &str,
    shards: u16,
    backlog: &[(String, usize)],
) -> anyhow::Result<Run> {
    let run_id = std::process::id();
    let sim = KubeSim::start(SimOptions::default())
        .await
        .context("starting kube-sim")?;
    let namespace = "bench";
    let kubeconfig = std::env::temp_dir().join(format!("sfbench-{run_id}-fair-{label}-kubeconfig"));
    std::fs::write(&kubeconfig, sim.kubeconfig_yaml(namespace))?;
    let mut settings = Settings::default();
    settings.amqp.url = args.url.clone();
    settings.topology.prefix = format!("sfbench-{run_id}-fair-{label}");
    settings.topology.retry_delays_secs = vec![1, 2, 5];
    settings.topology.task_shards = shards;
    settings.worker.concurrency = PER_WORKER;
    settings.worker.executor = ExecutorKind::Kubernetes;
    settings.sandbox.kubernetes.namespace = namespace.into();
    settings.telemetry.log_filter = "warn".into();

    let amqp = Amqp::connect(&settings.amqp, "bench").await?;
    let topology = Topology::new(&settings.topology);
    topology.apply(&amqp).await?;
    let out = measure(
        args,
        &settings,
        &amqp,
        &topology,
        &sim,
        &kubeconfig,
        backlog,
    )
    .await;
    let _ = topology.delete(&amqp).await;
    amqp.close();
    let _ = std::fs::remove_file(&kubeconfig);
    sim.stop().await;
    out
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &FairnessArgs,
    settings: &Settings,
    amqp: &Amqp,
    topology: &Topology,
    sim: &KubeSim,
    kubeconfig: &std::path::Path,
    backlog: &[(String, usize)],
) -> anyhow::Result<Run> {
    let producer = Producer::with_amqp(amqp, topology.clone(), Limits::default(), false).await?;
    // Each repository's backlog in one go, the noisy one first: in one
    // FIFO everything else waits behind it.
    let mut repo_of: HashMap<String, String> = HashMap::new();
    let mut i = 0;
    let mut tasks: Vec<Task> = Vec::new();
    for (repo, n) in backlog {
        for _ in 0..*n {
            let mut t = task(i);
            i += 1;
            t.source.repository = repo.clone();
            t.steps.truncate(1);
            t.steps[0].run = format!("sleep {}", args.task_ms as f64 / 1000.0);
            repo_of.insert(t.id.to_string(), repo.clone());
            tasks.push(t);
        }
    }
    let total = tasks.len();
    for chunk in tasks.chunks(200) {
        let report = producer.enqueue_batch(chunk.to_vec()).await;
        if !report.all_accepted() {
            bail!("the broker refused part of the backlog");
        }
    }
    let bench_cpu_at_start = crate::procfs::cpu_of(std::process::id());
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let mut s = settings.clone();
        s.worker.name = Some(format!("{}-w{i}", settings.topology.prefix));
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        s.worker.http_addr = format!("127.0.0.1:{port}");
        workers.push(WorkerProcess::spawn(&s, false, Some(kubeconfig), 0)?);
    }
    let deadline = Instant::now() + RUN_DEADLINE;
    loop {
        let log = sim.request_log();
        let deletes = log
            .iter()
            .filter(|r| r.verb() == "delete" && r.resource() == "jobs" && r.status < 300)
            .count();
        if deletes >= total {
            break;
        }
        if Instant::now() > deadline {
            bail!("{deletes} of {total} tasks done at the deadline");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let worker_cpu: Duration = workers.iter().map(|w| crate::procfs::cpu_of(w.pid)).sum();
    let sim_cpu = crate::procfs::cpu_of(std::process::id()).saturating_sub(bench_cpu_at_start);
    drop(workers);
    let log = sim.request_log();
    let creates: Vec<_> = log
        .iter()
        .filter(|r| r.verb() == "create" && r.resource() == "jobs" && r.status < 300)
        .collect();
    let mut starts = Vec::with_capacity(total);
    for r in &creates {
        let id = r
            .body
            .as_ref()
            .and_then(|b| b.pointer("/metadata/labels"))
            .and_then(|l| l.get(LABEL_TASK_ID))
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        if let Some(repo) = repo_of.get(id) {
            starts.push(repo.clone());
        }
    }
    let first = creates.first().map(|r| r.at).context("no Job created")?;
    let last = log
        .iter()
        .filter(|r| r.verb() == "delete" && r.resource() == "jobs")
        .map(|r| r.at)
        .max()
        .context("no Job deleted")?;
    let elapsed = last.duration_since(first).unwrap_or_default();
    let created: HashMap<&str, std::time::SystemTime> = creates
        .iter()
        .filter_map(|r| {
            let name = r.body.as_ref()?.pointer("/metadata/name")?.as_str()?;
            Some((name, r.at))
        })
        .collect();
    let mut held = Duration::ZERO;
    let mut jobs = 0u32;
    for r in log
        .iter()
        .filter(|r| r.verb() == "delete" && r.resource() == "jobs" && r.status < 300)
    {
        if let Some(at) = r.name().and_then(|n| created.get(n)) {
            held += r.at.duration_since(*at).unwrap_or_default();
            jobs += 1;
        }
    }
    let mut first_by_worker: HashMap<&str, std::time::SystemTime> = HashMap::new();
    for r in &creates {
        let worker = r
            .body
            .as_ref()
            .and_then(|b| b.pointer("/metadata/annotations"))
            .and_then(|a| a.get(ANNOTATION_WORKER))
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        first_by_worker.entry(worker).or_insert(r.at);
    }
    let start_skew = first_by_worker
        .values()
        .max()
        .and_then(|t| t.duration_since(first).ok())
        .unwrap_or_default();
    let slots = f64::from(u32::try_from(WORKERS).unwrap_or(1) * u32::from(PER_WORKER));
    let per_task = |d: Duration| d / u32::try_from(total.max(1)).unwrap_or(u32::MAX);
    Ok(Run {
        starts,
        tasks_per_sec: total as f64 / elapsed.as_secs_f64().max(1e-9),
        worker_cpu_per_task: per_task(worker_cpu),
        sim_cpu_per_task: per_task(sim_cpu),
        job_lifetime: held / jobs.max(1),
        slots_busy: held.as_secs_f64() / (slots * elapsed.as_secs_f64()).max(1e-9),
        start_skew,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn share_error_counts_only_windows_with_a_steady_set_of_keys() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let totals: HashMap<String, usize> = [("a".into(), 6), ("b".into(), 2)].into();
        let w: HashMap<String, f64> = [("a".into(), 1.0), ("b".into(), 1.0)].into();
        // a b a b | a a a a : window 1 fair (b drains at its end), window 2 a alone.
        let (err, n) = share_error(
            &s(&["a", "b", "a", "b", "a", "a", "a", "a"]),
            &totals,
            &w,
            4,
        );
        assert_eq!(n, 2);
        assert!(err.abs() < 1e-9, "{err}");
        // a a a b | ...: a got 3/4 where 1/2 was due.
        let (err, _) = share_error(
            &s(&["a", "a", "a", "b", "b", "a", "a", "a"]),
            &totals,
            &w,
            4,
        );
        assert!((err - 0.5).abs() < 1e-9, "{err}");
        let share = backlogged_share(&s(&["a", "b", "a", "b", "a"]), &totals, "a", "b");
        assert!((share - 0.5).abs() < 1e-9);
    }
}
