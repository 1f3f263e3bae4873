//! RabbitMQ for sandfleet: connection pool, topology, confirmed publisher,
//! consumer.
//!
//! Start with [`Amqp::connect`], which builds a deadpool-lapin pool of named,
//! heartbeating connections (TLS with `amqps://`). [`Topology`] declares the
//! exchanges and queues ([`Topology::apply`], [`Topology::check`]); see
//! `docs/topology.md` for the table. [`Publisher`] publishes with pipelined
//! confirms and reports every nack, return and lost confirm as an error;
//! [`Consumer`] yields [`Delivery`]s with ack / reject / nack, dead-lettering
//! with a reason, and forwarding to the retry ladder. Both recover from
//! connection loss with jittered exponential backoff (backon).
//!
//! Everything here talks to a real broker; the worker's in-memory broker for
//! unit tests lives in the worker crate.

mod connection;
mod consumer;
mod error;
pub mod management;
mod message;
mod publisher;
pub mod topology;

pub use connection::Amqp;
pub use consumer::{Consumer, ConsumerOptions, Delivery, StreamOffset};
pub use error::{
    AmqpError, REPLY_ACCESS_REFUSED, REPLY_CONNECTION_FORCED, REPLY_NO_ROUTE, REPLY_NOT_FOUND,
    REPLY_PRECONDITION_FAILED, REPLY_RESOURCE_LOCKED,
};
pub use management::Management;
pub use message::{
    HEADER_ATTEMPT, HEADER_IDEMPOTENCY_KEY, HEADER_PUBLISHED_AT_MS, HEADER_REJECT_CODE,
    HEADER_REJECT_REASON, HEADER_TRACEPARENT, OutgoingMessage, amqp_int, header_i64, header_str,
};
pub use publisher::{Confirm, PublishError, Publisher, PublisherOptions};
pub use topology::{
    CheckReport, Declaration, Finding, ObjectKind, RetryTier, TASK_ROUTING_KEY, Topology,
    TopologyError,
};

/// lapin, re-exported for the types that appear in this API (`FieldTable`,
/// `BasicProperties`, `AMQPValue`).
pub use lapin;
