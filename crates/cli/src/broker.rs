//! Connecting to RabbitMQ for a command, with errors mapped to exit codes.

use sandfleet_amqp::lapin::ExchangeKind;
use sandfleet_amqp::lapin::options::ExchangeDeclareOptions;
use sandfleet_amqp::lapin::types::FieldTable;
use sandfleet_amqp::{Amqp, AmqpError, PublishError, Topology, TopologyError};
use sandfleet_gateway::BrokerSink;
use sandfleet_settings::Settings;

use crate::exit::CliError;

/// Maps a broker error: transient ones mean "broker unavailable" (exit 3),
/// a missing exchange or queue means the topology is not applied (exit 5),
/// the rest are failures (exit 1), an invalid URL is a configuration error.
pub fn amqp_error(e: AmqpError) -> CliError {
    if let AmqpError::NotFound { kind, name } = &e {
        CliError::TopologyMissing(format!("{kind} '{name}'"))
    } else if matches!(e, AmqpError::InvalidUrl(_)) {
        CliError::Usage(format!("amqp.url: {e}"))
    } else if e.is_transient() {
        CliError::Broker(e.to_string())
    } else {
        CliError::Failed(e.to_string())
    }
}

/// Maps an operator action's error (see `sandfleet_ops`) the same way.
pub fn ops_error(e: sandfleet_ops::OpsError) -> CliError {
    match e {
        sandfleet_ops::OpsError::Amqp(e) => amqp_error(e),
        sandfleet_ops::OpsError::Publish(e) => publish_error(e),
        sandfleet_ops::OpsError::Broker(m) => CliError::Broker(m),
    }
}

impl From<sandfleet_ops::OpsError> for CliError {
    fn from(e: sandfleet_ops::OpsError) -> CliError {
        ops_error(e)
    }
}

/// Maps a publish error the same way.
pub fn publish_error(e: PublishError) -> CliError {
    if e.is_transient() {
        CliError::Broker(e.to_string())
    } else {
        CliError::Failed(e.to_string())
    }
}

/// Maps a topology error.
pub fn topology_error(e: TopologyError) -> CliError {
    match e {
        TopologyError::Amqp(e) => amqp_error(e),
        other => CliError::Failed(other.to_string()),
    }
}

/// Maps a producer start-up error.
pub fn producer_error(e: sandfleet_producer::ProducerError) -> CliError {
    match e {
        sandfleet_producer::ProducerError::Connect(e) => amqp_error(e),
        sandfleet_producer::ProducerError::Topology(e) => topology_error(e),
    }
}

/// Fails with [`CliError::TopologyMissing`] unless the exchange tasks are
/// published to exists. Commands that publish tasks ask first: a publish to a
/// missing exchange only fails when the broker closes the channel, with a
/// message about an unconfirmed publish that does not say what to do.
pub async fn require_tasks_exchange(amqp: &Amqp, settings: &Settings) -> Result<(), CliError> {
    let name = topology(settings).tasks_exchange;
    // A passive declare on a throw-away channel: a 404 closes the channel.
    let channel = amqp.channel().await.map_err(amqp_error)?;
    let declared = channel
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(()) => {
            let _ = channel.close(200, "OK".into()).await;
            Ok(())
        }
        Err(source) => {
            let e = AmqpError::Broker {
                op: "exchange.declare",
                source,
            };
            if e.reply_code() == Some(404) {
                Err(CliError::TopologyMissing(format!("exchange '{name}'")))
            } else {
                Err(amqp_error(e))
            }
        }
    }
}

/// Connects (one attempt, bounded by `amqp.connect_timeout_secs`).
pub async fn connect(settings: &Settings, component: &str) -> Result<Amqp, CliError> {
    Amqp::connect(&settings.amqp, component)
        .await
        .map_err(amqp_error)
}

/// The topology names for these settings.
pub fn topology(settings: &Settings) -> Topology {
    Topology::new(&settings.topology)
}

/// Connects and opens the confirmed task producer.
/// Checks first that the tasks exchange exists ([`require_tasks_exchange`]).
pub async fn connect_sink(settings: &Settings) -> Result<BrokerSink, CliError> {
    let amqp = connect(settings, "cli").await?;
    require_tasks_exchange(&amqp, settings).await?;
    BrokerSink::new(&amqp, &topology(settings), settings.limits.clone())
        .await
        .map_err(producer_error)
}
