//! `sandfleet-bench soak`: M worker processes, N tasks, and for a bounded
//! time random SIGKILLs and SIGTERMs (each followed by a restart), broker
//! connection cuts (management API) and Kubernetes API fault storms
//! (kube-sim fault injection); then the history check of the end-to-end
//! soak test over every published task, every result on the results
//! stream, every dead letter and kube-sim's request log.
//!
//! The world (topology, results and dead-letter readers, kube-sim, the
//! history and its checker) is the end-to-end tests' [`Env`]; the workers
//! are this binary's `pipeline-worker` processes ([`WorkerProcess`]) with
//! the Kubernetes executor on kube-sim, pods scripted `Instant`, so what is
//! soaked is the dispatch machinery, not the sandbox.
//!
//! It prints lost tasks, duplicate final deliveries, concurrent double runs
//! (two Jobs of one task alive at once), tasks without a final result, and
//! the p99 time from enqueue to the first final result.

use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sandfleet_e2e::{Env, free_port};
use sandfleet_kube_sim::{FaultAction, FaultRule, PodScript};
use sandfleet_proto::{Task, TaskId};
use sandfleet_sandbox::job::MANAGED_SELECTOR;

use crate::pipeline::WorkerProcess;

/// Options of the soak.
#[derive(Debug, clap::Args)]
pub(crate) struct SoakArgs {
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Tasks, all enqueued before the chaos starts.
    #[arg(long, default_value_t = 1000)]
    tasks: usize,
    /// Seconds of chaos (it stops earlier when every task has its final result).
    #[arg(long, default_value_t = 60)]
    chaos_secs: u64,
    /// Seconds between two faults.
    #[arg(long, default_value_t = 1.5)]
    every_secs: f64,
    /// Tasks each worker runs at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Seed of the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// One kind of fault the soak injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Fault {
    Kill,
    Term,
    Cut,
    ApiStorm,
}

/// A worker slot: its current process and how many it had.
struct Slot {
    process: WorkerProcess,
    generation: usize,
}

