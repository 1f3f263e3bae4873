//! The one error type of operator actions.

use sandfleet_amqp::{AmqpError, PublishError};

/// Why an operator action failed. Callers map it to what they show: the CLI
/// to an exit code, the console to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The broker refused or failed an operation (connection, missing
    /// queue, channel closed).
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    /// A publish was not confirmed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The broker did not give what the action needed in time (a ledger read
    /// that closed or timed out, a purge that failed).
    #[error("{0}")]
    Broker(String),
}
