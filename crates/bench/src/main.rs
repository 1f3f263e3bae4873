//! sandfleet's benchmarks: commands that print figures.
//!
//! Each subcommand prints human-readable rates and, as its last line, one
//! JSON object for scripts. `producer` lives in `producer.rs`, `kube` in `kube.rs`.
// A benchmark's output is its figures on stdout.
#![allow(clippy::print_stdout)]

mod cancel;
mod fairness;
mod idle;
mod inflight;
mod kube;
mod leftovers;
mod pipeline;
mod pool;
mod procfs;
mod producer;
mod session;
mod soak;

use clap::{Parser, Subcommand};

/// sandfleet's benchmarks.
#[derive(Debug, Parser)]
#[command(
    name = "sandfleet-bench",
    about = "sandfleet's benchmarks: commands that print figures"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enqueue rate of the producer library vs a raw lapin pipelined publisher.
    Producer(producer::ProducerArgs),
    /// Tasks/s and API requests per task of the Kubernetes executor on kube-sim.
    Kube(kube::KubeArgs),
    /// Start latency and per-command overhead of sessions, on kube-sim and locally.
    Session(session::SessionArgs),
    /// Session start latency from a warm pool vs cold starts, on kube-sim.
    Pool(pool::PoolArgs),
    /// Tasks through producer → RabbitMQ → worker → results, vs a raw lapin round trip.
    Pipeline(pipeline::PipelineArgs),
    /// Random cancels across queued, delayed and running tasks with workers killed: pod-gone latency, leaks.
    Cancel(cancel::CancelArgs),
    /// Worker RSS, dispatch overhead and API requests with many Kubernetes sandboxes in flight.
    Inflight(inflight::InflightArgs),
    /// M workers, N tasks, kills, restarts, connection cuts and API fault storms: lost, doubled, p99 to final.
    Soak(soak::SoakArgs),
    /// Resident memory of an idle `sandfleet worker` (the release binary beside this one).
    Idle(idle::IdleArgs),
    /// Fair share between repositories on a saturated fleet (kube-sim, two workers, 16 sandboxes) vs FIFO.
    Fairness(fairness::FairnessArgs),
    /// Deletes the queues and exchanges that killed benchmark runs left on the broker.
    Clean(leftovers::CleanArgs),
    /// One worker process for `pipeline` and `inflight` (started by them).
    #[command(hide = true)]
    PipelineWorker(pipeline::WorkerArgs),
}

impl Command {
    /// The broker of a benchmark that names its queues and exchanges
    /// `sfbench-<pid>-...` ([`leftovers`]).
    fn sfbench_broker(&self) -> Option<String> {
        match self {
            Command::Producer(a) => Some(a.url.clone()),
            Command::Pipeline(a) => Some(a.url.clone()),
            Command::Cancel(a) => Some(a.url.clone()),
            Command::Inflight(a) => Some(a.url.clone()),
            Command::Idle(a) => Some(a.url.clone()),
            Command::Fairness(a) => Some(a.url.clone()),
            // The end-to-end harness's broker (`AMQP_ADDR`).
            Command::Soak(_) => Some(sandfleet_e2e::amqp_url()),
            Command::Kube(_)
            | Command::Session(_)
            | Command::Pool(_)
            | Command::Clean(_)
            | Command::PipelineWorker(_) => None,
        }
    }
}

/// A benchmark's last line: `{"bench":"<name>",...}` with `fields` in the
/// order given (the issues list their keys in order; `json!` would sort
/// them). A NaN figure prints as `null`.
pub(crate) fn json_line(bench: &str, fields: &[(&str, serde_json::Value)]) -> String {
    use std::fmt::Write as _;
    let mut line = format!("{{\"bench\":{}", serde_json::Value::from(bench));
    for (key, value) in fields {
        let _ = write!(line, ",{}:{value}", serde_json::Value::from(*key));
    }
    line.push('}');
    line
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(url) = cli.command.sfbench_broker() {
        leftovers::report(&url).await;
    }
    match cli.command {
        Command::Producer(args) => producer::run(args).await,
        Command::Kube(args) => kube::run(args).await,
        Command::Session(args) => session::run(args).await,
        Command::Pool(args) => pool::run(args).await,
        Command::Pipeline(args) => pipeline::run(args).await,
        Command::Inflight(args) => inflight::run(args).await,
        Command::Cancel(args) => cancel::run(args).await,
        Command::Soak(args) => soak::run(args).await,
        Command::Fairness(args) => fairness::run(args).await,
        Command::Idle(args) => idle::run(args).await,
        Command::Clean(args) => leftovers::clean(args).await,
        Command::PipelineWorker(args) => pipeline::worker(args).await,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_last_line_keeps_the_keys_in_order_and_prints_nan_as_null() {
        let line = super::json_line(
            "pipeline",
            &[
                ("ratio_vs_raw", serde_json::json!(0.75)),
                ("p50_ms", serde_json::json!(f64::NAN)),
                ("kube_cpu_ms_per_task", serde_json::json!(None::<f64>)),
                ("tasks", serde_json::json!(300)),
            ],
        );
        assert_eq!(
            line,
            r#"{"bench":"pipeline","ratio_vs_raw":0.75,"p50_ms":null,"kube_cpu_ms_per_task":null,"tasks":300}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["bench"], "pipeline");
    }
}
