//! `sandfleet-bench producer`: enqueue rate of the producer library against a
//! minimal raw-lapin pipelined publisher, on identical quorum queues.
//!
//! Both publish the same N persistent ~1 KiB task bodies with publisher
//! confirms and the same bound on outstanding confirms. The library also
//! validates and encodes every task and sets its properties and headers
//! (`mandatory` on, returns checked); the raw publisher only writes bytes.
//! Each round runs both publishers one after the other; the order flips
//! every round, and each queue is purged between rounds, so neither side
//! always runs on a warmer broker. Rate = tasks confirmed / wall time, summed
//! over rounds.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use sandfleet_amqp::{Amqp, TASK_ROUTING_KEY, Topology};
use sandfleet_producer::Producer;
use sandfleet_proto::{Limits, Provider, SandboxSpec, Source, Task};
use sandfleet_settings::{AmqpSettings, TopologySettings};

/// Options of the producer benchmark.
#[derive(Debug, clap::Args)]
pub(crate) struct ProducerArgs {
    /// Tasks per publisher per round.
    #[arg(long, default_value_t = 50_000)]
    tasks: usize,
    /// Rounds; the publishers' order alternates between rounds.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Size of each task's JSON body, in bytes.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Bound on outstanding confirms (both publishers).
    #[arg(long, default_value_t = 1000)]
    max_outstanding: usize,
    /// Broker URL.
    #[arg(
        long,
        env = "AMQP_ADDR",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub(crate) url: String,
}

