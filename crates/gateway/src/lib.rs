//! sandfleet's CI webhook gateway: GitHub and GitLab deliveries and a bearer-
//! token task API in, broker-confirmed fix-attempt tasks out.
//!
//! Start with [`Gateway`]: give it the `gateway` settings section and a
//! [`TaskSink`] (in production [`BrokerSink`], the confirmed RabbitMQ
//! producer, or [`ConnectingSink`], which connects in the background so the
//! gateway serves before the broker is up), then [`Gateway::run`] or [`Gateway::serve`] it. A request is
//! answered 202 with the task id only after the broker confirmed the task, and
//! 503 when it could not (so the CI provider retries).
//!
//! The pieces are small and pure where they can be: [`signature`] checks
//! credentials in constant time, [`event`] decides which deliveries are failed
//! builds, [`template`] turns one into a task (event values become env vars,
//! never part of a command), [`allowlist`] filters repositories and [`dedup`]
//! remembers delivery ids.

pub mod allowlist;
mod broker_sink;
pub mod dedup;
pub mod event;
pub mod metrics;
mod server;
pub mod signature;
pub mod sink;
pub mod template;

pub use broker_sink::{BrokerSink, ConnectingSink};
pub use server::{DEDUP_MAX_ENTRIES, DEDUP_TTL, Gateway, GatewayError};
pub use sink::{SinkError, TaskSink};
