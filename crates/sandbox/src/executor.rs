//! The [`Executor`] trait both executors implement, and what a run returns.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sandfleet_proto::{Artifact, Outcome, StepResult, Task, TaskId};

use crate::script::ScriptError;

/// Runs attempts of tasks in sandboxes.
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Runs (or adopts) attempt `attempt` of `task` to its end.
    ///
    /// A task's own failure is an `Ok(Execution)` whose `outcome` says so; an
    /// `Err` means the executor could not find out what happened (the API
    /// failed, the spec was refused).
    async fn run(
        &self,
        task: &Task,
        attempt: u32,
        ctx: &RunContext,
    ) -> Result<Execution, ExecError>;

    /// Runs attempt `attempt` of `task` once `clearance` gives the run's
    /// context; `None` when it was refused and nothing of the task ran.
    ///
    /// An executor may ready the sandbox while the clearance is pending, so
    /// long as nothing of the task runs before it comes and what was readied
    /// is gone when it is refused or this future is dropped: the local
    /// executor starts its script, held before the task's first file
    /// ([`crate::script::ScriptOptions::start_on_stdin`]). The default waits
    /// for the clearance, then [`Executor::run`]s: a Job is created only
    /// once it came.
    async fn run_when_cleared(
        &self,
        task: &Task,
        attempt: u32,
        clearance: Clearance<'_>,
    ) -> Option<Result<Execution, ExecError>> {
        let ctx = clearance.await?;
        Some(self.run(task, attempt, &ctx).await)
    }

    /// Stops a running attempt and deletes its sandbox. Stopping an attempt
    /// that is not running is not an error.
    async fn cancel(&self, task_id: TaskId, attempt: u32) -> Result<(), ExecError>;
}

/// What lets an attempt start ([`Executor::run_when_cleared`]): the
/// worker's cancellation read barrier. Resolves to the run's context once
/// nothing stands in the attempt's way, or to `None` when it must not start
/// (a cancel was read, the cancellations are not readable).
pub type Clearance<'a> = Pin<Box<dyn Future<Output = Option<RunContext>> + Send + 'a>>;

/// Per-run context from the worker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunContext {
    /// W3C `traceparent` of the task's span, put on the Job's annotations.
    pub traceparent: Option<String>,
    /// The worker's name, for logs and labels.
    pub worker: String,
    /// The cancellations stream offset the worker had read up to when it
    /// started the attempt (its read barrier's marker), put on the Job's
    /// annotations: a cancel at a higher offset may race the start.
    pub cancels_read_to: Option<u64>,
}

/// What one attempt did, in the shape the worker turns into a `TaskResult`.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    /// What happened.
    pub outcome: Outcome,
    /// Exit code of the step that decided the outcome (the failing step, or 0).
    pub exit_code: Option<i32>,
    /// Per-step results, one per declared step (skipped ones included).
    pub steps: Vec<StepResult>,
    /// The tail of the sandbox's output, bounded.
    pub log_tail: String,
    /// True when output was dropped somewhere (a step's head, or the log's end).
    pub log_truncated: bool,
    /// Artifacts collected from the workspace.
    pub artifacts: Vec<Artifact>,
    /// When the sandbox started, when it did.
    pub started_at: Option<DateTime<Utc>>,
    /// When the attempt ended.
    pub finished_at: DateTime<Utc>,
    /// The sandbox: the Job name, or the local workspace path.
    pub sandbox: String,
    /// Human-readable reason when the outcome is not `succeeded`.
    pub error: Option<String>,
    /// True when a Job created earlier (by a worker that lost the delivery) was adopted.
    pub adopted: bool,
    /// Time the sandbox waited suspended for Kueue's admission (preemptions
    /// included); `None` when no cluster queue manages it.
    pub admission_wait: Option<Duration>,
}

/// Why an executor could not run or observe an attempt.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A Kubernetes API call failed after the in-place retries.
    #[error("kubernetes API {verb} failed: {message}")]
    Api {
        /// The verb (`create`, `get`, `delete`, `logs`, `list`).
        verb: &'static str,
        /// HTTP status, when the server answered.
        status: Option<u16>,
        /// What went wrong.
        message: String,
        /// Server's Retry-After, for 429.
        retry_after: Option<Duration>,
    },
    /// The task cannot run as given (invalid spec, or the API refused it with 4xx/422).
    #[error("task rejected: {0}")]
    Rejected(String),
    /// A Job with our deterministic name belongs to another task.
    #[error("job {name} exists and belongs to task {other}")]
    Conflict {
        /// The Job name.
        name: String,
        /// The task id found on it.
        other: String,
    },
    /// The API gate (circuit breaker) is open; nothing was sent.
    #[error("kubernetes API unavailable: circuit breaker open")]
    Unavailable,
    /// The local sandbox could not be set up or run (spawn, temp dir).
    #[error("local sandbox: {0}")]
    Io(#[from] std::io::Error),
    /// The attempt was cancelled through [`Executor::cancel`] or shutdown.
    #[error("cancelled")]
    Cancelled,
    /// The executor's configuration is unusable (kubeconfig, namespace).
    #[error("executor configuration: {0}")]
    Config(String),
}

impl From<ScriptError> for ExecError {
    fn from(e: ScriptError) -> Self {
        ExecError::Rejected(e.to_string())
    }
}

impl ExecError {
    /// True when trying again later may succeed: API 5xx/429/timeouts, an
    /// open breaker, local I/O trouble. False for rejections and conflicts.
    pub fn is_transient(&self) -> bool {
        match self {
            ExecError::Api { status, .. } => match status {
                None => true,
                Some(s) => *s == 429 || *s >= 500 || *s == 408,
            },
            ExecError::Unavailable | ExecError::Io(_) => true,
            ExecError::Rejected(_)
            | ExecError::Conflict { .. }
            | ExecError::Cancelled
            | ExecError::Config(_) => false,
        }
    }

    /// The delay the server asked for (429 Retry-After), if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ExecError::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
