//! `sandfleet gateway`: the webhook gateway, until SIGTERM/SIGINT.

use sandfleet_gateway::{ConnectingSink, Gateway};
use sandfleet_settings::Settings;
use tokio_util::sync::CancellationToken;

use crate::args::GatewayArgs;
use crate::broker;
use crate::exit::{CliError, CliResult, Exit};

/// Serves at once; the broker connection is made in the background (until
/// then `/readyz` and the intake routes answer 503).
pub async fn run(
    a: &GatewayArgs,
    mut settings: Settings,
    shutdown: CancellationToken,
) -> CliResult<Exit> {
    if let Some(listen) = &a.listen {
        settings.gateway.listen_addr.clone_from(listen);
    }
    let sink = ConnectingSink::connect_in_background(
        settings.amqp.clone(),
        broker::topology(&settings),
        settings.limits.clone(),
        shutdown.clone(),
    );
    let gateway = Gateway::new(settings.gateway.clone(), sink);
    gateway
        .run(shutdown)
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    tracing::info!("gateway stopped");
    Ok(Exit::Ok)
}