/// Runs the soak and prints the figures; the last line is JSON.
pub(crate) async fn run(args: SoakArgs) -> anyhow::Result<()> {
    if args.workers == 0 || args.tasks == 0 {
        bail!("--workers and --tasks must be at least 1");
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let concurrency = args.concurrency.max(1);
    let env = Env::new("soak-bench", &exe.display().to_string(), true, |s| {
        // A benchmark's names, so `clean` finds them after a killed run.
        s.topology.prefix = format!("{}{}-soak", crate::leftovers::PREFIX, std::process::id());
        s.worker.concurrency = concurrency;
        s.worker.drain_timeout_secs = 1;
        s.telemetry.log_filter = "error".into();
    })
    .await
    .context("setting up the soak (RabbitMQ on AMQP_ADDR, kube-sim)")?;
    let outcome = soak(&args, &env).await;
    env.cleanup().await?;
    outcome
}

async fn soak(args: &SoakArgs, env: &Env) -> anyhow::Result<()> {
    let sim = env.kube();
    sim.sim
        .script_pods(MANAGED_SELECTOR, PodScript::Instant { exit_code: 0 });
    let kubeconfig = sim.kubeconfig_path();
    let spawn = |slot: usize, generation: usize| -> anyhow::Result<WorkerProcess> {
        let mut s = env.settings.clone();
        s.worker.http_addr = format!("127.0.0.1:{}", free_port()?);
        s.worker.name = Some(format!("soak-{slot}-{generation}"));
        s.amqp.connection_name = Some(connection_name(env, slot, generation));
        WorkerProcess::spawn(&s, false, Some(&kubeconfig), 0)
    };
    let mut slots = Vec::with_capacity(args.workers);
    for i in 0..args.workers {
        slots.push(Slot {
            process: spawn(i, 0)?,
            generation: 0,
        });
    }

    let started = Instant::now();
    let tasks: Vec<Task> = (0..args.tasks).map(crate::pipeline::task).collect();
    let mut enqueued: HashMap<TaskId, chrono::DateTime<chrono::Utc>> = HashMap::new();
    for chunk in tasks.chunks(100) {
        let at = chrono::Utc::now();
        for r in futures::future::join_all(chunk.iter().map(|t| env.publish(t))).await {
            r.context("enqueue")?;
        }
        enqueued.extend(chunk.iter().map(|t| (t.id, at)));
    }
    println!(
        "soak: {} tasks enqueued in {:.1} s, {} workers",
        args.tasks,
        started.elapsed().as_secs_f64(),
        args.workers
    );

    let finished = |e: &Env| {
        e.results()
            .iter()
            .filter(|r| r.is_final)
            .map(|r| r.task_id)
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut counts: HashMap<Fault, usize> = HashMap::new();
    let chaos_end = Instant::now() + Duration::from_secs(args.chaos_secs);
    let every = Duration::from_secs_f64(args.every_secs.max(0.1));
    while Instant::now() < chaos_end && finished(env) < args.tasks {
        tokio::time::sleep(every).await;
        let fault = match rng.random_range(0..10) {
            0..=3 => Fault::Kill,
            4..=5 => Fault::Term,
            6..=7 => Fault::Cut,
            _ => Fault::ApiStorm,
        };
        let i = rng.random_range(0..slots.len());
        let done = match fault {
            Fault::Kill | Fault::Term => {
                let slot = &mut slots[i];
                if fault == Fault::Term {
                    // A graceful stop: the worker drains (1 s), then hands back.
                    slot.process.terminate();
                    slot.process.wait_exit(Duration::from_secs(15)).await;
                }
                slot.generation += 1;
                // Replacing the process kills the old one (SIGKILL on drop).
                slot.process = spawn(i, slot.generation)?;
                true
            }
            Fault::Cut => {
                // The management API lists a connection only after its
                // next stats round: a worker started a moment ago may not
                // be listed yet, and then nothing is cut this time.
                let name = connection_name(env, i, slots[i].generation);
                env.amqp
                    .management()
                    .close_connections_named(&name)
                    .await
                    .unwrap_or(0)
                    > 0
            }
            Fault::ApiStorm => {
                // Every Job and Pod request fails for a moment: 500s and
                // reset connections, alternating.
                let action = if rng.random_bool(0.5) {
                    FaultAction::Status {
                        code: 500,
                        retry_after_secs: None,
                    }
                } else {
                    FaultAction::ResetConnection
                };
                let faults = sim.sim.faults();
                faults.inject(FaultRule::new("*", "/namespaces/", action));
                tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
                faults.clear();
                true
            }
        };
        if done {
            *counts.entry(fault).or_default() += 1;
        }
    }
    let chaos = started.elapsed();
    // Every worker alive and unharmed from here: the tasks must all end.
    let settle = Duration::from_secs(120);
    let until = env
        .until("every task to have a final result", settle, |e| {
            finished(e) >= args.tasks
        })
        .await;
    // Late duplicates and deletes land before judging.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = env.history();
    let report = history.check();
    drop(slots);

    let mut first_final: HashMap<TaskId, chrono::DateTime<chrono::Utc>> = HashMap::new();
    for r in env.received() {
        if let (true, Some(at)) = (r.result.is_final, r.published_at) {
            let e = first_final.entry(r.result.task_id).or_insert(at);
            *e = (*e).min(at);
        }
    }
    let mut to_final: Vec<f64> = enqueued
        .iter()
        .filter_map(|(id, t0)| Some((*first_final.get(id)? - *t0).num_milliseconds() as f64 / 1e3))
        .collect();
    to_final.sort_by(f64::total_cmp);
    let p = |q: f64| {
        let i = ((to_final.len() as f64 - 1.0) * q).round() as usize;
        to_final.get(i).copied().unwrap_or(f64::NAN)
    };
    let without_final = enqueued.len() - first_final.len().min(enqueued.len());
    let count = |f: Fault| counts.get(&f).copied().unwrap_or(0);
    println!(
        "soak: {:.0} s of chaos: {} SIGKILL, {} SIGTERM (each restarted), {} broker connection cuts, {} API fault storms",
        chaos.as_secs_f64(),
        count(Fault::Kill),
        count(Fault::Term),
        count(Fault::Cut),
        count(Fault::ApiStorm)
    );
    println!(
        "soak: {} finished, {} lost, {} without a final result, {} dead letters, {} concurrent double runs, {} Jobs re-created after a crash, {} duplicate final deliveries, {} conflicting finals",
        report.finished,
        report.lost.len(),
        without_final,
        history.dead.len(),
        report.concurrent_jobs.len(),
        report.recreated_jobs.len(),
        report.duplicate_final_deliveries,
        report.conflicting_finals.len()
    );
    println!(
        "soak: enqueue → first final result p50 {:.2} s, p99 {:.2} s, max {:.2} s",
        p(0.5),
        p(0.99),
        p(1.0)
    );
    // The keys first, in its order.
    println!(
        "{}",
        crate::json_line(
            "soak",
            &[
                ("lost", json!(report.lost.len())),
                (
                    "concurrent_double_runs",
                    json!(report.concurrent_jobs.len())
                ),
                ("tasks_without_final", json!(without_final)),
                ("p99_to_final_s", json!(round3(p(0.99)))),
                ("workers", json!(args.workers)),
                ("tasks", json!(args.tasks)),
                ("chaos_secs", json!(round3(chaos.as_secs_f64()))),
                ("kills", json!(count(Fault::Kill))),
                ("terms", json!(count(Fault::Term))),
                ("connection_cuts", json!(count(Fault::Cut))),
                ("api_storms", json!(count(Fault::ApiStorm))),
                ("duplicated", json!(report.duplicate_final_deliveries)),
                ("conflicting_finals", json!(report.conflicting_finals.len())),
                ("recreated_jobs", json!(report.recreated_jobs.len())),
            ],
        )
    );
    until?;
    if !report.ok() || without_final > 0 {
        bail!("the soak found lost, conflicting or doubly-run tasks");
    }
    Ok(())
}

fn connection_name(env: &Env, slot: usize, generation: usize) -> String {
    // The dot ends the name: closing by prefix never reaches `...-g10` for `...-g1`.
    format!("sfsoak-{}-w{slot}-g{generation}.", env.prefix)
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
