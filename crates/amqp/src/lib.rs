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
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use sandfleet_amqp::{Amqp, Consumer, ConsumerOptions, OutgoingMessage, Publisher, Topology, TASK_ROUTING_KEY};
//! use sandfleet_settings::{AmqpSettings, TopologySettings};
//!
//! let settings = AmqpSettings {
//!     url: std::env::var("AMQP_ADDR")
//!         .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
//!     ..AmqpSettings::default()
//! };
//! let amqp = Amqp::connect(&settings, "example").await?;
//! # let prefix = format!("doctest-amqp-{}", uuid::Uuid::new_v4().simple());
//! let topology = Topology::new(&TopologySettings { prefix, ..TopologySettings::default() });
//! topology.apply(&amqp).await?; // idempotent
//!
//! let publisher = Publisher::new(&amqp).await?;
//! let message = OutgoingMessage::new(&topology.tasks_exchange, TASK_ROUTING_KEY, b"{}".to_vec())
//!     .message_id("task-1")
//!     .attempt(1);
//! publisher.publish(&message).await?; // Ok only after the broker's ack, with no return
//!
//! let mut consumer = Consumer::start(&amqp, ConsumerOptions::new(&topology.tasks_queue, 4)).await?;
//! let delivery = consumer.next_delivery().await.expect("a delivery");
//! assert_eq!(delivery.message_id(), Some("task-1"));
//! assert_eq!(delivery.attempt(), Some(1));
//! delivery.ack().await?;
//! # topology.delete(&amqp).await?;
//! # Ok(())
//! # }
//! ```

mod connection;
mod consumer;
mod error;
pub mod management;
mod message;
mod publisher;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topology;

pub use connection::{Amqp, OUTAGE_LOG_INTERVAL, OutageLine, OutageLog};
pub use consumer::{Consumer, ConsumerOptions, Delivery, HEADER_RETURNS, StreamOffset};
pub use error::{
    AmqpError, REPLY_ACCESS_REFUSED, REPLY_CONNECTION_FORCED, REPLY_NO_ROUTE, REPLY_NOT_FOUND,
    REPLY_PRECONDITION_FAILED, REPLY_RESOURCE_LOCKED,
};
pub use management::{Management, QueueConsumer, QueueInfo};
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
