//! `sandfleet-bench idle`: the resident memory of an idle worker — the
//! `sandfleet worker` process operators run (the release binary beside this
//! one), connected to RabbitMQ, ready, nothing in flight.
//!
//! For each executor (local, and Kubernetes on kube-sim) the worker is started
//! `--runs` times; each run waits for `/readyz` to answer 200, lets the worker
//! settle, then reads `VmRSS`, `RssAnon` and `RssFile` from
//! `/proc/<pid>/status`. Medians are printed; the last line is JSON.
//! `RssFile` is the binary's and libraries' pages the process touched, shared
//! with every other process running the same binary; `RssAnon` is the
//! process's own memory (heap, stacks).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sandfleet_amqp::{Amqp, Topology};
use sandfleet_kube_sim::{KubeSim, SimOptions};
use sandfleet_settings::Settings;

use crate::inflight::http_status;

/// How long a worker may take to become ready.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// Options of the idle-memory benchmark.
#[derive(Debug, clap::Args)]
pub(crate) struct IdleArgs {
    /// Worker starts per executor; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds between readiness and the reading.
    #[arg(long, default_value_t = 3)]
    settle_secs: u64,
    /// The `sandfleet` binary; default: the one beside this binary.
    #[arg(long)]
    sandfleet: Option<PathBuf>,
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

/// One reading, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    rss: u64,
    anon: u64,
    file: u64,
    threads: u64,
}

/// Runs the benchmark and prints the figures; the last line is JSON.
pub(crate) async fn run(args: IdleArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let binary = sandfleet_binary(args.sandfleet.as_deref())?;
    println!("{}", crate::pipeline::threads_line(args.worker_threads));
    let run_id = std::process::id();
    let local = measure(
        &args,
        &binary,
        &format!("sfbench-{run_id}-idle-local"),
        None,
    )
    .await?;
    print_reading("local executor:              ", &local);

    let sim = KubeSim::start(SimOptions::default())
        .await
        .context("starting kube-sim")?;
    let kubeconfig = std::env::temp_dir().join(format!("sfbench-{run_id}-idle-kubeconfig"));
    std::fs::write(&kubeconfig, sim.kubeconfig_yaml("bench"))?;
    let kube = measure(
        &args,
        &binary,
        &format!("sfbench-{run_id}-idle-kube"),
        Some(&kubeconfig),
    )
    .await;
    let _ = std::fs::remove_file(&kubeconfig);
    sim.stop().await;
    let kube = kube?;
    print_reading("kubernetes executor (kube-sim):", &kube);

    let mib = |kib: u64| (kib as f64 / 1024.0 * 10.0).round() / 10.0;
    println!(
        "{}",
        serde_json::json!({
            "bench": "idle",
            "binary": binary.display().to_string(),
            "runs": args.runs,
            "local_rss_mib": mib(local.rss),
            "local_anon_mib": mib(local.anon),
            "local_file_mib": mib(local.file),
            "kube_rss_mib": mib(kube.rss),
            "kube_anon_mib": mib(kube.anon),
            "kube_file_mib": mib(kube.file),
            "threads": local.threads,
            "worker_threads": args.worker_threads,
        })
    );
    Ok(())
}

/// The `sandfleet` binary operators run: `given`, or the one beside this
/// benchmark (built with `cargo build --release -p sandfleet-cli`).
pub(crate) fn sandfleet_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let binary = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .context("locating this binary")?
            .with_file_name("sandfleet"),
    };
    if !binary.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p sandfleet-cli` (or pass --sandfleet)",
            binary.display()
        );
    }
    Ok(binary)
}

fn print_reading(label: &str, r: &Reading) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "idle `sandfleet worker`, {label} RSS {:.1} MiB (anonymous {:.1} MiB, file-backed {:.1} MiB), {} threads",
        mib(r.rss),
        mib(r.anon),
        mib(r.file),
        r.threads
    );
}

/// Starts the worker `args.runs` times on topology `prefix` and returns the
/// median of each figure; deletes the topology afterwards.
async fn measure(
    args: &IdleArgs,
    binary: &Path,
    prefix: &str,
    kubeconfig: Option<&Path>,
) -> anyhow::Result<Reading> {
    let mut readings = Vec::with_capacity(args.runs);
    let mut out = Ok(());
    for _ in 0..args.runs {
        match one(args, binary, prefix, kubeconfig).await {
            Ok(r) => readings.push(r),
            Err(e) => {
                out = Err(e);
                break;
            }
        }
    }
    let mut settings = Settings::default();
    settings.amqp.url = args.url.clone();
    settings.topology.prefix = prefix.to_owned();
    if let Ok(amqp) = Amqp::connect(&settings.amqp, "bench").await {
        let _ = Topology::new(&settings.topology).delete(&amqp).await;
        amqp.close();
    }
    out?;
    let median = |f: fn(&Reading) -> u64| {
        let mut v: Vec<u64> = readings.iter().map(f).collect();
        v.sort_unstable();
        v[v.len() / 2]
    };
    Ok(Reading {
        rss: median(|r| r.rss),
        anon: median(|r| r.anon),
        file: median(|r| r.file),
        threads: median(|r| r.threads),
    })
}

/// One start: ready, settled, read, stopped.
async fn one(
    args: &IdleArgs,
    binary: &Path,
    prefix: &str,
    kubeconfig: Option<&Path>,
) -> anyhow::Result<Reading> {
    let http = free_addr()?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(["--amqp-url", &args.url, "--prefix", prefix, "--log", "warn"])
        .arg("worker")
        .args(["--http-addr", &http])
        .args([
            "--executor",
            if kubeconfig.is_some() {
                "kubernetes"
            } else {
                "local"
            },
        ])
        .env("SANDFLEET__SANDBOX__KUBERNETES__NAMESPACE", "bench")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if let Some(k) = kubeconfig {
        cmd.env("KUBECONFIG", k);
    }
    crate::pipeline::runtime_threads(&mut cmd, args.worker_threads);
    let mut child = cmd.spawn().context("starting `sandfleet worker`")?;
    let pid = child.id().context("worker pid")?;
    let deadline = Instant::now() + READY_DEADLINE;
    while http_status(&http, "/readyz").await != Some(200) {
        if Instant::now() > deadline {
            bail!("the worker was not ready within {READY_DEADLINE:?}");
        }
        if let Some(status) = child.try_wait()? {
            bail!("the worker exited before it was ready: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let reading = read_status(pid).context("reading /proc/<pid>/status")?;
    if let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    Ok(reading)
}

fn read_status(pid: u32) -> Option<Reading> {
    let [rss, anon, file, threads] =
        crate::procfs::status_fields(pid, ["VmRSS:", "RssAnon:", "RssFile:", "Threads:"])?;
    Some(Reading {
        rss,
        anon,
        file,
        threads,
    })
}

/// A loopback address with a port that was free a moment ago.
fn free_addr() -> anyhow::Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}
