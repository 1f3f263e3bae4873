//! Where accepted tasks go: the [`TaskSink`] the HTTP layer talks to.
//!
//! Production uses the confirmed RabbitMQ producer (see [`crate::BrokerSink`]);
//! the trait keeps the HTTP layer testable without a broker and lets the CLI
//! hand in whatever producer it built.

use async_trait::async_trait;
use sandfleet_proto::Task;

/// Why a task could not be enqueued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The task failed validation (answered 400, never retried).
    #[error("invalid task: {0}")]
    Invalid(String),
    /// The broker could not be reached or did not confirm (answered 503; the
    /// CI provider retries).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

impl SinkError {
    /// True when the same request may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Unavailable(_))
    }
}

/// Accepts tasks; `enqueue` returns only once the broker confirmed the task.
#[async_trait]
pub trait TaskSink: Send + Sync + 'static {
    /// Publishes `task` and waits for the broker's confirm.
    async fn enqueue(&self, task: &Task) -> Result<(), SinkError>;

    /// Whether the sink can currently accept tasks (drives `/readyz`).
    async fn is_ready(&self) -> bool {
        true
    }
}
