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
pub mod output;
pub mod signals;
pub mod timearg;

// The replay decisions and the ledger are shared with the console; they
// live in sandfleet-ops and keep their paths here.
pub use sandfleet_ops::{ledger, replay};

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Parser;
use sandfleet_telemetry::TelemetryGuard;

use crate::args::{Cli, Command};
use crate::exit::{CliError, CliResult, Exit};
use crate::output::Output;

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
    // Loaded once, before the runtime, which the worker's settings size;
    // shell completions and man pages never read it.
    let settings = (!matches!(cli.command, Command::Completions(_) | Command::Man(_)))
        .then(|| config::load(&cli.global, &env));
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = runtime_threads(&cli, settings.as_ref()) {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            output::diag(format_args!(
                "sandfleet: cannot start the async runtime: {e}"
            ));
            return Exit::Failure.into();
        }
    };
    let json = cli.global.json;
    let exit = runtime.block_on(run(cli, &env, settings));
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
            output::diag(format_args!("sandfleet: {e}"));
            e.exit().into()
        }
    }
}

/// The runtime threads the command asks for: `worker.runtime_threads` for
/// the worker (when not 0), else tokio's default. Settings that did not load
/// are reported by [`run`].
fn runtime_threads(
    cli: &Cli,
    settings: Option<&CliResult<sandfleet_settings::Settings>>,
) -> Option<usize> {
    if !matches!(cli.command, Command::Worker(_)) {
        return None;
    }
    let threads = settings?.as_ref().ok()?.worker.runtime_threads;
    (threads > 0).then_some(usize::from(threads))
}

/// Logging and tracing. Long-running processes get the full telemetry
/// (structured logs, OTLP export when `telemetry.otlp_endpoint` is set);
/// short commands log warnings only to stderr, unless `--log` asks for more.
fn init_telemetry(
    settings: &sandfleet_settings::Settings,
    long_running: bool,
) -> CliResult<Option<TelemetryGuard>> {
    let mut telemetry = settings.telemetry.clone();
    let default_filter = sandfleet_settings::TelemetrySettings::default().log_filter;
    if long_running {
        return sandfleet_telemetry::init(&telemetry)
            .map(Some)
            .map_err(|e| CliError::Usage(format!("telemetry: {e}")));
    }
    if telemetry.log_filter == default_filter {
        telemetry.log_filter = SHORT_COMMAND_LOG_FILTER.to_owned();
    }
    sandfleet_telemetry::init_console(&telemetry.log_filter).map_err(|e| {
        CliError::Usage(format!(
            "telemetry.log_filter {:?}: {e}",
            telemetry.log_filter
        ))
    })?;
    Ok(None)
}

/// The log filter of short commands unless `--log` or `telemetry.log_filter`
/// says otherwise: warnings only. (lapin's own lines, among them an ERROR for
/// each expected 404 of `topology check`, are off unless the filter names
/// lapin: see [`sandfleet_telemetry::with_library_defaults`].)
pub const SHORT_COMMAND_LOG_FILTER: &str = "warn";

/// Runs a parsed command line with the given environment map. `loaded` is
/// the configuration when the caller has loaded it already ([`main`] does,
/// to size the runtime); `None` loads it here.
pub async fn run(
    cli: Cli,
    env: &HashMap<String, String>,
    loaded: Option<CliResult<sandfleet_settings::Settings>>,
) -> CliResult<Exit> {
    // Generated from the command line's definition alone: a broken
    // configuration must not stop an install script from getting them.
    match &cli.command {
        Command::Completions(a) => {
            return Ok(commands::docs::completions(a, Output { json: false }));
        }
        Command::Man(a) => return commands::docs::man(a, Output { json: false }),
        _ => {}
    }
    let settings = match loaded {
        Some(loaded) => loaded?,
        None => config::load(&cli.global, env)?,
    };
    settings
        .validate()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let long_running = matches!(
        cli.command,
        Command::Worker(_) | Command::Gateway(_) | Command::Sessions(_) | Command::Console(_)
    );
    let telemetry = init_telemetry(&settings, long_running)?;
    let out = Output {
        json: cli.global.json,
    };
    let shutdown = signals::shutdown_token(if long_running { "draining" } else { "stopping" });
    if !long_running {
        // A short command whose reader went away (`| head -1`) stops as if
        // interrupted, quietly. The long-running processes log to stderr and
        // own their lifetime; their stdout is not watched.
        output::watch_stdout();
        let closed = output::stdout_closed();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            closed.cancelled().await;
            stop.cancel();
        });
    }
    let result = dispatch(&cli, env, settings, out, shutdown).await;
    if let Some(guard) = telemetry
        && let Err(e) = guard.shutdown().await
    {
        output::diag(format_args!("sandfleet: flushing traces failed: {e}"));
    }
    result
}

async fn dispatch(
    cli: &Cli,
    env: &HashMap<String, String>,
    settings: sandfleet_settings::Settings,
    out: Output,
    shutdown: tokio_util::sync::CancellationToken,
) -> CliResult<Exit> {
    match &cli.command {
        Command::Worker(a) => commands::worker::run(a, settings, shutdown).await,
        Command::Gateway(a) => commands::gateway::run(a, settings, shutdown).await,
        Command::Enqueue(a) => commands::enqueue::run(a, &settings, out).await,
        Command::Cancel(a) => commands::cancel::run(a, &settings, out).await,
        Command::Replay(a) => commands::replay::run(a, &settings, out, shutdown).await,
        Command::Results(c) => commands::results::run(c, &settings, out, shutdown).await,
        Command::Dlq(c) => commands::dlq::run(c, &settings, out).await,
        Command::Topology(c) => commands::topology::run(c, &settings, out).await,
        Command::Demo(a) => {
            commands::demo::run(a, &settings, cli.global.amqp_url.is_some(), out).await
        }
        Command::Status(a) => commands::status::run(a, &settings, out).await,
        Command::Sessions(a) => commands::sessions::run(a, settings, shutdown).await,
        Command::Console(a) => commands::console::run(a, settings, shutdown).await,
        Command::Session(c) => commands::session::run(c, out).await,
        Command::Shell(a) => commands::shell::run(a, shutdown).await,
        Command::Task(c) => commands::task::run(c, &settings, out),
        Command::Config(args::ConfigCommand::Check) => {
            commands::config_check::run(&cli.global, env, &settings, out)
        }
        // Handled in `run` before the configuration is loaded.
        Command::Completions(_) | Command::Man(_) => Ok(Exit::Ok),
    }
}
