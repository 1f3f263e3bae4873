//! `sandfleet-bench session`: start latency (create → first command's
//! result) and per-command overhead of interactive sessions, on kube-sim
//! (the Kubernetes backend: Job, pod watch, `pods/exec` over WebSocket) and
//! on the local backend (child processes).
//!
//! Each session runs `--commands` times the command `true`, one after
//! another, so a command's latency is the backend's overhead: for kube-sim
//! one exec (upgrade, the wrapper's `sh`, status channel), for the local
//! backend one `sh` child. kube-sim's pod start delay is its default (20 ms):
//! a real cluster adds scheduling and image pulls to the start figure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sandfleet_kube_sim::{KubeSim, SimOptions};
use sandfleet_sandbox::session::{
    KubeSessions, LocalSessions, Session, SessionBackend, SessionSpec,
};
use sandfleet_settings::KubernetesSettings;

const NS: &str = "sessions-bench";

/// Options of the session benchmark.
#[derive(Debug, clap::Args)]
pub(crate) struct SessionArgs {
    /// Sessions per backend.
    #[arg(long, default_value_t = 20)]
    sessions: usize,
    /// Commands per session.
    #[arg(long, default_value_t = 50)]
    commands: usize,
}

struct Figures {
    start_ms: Vec<f64>,
    command_ms: Vec<f64>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

async fn measure(backend: Arc<dyn SessionBackend>, a: &SessionArgs) -> anyhow::Result<Figures> {
    let mut f = Figures {
        start_ms: Vec::new(),
        command_ms: Vec::new(),
    };
    let spec = SessionSpec::new("docker.io/library/alpine:3.20");
    let timeout = Duration::from_secs(30);
    for _ in 0..a.sessions {
        let t = Instant::now();
        let mut session = Session::start(backend.clone(), &spec)
            .await
            .context("start")?;
        let first = session
            .run("true", timeout)
            .await
            .context("first command")?;
        if first.exit_code != 0 {
            bail!("`true` exited {}", first.exit_code);
        }
        f.start_ms.push(t.elapsed().as_secs_f64() * 1e3);
        for _ in 0..a.commands {
            let t = Instant::now();
            let o = session.run("true", timeout).await.context("command")?;
            if o.exit_code != 0 {
                bail!("`true` exited {}", o.exit_code);
            }
            f.command_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        session.teardown().await.context("teardown")?;
    }
    f.start_ms = sorted(f.start_ms);
    f.command_ms = sorted(f.command_ms);
    Ok(f)
}

fn report(name: &str, f: &Figures) {
    println!(
        "{name:<9} start (create -> first command): p50 {:>7.1} ms  p99 {:>7.1} ms   ({} sessions)",
        pct(&f.start_ms, 0.5),
        pct(&f.start_ms, 0.99),
        f.start_ms.len()
    );
    println!(
        "{name:<9} per-command overhead:           p50 {:>7.1} ms  p99 {:>7.1} ms   ({} commands)",
        pct(&f.command_ms, 0.5),
        pct(&f.command_ms, 0.99),
        f.command_ms.len()
    );
}

/// Runs the benchmark and prints the figures; the last line is JSON.
pub(crate) async fn run(a: SessionArgs) -> anyhow::Result<()> {
    if a.sessions == 0 || a.commands == 0 {
        bail!("--sessions and --commands must be at least 1");
    }
    let sim = KubeSim::start(SimOptions::default()).await?;
    let settings = KubernetesSettings {
        namespace: NS.into(),
        ..KubernetesSettings::default()
    };
    let kube = KubeSessions::from_kubeconfig_yaml(&sim.kubeconfig_yaml(NS), settings).await?;
    let k = measure(Arc::new(kube), &a).await?;
    let local = measure(Arc::new(LocalSessions::new()), &a).await?;
    report("kube-sim", &k);
    report("local", &local);
    // Teardown deletes with Background propagation: wait (bounded) for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sim.jobs(NS).is_empty() {
        if Instant::now() > deadline {
            bail!("{} session jobs were left behind", sim.jobs(NS).len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = |v: f64| (v * 10.0).round() / 10.0;
    println!(
        "{}",
        serde_json::json!({
            "bench": "session",
            "start_p50_ms": r(pct(&k.start_ms, 0.5)),
            "start_p99_ms": r(pct(&k.start_ms, 0.99)),
            "command_p50_ms": r(pct(&k.command_ms, 0.5)),
            "command_p99_ms": r(pct(&k.command_ms, 0.99)),
            "local_start_p50_ms": r(pct(&local.start_ms, 0.5)),
            "local_command_p50_ms": r(pct(&local.command_ms, 0.5)),
            "local_command_p99_ms": r(pct(&local.command_ms, 0.99)),
            "sessions": a.sessions,
            "commands_per_session": a.commands,
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_by_rank() {
        let v = sorted((1..=100).map(f64::from).collect());
        assert_eq!(pct(&v, 0.5), 51.0);
        assert_eq!(pct(&v, 0.99), 99.0);
        assert_eq!(pct(&[], 0.5), 0.0);
    }
}
