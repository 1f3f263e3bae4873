//! What operators do to a running fleet, as a library: the `sandfleet` CLI
//! and the operator console (`sandfleet console`) call the same code, so a
//! replay started from a browser is as idempotent as one started from a
//! shell, and a dead letter requeued from either gets the same next attempt.
//!
//! Start with [`replay`] (pure: which failed builds to send again and what
//! the replayed task looks like), [`ledger`] (the broker-side record of
//! replays that makes them repeatable) and [`batch`] (one replay batch:
//! skip what the ledger has, send, record); [`dlq`] reads, requeues and purges
//! dead letters; [`stream`] reads the results stream; [`workers`] asks a
//! worker's HTTP endpoints how it is doing.

pub mod batch;
pub mod dlq;
pub mod error;
pub mod ledger;
pub mod replay;
pub mod stream;
pub mod workers;

pub use error::OpsError;
