//! `sandfleet console`: the operator console, until SIGTERM/SIGINT.

use clap::Args;
use sandfleet_console::Console;
use sandfleet_settings::Settings;
use tokio_util::sync::CancellationToken;

use crate::exit::{CliError, CliResult, Exit};

/// `sandfleet console`.
#[derive(Debug, Clone, Args)]
pub struct ConsoleArgs {
    /// Listen address; overrides `console.listen_addr`.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// A worker's HTTP endpoint (`http://host:9090`) to show; repeatable,
    /// added to `console.workers`.
    #[arg(long = "worker", value_name = "URL")]
    pub workers: Vec<String>,
}

/// Serves the console until `shutdown`.
pub async fn run(
    a: &ConsoleArgs,
    mut settings: Settings,
    shutdown: CancellationToken,
) -> CliResult<Exit> {
    if let Some(listen) = &a.listen {
        settings.console.listen_addr.clone_from(listen);
    }
    settings.console.workers.extend(a.workers.iter().cloned());
    let console = Console::start(settings, shutdown)
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    tracing::info!(addr = %console.addr, "console serving on http://{}", console.addr);
    console
        .task
        .await
        .map_err(|e| CliError::Failed(format!("console task: {e}")))?
        .map_err(|e| CliError::Failed(format!("console: {e}")))?;
    tracing::info!("console stopped");
    Ok(Exit::Ok)
}
