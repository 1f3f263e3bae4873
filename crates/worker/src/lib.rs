//! The sandfleet worker: dispatch loop, retries, circuit breaker, shutdown,
//! health and metrics.
//!
//! [`run`] is the whole worker process, wired from the settings: RabbitMQ
//! broker ([`rabbit`]), the executor chosen by `worker.executor` (with the
//! breaker [`gate`], [`flow`] control and orphan-Job GC for Kubernetes), the
//! results publisher, and the [`health`] server. Start reading at
//! [`dispatch`]: the loop that takes a delivery from a [`Broker`], decodes
//! and validates the task, runs it on a sandbox executor, publishes the result
//! with a confirm and only then acks. What follows an attempt is decided by
//! the pure [`retry::decide`]; the Kubernetes API is guarded by the
//! [`breaker::CircuitBreaker`] state machine, which takes the clock as an
//! argument. [`InMemoryBroker`] and [`MemoryResults`] are real in-memory
//! implementations for tests and the one-process demo. `docs/worker.md` has
//! the guarantees, metrics and the test matrix.

mod app;
pub mod breaker;
pub mod broker;
pub mod cancel;
pub mod dispatch;
pub mod fair;
pub mod flow;
pub mod gate;
pub mod health;
pub mod kube;
pub mod memory;
pub mod metrics;
pub mod rabbit;
pub mod retry;
pub mod sink;
pub mod trace;

pub use app::{WorkerError, dispatch_config, poll_queue_depth, run, worker_name};
pub use broker::{Broker, BrokerError, Delivery, RetryMessage};
pub use cancel::Cancels;
pub use dispatch::{DispatchConfig, Dispatcher};
pub use fair::{FairBroker, FairDelivery, Scheduler};
pub use memory::InMemoryBroker;
pub use sink::{MemoryResults, ResultSink};
