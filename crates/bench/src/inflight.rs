//! `sandfleet-bench inflight`: one worker process — `sandfleet worker`, the
//! release binary beside this one that operators run — with the Kubernetes
//! executor on kube-sim, `--tasks` sandboxes that run until deleted (pods
//! scripted `Hang`), all in flight at once.
//!
//! Measured on the worker process, from `/proc/<pid>/status`: RSS once
//! `/readyz` answers 200 (connected, watchers synced, nothing in flight),
//! and the peak (`VmHWM`) once every sandbox runs and the worker has had a
//! sampling window to observe them. Dispatch overhead is the worker's own
//! `sandfleet_dispatch_duration_seconds` histogram (a delivery's arrival at
//! the dispatch loop → its Job create request sent), read from `/metrics`;
//! its quantiles are bucket upper bounds. Beside it, per task, from just
//! before the enqueue's publish to kube-sim's arrival time of the Job
//! create: that adds the publish, the broker's delivery hop and the
//! request's way into kube-sim. Tasks are enqueued one at a time,
//! `--interval-ms` apart, so later tasks are dispatched by a worker that
//! already holds the earlier ones. API requests per task count every logged request except
//! the shared watchers' list and watch, like the `kube` bench.

use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use sandfleet_amqp::{Amqp, Topology};
use sandfleet_kube_sim::{KubeSim, PodScript, RequestRecord, SimOptions};
use sandfleet_producer::Producer;
use sandfleet_proto::Limits;
use sandfleet_sandbox::job::{LABEL_TASK_ID, MANAGED_SELECTOR};
use sandfleet_settings::{ExecutorKind, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pipeline::{WorkerProcess, task};
use crate::procfs::rss_kib;

/// How long the worker may take to become ready, and the sandboxes to start
/// (plus [`START_ALLOWANCE`] per sandbox).
const PHASE_DEADLINE: Duration = Duration::from_secs(180);

/// Time allowed per sandbox for every one to be created and running, on top
/// of [`PHASE_DEADLINE`] and the enqueue interval: 5,000 on a loaded 2-core
/// machine (broker, kube-sim and worker sharing it) need more than 3 minutes.
const START_ALLOWANCE: Duration = Duration::from_millis(40);

/// How long RSS is sampled once every sandbox runs.
const SAMPLE_WINDOW: Duration = Duration::from_secs(3);

/// Options of the in-flight benchmark.
#[derive(Debug, clap::Args)]
pub(crate) struct InflightArgs {
    /// Sandboxes in flight at once.
    #[arg(long, default_value_t = 1000)]
    tasks: u16,
    /// Time between two enqueues, in milliseconds.
    #[arg(long, default_value_t = 5)]
    interval_ms: u64,
    /// The `sandfleet` binary whose `worker` is measured; default: the one
    /// beside this binary.
    #[arg(long)]
    sandfleet: Option<std::path::PathBuf>,
    /// Runtime threads of the worker process; 0 lets tokio count the CPUs.
    /// Default: the worker's own (`worker.runtime_threads`).
    #[arg(long, default_value_t = crate::pipeline::default_worker_threads())]
    worker_threads: usize,
    /// Broker URL.
    #[arg(
        long,
        env = "AMQP_ADDR",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub(crate) url: String,
}

/// Runs the benchmark and prints the figures; the last line is JSON.
pub(crate) async fn run(args: InflightArgs) -> anyhow::Result<()> {
    if args.tasks == 0 {
        bail!("--tasks must be at least 1");
    }
    let binary = crate::idle::sandfleet_binary(args.sandfleet.as_deref())?;
    println!("{}", crate::pipeline::threads_line(args.worker_threads));
    let run_id = std::process::id();
    let sim = KubeSim::start(SimOptions::default())
        .await
        .context("starting kube-sim")?;
    sim.script_pods(MANAGED_SELECTOR, PodScript::Hang);
    let namespace = "bench";
    let kubeconfig = std::env::temp_dir().join(format!("sfbench-{run_id}-inflight-kubeconfig"));
    std::fs::write(&kubeconfig, sim.kubeconfig_yaml(namespace))?;

    let mut settings = Settings::default();
    settings.amqp.url = args.url.clone();
    settings.topology.prefix = format!("sfbench-{run_id}-inflight");
    settings.worker.concurrency = args.tasks;
    settings.worker.executor = ExecutorKind::Kubernetes;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    settings.worker.http_addr = format!("127.0.0.1:{port}");
    settings.sandbox.kubernetes.namespace = namespace.into();
    settings.telemetry.log_filter = "warn".into();

    let amqp = Amqp::connect(&settings.amqp, "bench").await?;
    let topology = Topology::new(&settings.topology);
    topology.apply(&amqp).await?;
    let out = measure(
        &args,
        &binary,
        &settings,
        &amqp,
        &topology,
        &sim,
        &kubeconfig,
    )
    .await;
    let _ = topology.delete(&amqp).await;
    amqp.close();
    let _ = std::fs::remove_file(&kubeconfig);
    sim.stop().await;
    let f = out?;

    println!(
        "worker RSS: idle {:.1} MiB, peak with {} in flight {:.1} MiB ({:.1} KiB per in-flight task)",
        f.idle_mib,
        args.tasks,
        f.peak_mib,
        (f.peak_mib - f.idle_mib) * 1024.0 / f64::from(args.tasks)
    );
    println!(
        "dispatch in the worker (delivery received -> Job create sent), bucket bounds: p50 <= {:.2} ms  p99 <= {:.2} ms",
        f.worker_p50_ms, f.worker_p99_ms
    );
    println!(
        "enqueue sent -> Job create received: p50 {:.2} ms  p99 {:.2} ms",
        f.dispatch_p50_ms, f.dispatch_p99_ms
    );
    println!(
        "API requests per task (watch and the shared list excluded): {:.2}  {:?}",
        f.api_requests_per_task, f.by_verb
    );
    println!(
        "{}",
        crate::json_line(
            "inflight",
            &[
                ("in_flight", json!(args.tasks)),
                ("peak_rss_mib", json!(round1(f.peak_mib))),
                ("idle_rss_mib", json!(round1(f.idle_mib))),
                ("dispatch_p99_ms", json!(round3(f.worker_p99_ms))),
                (
                    "api_requests_per_task",
                    json!(round3(f.api_requests_per_task))
                ),
                ("worker_threads", json!(args.worker_threads)),
            ],
        )
    );
    Ok(())
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

struct Figures {
    idle_mib: f64,
    peak_mib: f64,
    dispatch_p50_ms: f64,
    dispatch_p99_ms: f64,
    worker_p50_ms: f64,
    worker_p99_ms: f64,
    api_requests_per_task: f64,
    by_verb: std::collections::BTreeMap<String, usize>,
}

async fn measure(
    args: &InflightArgs,
    binary: &std::path::Path,
    settings: &Settings,
    amqp: &Amqp,
    topology: &Topology,
    sim: &KubeSim,
    kubeconfig: &std::path::Path,
) -> anyhow::Result<Figures> {
    let producer = Producer::with_amqp(amqp, topology.clone(), Limits::default(), false).await?;
    let worker =
        WorkerProcess::spawn_sandfleet(binary, settings, Some(kubeconfig), args.worker_threads)?;
    let http = settings.worker.http_addr.clone();
    let deadline = Instant::now() + PHASE_DEADLINE;
    while http_status(&http, "/readyz").await != Some(200) {
        if Instant::now() > deadline {
            bail!("the worker was not ready within {PHASE_DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (idle_kib, _) = rss_kib(worker.pid).context("reading the worker's RSS")?;
    sim.clear_request_log();

    let n = usize::from(args.tasks);
    let deadline = Instant::now() + PHASE_DEADLINE + START_ALLOWANCE * u32::from(args.tasks);
    let mut confirmed: HashMap<String, SystemTime> = HashMap::with_capacity(n);
    let interval = Duration::from_millis(args.interval_ms);
    let started = tokio::time::Instant::now();
    for i in 0..n {
        let mut t = task(i);
        // Long enough that no sandbox ends during the run, with a pending
        // allowance long enough that thousands of pods starting slowly are
        // not given up on (the retry would create a second Job); together
        // within the default consumer timeout's budget (30 min less 60 s).
        t.sandbox.pending_timeout_secs = 600;
        t.sandbox.deadline_secs = 1800 - 120 - 600;
        // Before the publish: the Job create can arrive before the confirm.
        confirmed.insert(t.id.to_string(), SystemTime::now());
        producer.enqueue(&t).await?;
        tokio::time::sleep_until(started + interval * u32::try_from(i + 1)?).await;
    }

    // Every Job created and every pod running.
    let mut log;
    loop {
        log = sim.request_log();
        let creates = log
            .iter()
            .filter(|r| r.verb() == "create" && r.resource() == "jobs" && r.status < 300)
            .count();
        let running = if creates >= n {
            sim.pods(settings.sandbox.kubernetes.namespace.as_str())
                .iter()
                .filter(|p| p.pointer("/status/phase").and_then(|v| v.as_str()) == Some("Running"))
                .count()
        } else {
            0
        };
        if running >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("{creates} Jobs created, {running} pods running of {n} at the deadline");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The worker observes the running pods through its watch; sample its
    // memory over a fixed window (VmHWM keeps the peak in between).
    let window_end = Instant::now() + SAMPLE_WINDOW;
    while Instant::now() < window_end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, peak_kib) = rss_kib(worker.pid).context("reading the worker's RSS")?;
    let log = sim.request_log();
    let metrics = http_get(&http, "/metrics")
        .await
        .filter(|(status, _)| *status == 200)
        .map(|(_, body)| body)
        .context("reading the worker's /metrics")?;
    drop(worker);
    let buckets = histogram_buckets(&metrics, "sandfleet_dispatch_duration_seconds");
    let worker_q = |q: f64| histogram_quantile(&buckets, q).map_or(f64::NAN, |s| s * 1e3);

    let mut dispatch: Vec<Duration> = log
        .iter()
        .filter(|r| r.verb() == "create" && r.resource() == "jobs")
        .filter_map(|r| {
            let id = r
                .body
                .as_ref()?
                .pointer("/metadata/labels")?
                .get(LABEL_TASK_ID)?
                .as_str()?;
            r.at.duration_since(*confirmed.get(id)?).ok()
        })
        .collect();
    if dispatch.len() < n {
        bail!("matched {} Job creates to {n} tasks", dispatch.len());
    }
    dispatch.sort_unstable();
    let pct = |p: f64| {
        let i = ((dispatch.len() as f64 - 1.0) * p).round() as usize;
        dispatch.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    let shared = |r: &&RequestRecord| {
        r.verb() == "watch"
            || (r.verb() == "list"
                && r.query_param("labelSelector").as_deref() == Some(MANAGED_SELECTOR))
    };
    let mut by_verb = std::collections::BTreeMap::<String, usize>::new();
    for r in log.iter().filter(|r| !shared(r)) {
        *by_verb
            .entry(format!("{} {}", r.verb(), r.resource()))
            .or_default() += 1;
    }
    let per_task = by_verb.values().sum::<usize>() as f64 / n as f64;
    Ok(Figures {
        idle_mib: idle_kib as f64 / 1024.0,
        peak_mib: peak_kib as f64 / 1024.0,
        dispatch_p50_ms: pct(0.5),
        dispatch_p99_ms: pct(0.99),
        worker_p50_ms: worker_q(0.5),
        worker_p99_ms: worker_q(0.99),
        api_requests_per_task: per_task,
        by_verb,
    })
}

/// The status code of `GET path` on `addr`, or `None` when it cannot be had.
pub(crate) async fn http_status(addr: &str, path: &str) -> Option<u16> {
    http_get(addr, path).await.map(|(status, _)| status)
}

/// The cumulative buckets `(le, count)` of a histogram in a Prometheus text
/// exposition, in the order listed (ascending `le`).
fn histogram_buckets(text: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The upper bound of the bucket holding quantile `q` (`None` without
/// observations).
fn histogram_quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil() as u64;
    buckets.iter().find(|(_, c)| *c >= rank).map(|(le, _)| *le)
}

/// Status and body of `GET path` on `addr`, or `None` when they cannot be had.
pub(crate) async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Some((status, body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_quantile_is_the_upper_bound_of_its_bucket() {
        let text = "# TYPE sandfleet_dispatch_duration_seconds histogram\n\
            sandfleet_dispatch_duration_seconds_sum 0.9\n\
            sandfleet_dispatch_duration_seconds_count 100\n\
            sandfleet_dispatch_duration_seconds_bucket{le=\"0.001\"} 50\n\
            sandfleet_dispatch_duration_seconds_bucket{le=\"0.005\"} 98\n\
            sandfleet_dispatch_duration_seconds_bucket{le=\"0.01\"} 100\n\
            sandfleet_dispatch_duration_seconds_bucket{le=\"+Inf\"} 100\n";
        let b = histogram_buckets(text, "sandfleet_dispatch_duration_seconds");
        assert_eq!(b.len(), 4);
        assert_eq!(histogram_quantile(&b, 0.5), Some(0.001));
        assert_eq!(histogram_quantile(&b, 0.98), Some(0.005));
        assert_eq!(histogram_quantile(&b, 0.99), Some(0.01));
        assert_eq!(histogram_quantile(&[(f64::INFINITY, 0)], 0.99), None);
    }
}
