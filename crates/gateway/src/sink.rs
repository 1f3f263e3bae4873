//! Where accepted tasks go: the [`TaskSink`] the HTTP layer talks to.
//!
//! Production uses the confirmed RabbitMQ producer (see [`crate::BrokerSink`]);
//! the trait keeps the HTTP layer testable without a broker and lets the CLI
//! hand in whatever producer it built.

use async_trait::async_trait;
use sandfleet_proto::{Outcome, Task, TaskId};

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

/// What a cancel did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelAnswer {
    /// Recorded (broker-confirmed) under this cancel id.
    Recorded(uuid::Uuid),
    /// The task already has a final result; nothing was recorded.
    AlreadyFinished(Outcome),
    /// The id cannot be a task of this fleet.
    Unknown(String),
}

/// Accepts tasks; `enqueue` returns only once the broker confirmed the task.
#[async_trait]
pub trait TaskSink: Send + Sync + 'static {
    /// Publishes `task` and waits for the broker's confirm.
    async fn enqueue(&self, task: &Task) -> Result<(), SinkError>;

    /// Records a cancel of `task_id` (`POST /v1/tasks/{id}/cancel`). Sinks
    /// without a cancellations stream answer [`SinkError::Unavailable`].
    async fn cancel(
        &self,
        task_id: TaskId,
        by: &str,
        reason: &str,
    ) -> Result<CancelAnswer, SinkError> {
        let _ = (task_id, by, reason);
        Err(SinkError::Unavailable(
            "this gateway cannot record cancels".to_owned(),
        ))
    }

    /// Whether the sink can currently accept tasks (drives `/readyz`).
    async fn is_ready(&self) -> bool {
        true
    }
}
