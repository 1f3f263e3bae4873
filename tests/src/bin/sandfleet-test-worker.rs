//! A worker process for the end-to-end tests: `sandfleet_worker::run` with
//! settings from `SANDFLEET__*` environment variables, the same signal
//! handling as `sandfleet worker` (first SIGTERM/SIGINT drains, a second one
//! exits at once). Tests kill it with SIGKILL to simulate a crash.

use std::collections::HashMap;
use std::process::ExitCode;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let env: HashMap<String, String> = std::env::vars().collect();
    // The tests hand the whole configuration over as JSON; SANDFLEET__*
    // variables work too.
    let loaded = match env.get("SANDFLEET_TEST_SETTINGS_JSON") {
        Some(json) => serde_json::from_str(json).map_err(|e| e.to_string()),
        None => sandfleet_settings::load(None, &env).map_err(|e| e.to_string()),
    };
    let settings: sandfleet_settings::Settings = match loaded {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sandfleet-test-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let _guard = match sandfleet_telemetry::init(&settings.telemetry) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("sandfleet-test-worker: telemetry: {e}");
            return ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal: draining (send another to exit at once)");
        signals.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    match sandfleet_worker::run(settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "worker failed");
            ExitCode::from(1)
        }
    }
}