/// Runs the benchmark and prints the figures; the last line is JSON.
pub(crate) async fn run(args: ProducerArgs) -> anyhow::Result<()> {
    if args.tasks == 0 || args.rounds == 0 {
        bail!("--tasks and --rounds must be at least 1");
    }
    let settings = AmqpSettings {
        url: args.url.clone(),
        max_outstanding_confirms: args.max_outstanding,
        connection_name: Some("sandfleet-bench-producer".into()),
        ..AmqpSettings::default()
    };
    let amqp = Amqp::connect(&settings, "bench")
        .await
        .with_context(|| format!("connecting to RabbitMQ at {}", args.url))?;
    let run_id = std::process::id();
    let lib_topology = Topology::new(&bench_topology(&format!("sfbench-{run_id}-lib")));
    let raw_topology = Topology::new(&bench_topology(&format!("sfbench-{run_id}-raw")));
    lib_topology.apply(&amqp).await?;
    raw_topology.apply(&amqp).await?;

    let outcome = measure(&args, &amqp, &lib_topology, &raw_topology).await;

    // Clean up whatever happened.
    let _ = lib_topology.delete(&amqp).await;
    let _ = raw_topology.delete(&amqp).await;
    let (lib, raw) = outcome?;

    let lib_rate = rate(args.tasks * args.rounds, lib);
    let raw_rate = rate(args.tasks * args.rounds, raw);
    let ratio = lib_rate / raw_rate;
    println!(
        "sandfleet producer (validate + encode + confirm): {lib_rate:>9.0} tasks/s  ({} tasks in {:.2?})",
        args.tasks * args.rounds,
        lib
    );
    println!(
        "raw lapin pipelined publisher:                    {raw_rate:>9.0} msgs/s   ({} msgs in {:.2?})",
        args.tasks * args.rounds,
        raw
    );
    println!("ratio sandfleet / raw lapin: {ratio:.3}");
    // Written by hand to keep the documented key order.
    println!(
        "{{\"bench\":\"producer\",\"tasks\":{},\"sandfleet_per_s\":{:.0},\"raw_lapin_per_s\":{:.0},\"ratio\":{:.3}}}",
        args.tasks, lib_rate, raw_rate, ratio
    );
    Ok(())
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// CPU time (user + system) this process used so far, from `/proc/self/stat`
/// (clock ticks of 10 ms; fine over runs of seconds). Zero where unavailable.
fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn per_msg_us(cpu: Duration, n: usize) -> f64 {
    cpu.as_secs_f64() * 1e6 / n.max(1) as f64
}

fn bench_topology(prefix: &str) -> TopologySettings {
    TopologySettings {
        prefix: prefix.to_owned(),
        retry_delays_secs: vec![],
        results_max_age: "1h".into(),
        ..TopologySettings::default()
    }
}

/// Total wall time of the library and of the raw publisher over all rounds.
async fn measure(
    args: &ProducerArgs,
    amqp: &Amqp,
    lib_topology: &Topology,
    raw_topology: &Topology,
) -> anyhow::Result<(Duration, Duration)> {
    let producer =
        Producer::with_amqp(amqp, lib_topology.clone(), Limits::default(), false).await?;
    let raw_conn = Connection::connect(
        &args.url,
        ConnectionProperties::default().with_connection_name("sandfleet-bench-raw-lapin".into()),
    )
    .await
    .context("raw lapin connection")?;
    let raw_channel = raw_conn.create_channel().await?;
    raw_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let admin = amqp.channel().await?;

    let mut lib_total = Duration::ZERO;
    let mut raw_total = Duration::ZERO;
    for round in 0..args.rounds {
        let tasks = make_tasks(args.tasks, args.body_bytes)?;
        let bodies: Vec<Vec<u8>> = tasks
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<_, _>>()?;
        let lib_first = round % 2 == 0;
        let mut lib_tasks = Some(tasks);
        for turn in 0..2 {
            if (turn == 0) == lib_first {
                let tasks = lib_tasks.take().unwrap_or_default();
                let (started, cpu) = (Instant::now(), process_cpu());
                let report = producer.enqueue_batch(tasks).await;
                let took = started.elapsed();
                let cpu = process_cpu().saturating_sub(cpu);
                if let Some((id, e)) = report.failed().next() {
                    bail!("the producer failed to enqueue task {id}: {e}");
                }
                lib_total += took;
                eprintln!(
                    "round {round}: sandfleet producer {:>8.0}/s, client CPU {:>5.1} µs/task",
                    rate(args.tasks, took),
                    per_msg_us(cpu, args.tasks)
                );
            } else {
                let (started, cpu) = (Instant::now(), process_cpu());
                raw_publish(
                    &raw_channel,
                    &raw_topology.tasks_exchange,
                    &bodies,
                    args.max_outstanding,
                )
                .await?;
                let took = started.elapsed();
                let cpu = process_cpu().saturating_sub(cpu);
                raw_total += took;
                eprintln!(
                    "round {round}: raw lapin          {:>8.0}/s, client CPU {:>5.1} µs/msg",
                    rate(args.tasks, took),
                    per_msg_us(cpu, args.tasks)
                );
            }
        }
        for q in [&lib_topology.tasks_queue, &raw_topology.tasks_queue] {
            let depth = admin
                .queue_purge(q.as_str().into(), QueuePurgeOptions::default())
                .await?;
            if depth as usize != args.tasks {
                bail!(
                    "queue {q} held {depth} messages after the round, expected {}",
                    args.tasks
                );
            }
        }
    }
    let _ = raw_conn.close(200, "bench done".into()).await;
    Ok((lib_total, raw_total))
}

/// The baseline: publish pre-encoded bodies, persistent, at most
/// `max_outstanding` unconfirmed, awaiting the oldest confirm when full.
async fn raw_publish(
    channel: &lapin::Channel,
    exchange: &str,
    bodies: &[Vec<u8>],
    max_outstanding: usize,
) -> anyhow::Result<()> {
    let mut pending = VecDeque::with_capacity(max_outstanding);
    for body in bodies {
        if pending.len() >= max_outstanding
            && let Some(c) = pending.pop_front()
        {
            check(c).await?;
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                TASK_ROUTING_KEY.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        pending.push_back(confirm);
    }
    for c in pending {
        check(c).await?;
    }
    Ok(())
}

async fn check(c: lapin::PublisherConfirm) -> anyhow::Result<()> {
    match c.await? {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("raw publish not acked: {other:?}"),
    }
}

/// `n` valid fix-attempt tasks whose JSON is `body_bytes` long (padded with
/// an input file), each with its own id.
fn make_tasks(n: usize, body_bytes: usize) -> anyhow::Result<Vec<Task>> {
    let template = task_with_padding(0);
    let base = serde_json::to_vec(&template)?.len();
    let pad = body_bytes.saturating_sub(base);
    let tasks: Vec<Task> = (0..n).map(|_| task_with_padding(pad)).collect();
    if let Some(t) = tasks.first() {
        t.validate(&Limits::default())
            .map_err(|e| anyhow::anyhow!("benchmark task is invalid: {e}"))?;
    }
    Ok(tasks)
}

fn task_with_padding(pad: usize) -> Task {
    let source = Source {
        provider: Provider::Api,
        repository: "acme/widgets".into(),
        commit: "4f2a9c1e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a39".into(),
        git_ref: None,
        ci_run_id: None,
        pull_request: None,
        url: None,
    };
    let sandbox = SandboxSpec {
        image: "docker.io/library/node:20-alpine".into(),
        resources: Default::default(),
        env: Default::default(),
        deadline_secs: 900,
        pending_timeout_secs: 300,
    };
    Task::fix_attempt(source, sandbox)
        .with_file("patch.diff", &"x".repeat(pad))
        .with_step("test", "npm test", 600)
}
