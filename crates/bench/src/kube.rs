//! `sandfleet-bench kube`: tasks through the Kubernetes executor against
//! kube-sim with instant pods, counting the API requests each task costs.
//!
//! Pods are scripted `Instant` (Running, then exit 0 at once, no process), so
//! the figure is the executor's own overhead: Job build, create, the shared
//! watch delivering the Job's completion, one log read, one delete.
//! `api_requests_per_task` counts every request in the simulator's log except
//! the shared watchers' list and watch requests (`labelSelector` =
//! `app.kubernetes.io/managed-by=sandfleet`), divided by the tasks run; the
//! target is 3 (create, log, delete) and the bound 4.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use futures::StreamExt;
use sandfleet_kube_sim::{KubeSim, PodScript, SimOptions};
use sandfleet_proto::{Outcome, Provider, SandboxSpec, Source, Task};
use sandfleet_sandbox::job::MANAGED_SELECTOR;
use sandfleet_sandbox::{ApiRetry, Executor, KubeApi, KubeExecutor, NoGate, RunContext};
use sandfleet_settings::KubernetesSettings;

/// The bound `api_requests_per_task` must stay under.
const MAX_REQUESTS_PER_TASK: f64 = 4.0;

/// Options of the kube benchmark.
#[derive(Debug, clap::Args)]
pub(crate) struct KubeArgs {
    /// Tasks to run.
    #[arg(long, default_value_t = 500)]
    tasks: usize,
    /// Tasks in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

fn task(i: usize) -> Task {
    Task::fix_attempt(
        Source {
            provider: Provider::Api,
            repository: "bench/instant".into(),
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

/// Runs the benchmark and prints the figures; the last line is JSON.
pub(crate) async fn run(args: KubeArgs) -> anyhow::Result<()> {
    if args.tasks == 0 || args.concurrency == 0 {
        bail!("--tasks and --concurrency must be at least 1");
    }
    let sim = KubeSim::start(SimOptions::default())
        .await
        .context("starting kube-sim")?;
    sim.script_pods(MANAGED_SELECTOR, PodScript::Instant { exit_code: 0 });
    let settings = KubernetesSettings {
        namespace: "bench".into(),
        ..KubernetesSettings::default()
    };
    let api = KubeApi::from_kubeconfig_yaml(
        &sim.kubeconfig_yaml(&settings.namespace),
        &settings,
        Arc::new(NoGate),
        ApiRetry::default(),
    )
    .await
    .context("connecting to kube-sim")?;
    let exec = KubeExecutor::new(api, settings);
    let ctx = RunContext {
        traceparent: None,
        worker: "bench".into(),
        cancels_read_to: None,
    };

    // One warm-up task: the watchers list and settle before the clock starts.
    let warm = exec
        .run(&task(usize::MAX), 1, &ctx)
        .await
        .context("warm-up task")?;
    if warm.outcome != Outcome::Succeeded {
        bail!("warm-up task ended {}: {:?}", warm.outcome, warm.error);
    }
    sim.clear_request_log();

    let tasks: Vec<Task> = (0..args.tasks).map(task).collect();
    let started = Instant::now();
    let outcomes: Vec<_> = futures::stream::iter(tasks.iter())
        .map(|t| exec.run(t, 1, &ctx))
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();

    let mut succeeded = 0usize;
    for o in &outcomes {
        match o {
            Ok(e) if e.outcome == Outcome::Succeeded => succeeded += 1,
            Ok(e) => eprintln!("task ended {}: {:?}", e.outcome, e.error),
            Err(e) => eprintln!("task failed: {e}"),
        }
    }
    let log = sim.request_log();
    let watcher = |r: &&sandfleet_kube_sim::RequestRecord| {
        r.verb() == "watch"
            || (r.verb() == "list"
                && r.query_param("labelSelector").as_deref() == Some(MANAGED_SELECTOR))
    };
    let shared = log.iter().filter(watcher).count();
    let per_task_requests = log.len() - shared;
    let mut by_verb = std::collections::BTreeMap::<String, usize>::new();
    for r in log.iter().filter(|r| !watcher(r)) {
        *by_verb
            .entry(format!("{} {}", r.verb(), r.resource()))
            .or_default() += 1;
    }
    let per_task = per_task_requests as f64 / args.tasks as f64;
    let rate = args.tasks as f64 / elapsed.as_secs_f64();

    println!(
        "kubernetes executor on kube-sim (instant pods): {rate:>8.1} tasks/s  ({} tasks, {} in flight, {elapsed:.2?})",
        args.tasks, args.concurrency
    );
    println!(
        "API requests per task (excluding the shared watch/list): {per_task:.2}  {by_verb:?}; shared watch/list requests: {shared}"
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "kube",
            "tasks": args.tasks,
            "concurrency": args.concurrency,
            "succeeded": succeeded,
            "elapsed_secs": elapsed.as_secs_f64(),
            "tasks_per_sec": rate,
            "api_requests_per_task": per_task,
            "shared_watch_requests": shared,
        })
    );
    drop(exec);
    sim.stop().await;
    if succeeded != args.tasks {
        bail!(
            "{} of {} tasks did not succeed",
            args.tasks - succeeded,
            args.tasks
        );
    }
    if per_task > MAX_REQUESTS_PER_TASK {
        bail!("{per_task:.2} API requests per task exceeds the bound of {MAX_REQUESTS_PER_TASK}");
    }
    Ok(())
}
