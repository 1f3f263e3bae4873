//! `sandfleet worker`: the worker process, until SIGTERM/SIGINT.

use sandfleet_settings::{ExecutorKind, Settings};
use sandfleet_worker::WorkerError;
use tokio_util::sync::CancellationToken;

use crate::args::WorkerArgs;
use crate::exit::{CliError, CliResult, Exit};

/// Applies the flags, then runs the worker until `shutdown` fires and it drained.
pub async fn run(
    a: &WorkerArgs,
    mut settings: Settings,
    shutdown: CancellationToken,
) -> CliResult<Exit> {
    if let Some(c) = a.concurrency {
        settings.worker.concurrency = c;
    }
    if let Some(e) = &a.executor {
        settings.worker.executor = match e.as_str() {
            "local" => ExecutorKind::Local,
            "kubernetes" => ExecutorKind::Kubernetes,
            other => {
                return Err(CliError::Usage(format!(
                    "--executor {other:?}: expected local or kubernetes"
                )));
            }
        };
    }
    if let Some(addr) = &a.http_addr {
        settings.worker.http_addr.clone_from(addr);
    }
    settings
        .validate()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    sandfleet_worker::run(settings, shutdown)
        .await
        .map_err(|e| match e {
            WorkerError::Config(_) | WorkerError::Executor(_) => CliError::Usage(e.to_string()),
            e if e.is_transient() => CliError::Broker(e.to_string()),
            e => CliError::Failed(e.to_string()),
        })?;
    Ok(Exit::Ok)
}
