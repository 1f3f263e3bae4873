//! The `sandfleet` command line: the long-running worker and gateway
//! processes, and the tools operators use (enqueue, replay, results, dlq,
//! topology, demo).
//!
//! `main.rs` only calls [`main`]. Start with [`args::Cli`] for the command
//! line, [`run`] for the dispatch to [`commands`], and [`exit`] for what the
//! exit codes mean. The pure decisions (which failed builds a replay selects,
//! what a replayed task looks like) are in [`replay`]; the broker-side replay
//! ledger in [`ledger`].

pub mod args;
pub mod broker;
pub mod commands;
pub mod config;
pub mod exit;
pub mod ledger;
pub mod output;
pub mod replay;
pub mod signals;

pub mod timearg;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::exit::{CliError, CliResult, Exit};
use crate::output::Output;
use sandfleet_gateway::BrokerSink;

/// Parses the process's arguments and environment, runs the command, and
/// returns its exit code. Errors are printed to stderr (or as JSON with `--json`).
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                Exit::Usage
            } else {
                Exit::Ok
            };
            let _ = e.print();
            return code.into();
        }
    };
    let env: HashMap<String, String> = std::env::vars().collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandfleet: cannot start the async runtime: {e}");
            return Exit::Failure.into();
        }
    };
    let json = cli.global.json;
    let exit = runtime.block_on(run(cli, &env));
    // Don't wait for lingering background tasks (reconnect loops) on exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match exit {
        Ok(code) => code.into(),
        Err(e) => {
            if json {
                Output { json }.json(
                    &serde_json::json!({ "error": e.to_string(), "exit_code": e.exit().code() }),
                );
            }
            eprintln!("sandfleet: {e}");
            e.exit().into()
        }
    }
}

fn init_logging(filter: &str, long_running: bool) {
    // Short commands log warnings only unless asked; long-running ones info.
    let filter = if !long_running && filter == "info" {
        "warn"
    } else {
        filter
    };
    let env_filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs a parsed command line with the given environment map.
pub async fn run(cli: Cli, env: &HashMap<String, String>) -> CliResult<Exit> {
    let settings = config::load(&cli.global, env)?;
    settings
        .validate()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let long_running = matches!(cli.command, Command::Worker(_) | Command::Gateway(_));
    init_logging(&settings.telemetry.log_filter, long_running);
    let out = Output {
        json: cli.global.json,
    };
    let shutdown = signals::shutdown_token();
    match &cli.command {
        Command::Worker(a) => commands::worker::run(a, settings, shutdown).await,
        Command::Gateway(a) => commands::gateway::run(a, settings, shutdown).await,
        Command::Enqueue(a) => {
            let sink = connect_sink(&settings).await?;
            commands::enqueue::run(a, &settings, &sink, out).await
        }
        Command::Replay(a) => {
            let sink = Arc::new(connect_sink(&settings).await?);
            commands::replay::run(a, &settings, sink, out, shutdown).await
        }
        Command::Results(c) => commands::results::run(c, &settings, out, shutdown).await,
        Command::Dlq(c) => commands::dlq::run(c, &settings, out).await,
        Command::Topology(c) => commands::topology::run(c, &settings, out).await,
        Command::Demo(a) => {
            commands::demo::run(a, &settings, cli.global.amqp_url.is_some(), out).await
        }
    }
}

async fn connect_sink(settings: &sandfleet_settings::Settings) -> CliResult<BrokerSink> {
    let amqp = broker::connect(settings, "cli").await?;
    BrokerSink::new(&amqp, &broker::topology(settings), settings.limits.clone())
        .await
        .map_err(broker::amqp_error)
}
