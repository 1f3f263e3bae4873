//! `sandfleet gateway`: the webhook gateway, until SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use sandfleet_gateway::Gateway;
use sandfleet_settings::Settings;
use tokio_util::sync::CancellationToken;

use crate::args::GatewayArgs;
use crate::broker;
use crate::exit::{CliError, CliResult, Exit};
use sandfleet_gateway::BrokerSink;

/// Connects to the broker (retrying while it is unavailable), then serves.
pub async fn run(
    a: &GatewayArgs,
    mut settings: Settings,
    shutdown: CancellationToken,
) -> CliResult<Exit> {
    if let Some(listen) = &a.listen {
        settings.gateway.listen_addr.clone_from(listen);
    }
    let topology = broker::topology(&settings);
    let mut delay = Duration::from_millis(500);
    let sink = loop {
        let attempt = async {
            let amqp = broker::connect(&settings, "gateway").await?;
            BrokerSink::new(&amqp, &topology, settings.limits.clone())
                .await
                .map_err(broker::producer_error)
        };
        match attempt.await {
            Ok(s) => break s,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, ?delay, "broker unavailable; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(Exit::Ok),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(
                    settings.amqp.reconnect_max_delay_secs.max(1),
                ));
            }
            Err(e) => return Err(e),
        }
    };
    let gateway = Gateway::new(settings.gateway.clone(), Arc::new(sink));
    gateway
        .run(shutdown)
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    tracing::info!("gateway stopped");
    Ok(Exit::Ok)
}
