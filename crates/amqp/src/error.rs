//! Errors of the RabbitMQ layer, with the questions callers ask of them.

use lapin::ErrorKind;
use lapin::protocol::AMQPErrorKind;

/// AMQP reply code: the object is missing (passive declare, consume).
pub const REPLY_NOT_FOUND: u16 = 404;
/// AMQP reply code: a declaration conflicts with what exists, or an unknown
/// delivery tag was acknowledged.
pub const REPLY_PRECONDITION_FAILED: u16 = 406;
/// AMQP reply code: access refused (permissions).
pub const REPLY_ACCESS_REFUSED: u16 = 403;
/// AMQP reply code: the queue is exclusive to another connection.
pub const REPLY_RESOURCE_LOCKED: u16 = 405;
/// AMQP reply code: an operator or the broker closed the connection.
pub const REPLY_CONNECTION_FORCED: u16 = 320;
/// AMQP reply code of a `basic.return`: no queue is bound for the routing key.
pub const REPLY_NO_ROUTE: u16 = 312;

/// An error talking to RabbitMQ: connecting, opening channels, consuming,
/// acknowledging, declaring.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The configured URL is not a valid `amqp://` / `amqps://` URL.
    #[error("invalid AMQP URL: {0}")]
    InvalidUrl(String),
    /// No connection could be had: the broker is unreachable, refused the
    /// credentials, or the pool timed out.
    #[error("cannot connect to RabbitMQ at {endpoint}: {reason}")]
    Connect {
        /// `host:port/vhost` (never the credentials).
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// A broker operation failed.
    #[error("AMQP {op} failed: {source}")]
    Broker {
        /// The operation (`queue.declare`, `basic.consume`, ...).
        op: &'static str,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// An exchange or queue does not exist.
    #[error("{kind} '{name}' does not exist")]
    NotFound {
        /// `exchange` or `queue`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The channel a delivery came on is closed, so it can no longer be
    /// acknowledged; the broker has requeued it and will deliver it again.
    #[error("the delivery's channel is closed; the broker requeues the message and redelivers it")]
    DeliveryChannelClosed,
    /// Publishing (for example while dead-lettering a delivery) failed.
    #[error(transparent)]
    Publish(#[from] crate::PublishError),
    /// The RabbitMQ management HTTP API failed or is not reachable.
    #[error("RabbitMQ management API: {0}")]
    Management(String),
}

impl AmqpError {
    pub(crate) fn broker(op: &'static str, source: lapin::Error) -> AmqpError {
        AmqpError::Broker { op, source }
    }

    /// True when retrying later may succeed: the connection dropped, the broker
    /// is unreachable or restarting. False for configuration and protocol
    /// errors (bad URL, a missing queue, a conflicting declaration, access refused).
    pub fn is_transient(&self) -> bool {
        match self {
            AmqpError::InvalidUrl(_) | AmqpError::NotFound { .. } => false,
            AmqpError::Connect { .. } | AmqpError::DeliveryChannelClosed => true,
            AmqpError::Broker { source, .. } => lapin_is_transient(source),
            AmqpError::Publish(e) => e.is_transient(),
            AmqpError::Management(_) => true,
        }
    }

    /// The AMQP reply code the broker gave, when it gave one (404, 406, ...).
    pub fn reply_code(&self) -> Option<u16> {
        match self {
            AmqpError::Broker { source, .. } => reply_code(source),
            AmqpError::NotFound { .. } => Some(REPLY_NOT_FOUND),
            _ => None,
        }
    }

    /// The broker's reply text, when the broker closed the channel or
    /// connection with one (it names the offending argument on a 406).
    pub fn reply_text(&self) -> Option<&str> {
        match self {
            AmqpError::Broker { source, .. } => reply_text(source),
            _ => None,
        }
    }
}

/// The AMQP reply code carried by a lapin error, if any.
pub(crate) fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        ErrorKind::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}

/// The AMQP reply text carried by a lapin error, if any.
pub(crate) fn reply_text(e: &lapin::Error) -> Option<&str> {
    match e.kind() {
        ErrorKind::ProtocolError(p) => Some(p.get_message().as_str()),
        _ => None,
    }
}

/// Whether a lapin error is worth retrying on a fresh connection or channel.
pub(crate) fn lapin_is_transient(e: &lapin::Error) -> bool {
    match e.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::ChannelsLimitReached => true,
        ErrorKind::ProtocolError(p) => match p.kind() {
            // Connection-level: forced close (operator, restart), internal errors.
            AMQPErrorKind::Hard(_) => p.get_id() == REPLY_CONNECTION_FORCED || p.get_id() >= 500,
            // Channel-level: 404/403/406 are caller errors; a locked resource may free up.
            AMQPErrorKind::Soft(_) => p.get_id() == REPLY_RESOURCE_LOCKED,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPError as ProtoError;

    fn protocol(id: u16, text: &str) -> lapin::Error {
        let e = ProtoError::from_id(id, text.into()).map(ErrorKind::ProtocolError);
        match e {
            Some(kind) => kind.into(),
            None => panic!("unknown id {id}"),
        }
    }

    #[test]
    fn conflicts_and_missing_objects_are_not_retried() {
        let e = AmqpError::broker(
            "queue.declare",
            protocol(406, "PRECONDITION_FAILED - inequivalent arg"),
        );
        assert!(!e.is_transient());
        assert_eq!(e.reply_code(), Some(406));
        assert_eq!(
            e.reply_text(),
            Some("PRECONDITION_FAILED - inequivalent arg")
        );
        let e = AmqpError::broker("basic.consume", protocol(404, "NOT_FOUND - no queue"));
        assert!(!e.is_transient());
        assert_eq!(e.reply_code(), Some(REPLY_NOT_FOUND));
    }

    #[test]
    fn dropped_connections_are_retried() {
        let e = AmqpError::broker(
            "basic.publish",
            protocol(320, "CONNECTION_FORCED - closed via management plugin"),
        );
        assert!(e.is_transient());
        let io: lapin::Error = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        assert!(AmqpError::broker("basic.publish", io).is_transient());
        assert!(!AmqpError::InvalidUrl("x".into()).is_transient());
    }
}
