//! The result message: what one attempt of a task did.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{CancelInfo, Outcome, RejectReason, Source, Task, TaskId};

/// The structured result of one attempt, published to the results exchange.
///
/// Results are delivered at least once; consumers deduplicate by
/// `(task_id, attempt)`. Exactly one result per task has `final: true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskResult {
    /// Version of this contract; must be 1.
    #[schemars(extend("const" = 1))]
    pub schema_version: u32,
    /// The task this result is for.
    pub task_id: TaskId,
    /// Attempt number, starting at 1.
    pub attempt: u32,
    /// What happened.
    pub outcome: Outcome,
    /// True when no further attempt follows; false when the task will be retried.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Exit code of the step that decided the outcome (the failing step, or 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Per-step results, in the order the steps were declared.
    #[serde(default)]
    pub steps: Vec<StepResult>,
    /// The tail of the sandbox's combined output.
    #[serde(default)]
    pub log_tail: String,
    /// True when `log_tail` is not the whole output.
    #[serde(default)]
    pub log_truncated: bool,
    /// Artifacts collected from the workspace.
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
    /// When the sandbox started (absent when it never started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When the attempt finished.
    pub finished_at: DateTime<Utc>,
    /// The worker that ran the attempt (its pod or host name).
    pub worker: String,
    /// The sandbox that ran it: the Job name, or the local workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// A human-readable reason when the outcome is not `succeeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The task's source, so results can be filtered by repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// The task's labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The task itself, so a failed build can be replayed from the results
    /// stream. Absent for messages that could not be decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Box<Task>>,
    /// Who cancelled the task and why; present only when `outcome` is
    /// `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancellation: Option<CancelInfo>,
    /// Where the attempt's time went besides running; absent when there is
    /// nothing to report (results from before it existed stay valid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
}

/// Parts of an attempt's time, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    /// Time the sandbox Job waited suspended for Kueue's admission against
    /// the cluster's quotas (`sandbox.kubernetes.kueue_queue`), preemptions
    /// included. It does not count toward the task's pending timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission_wait_ms: Option<u64>,
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepResult {
    /// The step's name.
    pub name: String,
    /// Exit code; absent when the step did not run (skipped after an earlier failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Wall-clock duration in milliseconds.
    pub duration_ms: u64,
    /// True when the step was killed by its timeout.
    #[serde(default)]
    pub timed_out: bool,
    /// True when the step never ran.
    #[serde(default)]
    pub skipped: bool,
    /// The tail of this step's output.
    #[serde(default)]
    pub output_tail: String,
    /// True when `output_tail` is not the whole output.
    #[serde(default)]
    pub output_truncated: bool,
}

/// A file collected from the workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Workspace-relative path.
    pub path: String,
    /// Size in bytes of the file in the sandbox.
    pub size_bytes: u64,
    /// Content, when it is UTF-8 and small enough to carry inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// True when `content` holds only a prefix of the file, or is absent for size.
    #[serde(default)]
    pub truncated: bool,
}

impl TaskResult {
    /// The deduplication key consumers use: `(task_id, attempt)`.
    pub fn dedup_key(&self) -> (TaskId, u32) {
        (self.task_id, self.attempt)
    }
}

impl TaskResult {
    /// A result for `attempt` of `task` with `outcome`, finished now, with the
    /// task's source, labels and the task itself filled in, and no step
    /// results yet.
    ///
    /// `final` is decided here, in one place: a non-retryable outcome is
    /// final, and so is a retryable one on the task's last allowed attempt.
    pub fn from_task(
        task: &Task,
        attempt: u32,
        outcome: Outcome,
        worker: impl Into<String>,
    ) -> TaskResult {
        let is_final = !outcome.is_retryable() || attempt >= task.retry.max_attempts;
        TaskResult {
            source: Some(task.source.clone()),
            labels: task.labels.clone(),
            task: Some(Box::new(task.clone())),
            ..TaskResult::bare(task.id, attempt, outcome, is_final, worker.into())
        }
    }

    /// The final `rejected` result for a message that could not be decoded
    /// or failed validation. `task_id` is [`RejectReason::task_id`] when the
    /// id could be read (the nil UUID otherwise); `error` is the reason's
    /// text, prefixed with its code.
    pub fn rejected(
        task_id: TaskId,
        reason: &RejectReason,
        worker: impl Into<String>,
    ) -> TaskResult {
        TaskResult {
            error: Some(format!("{}: {reason}", reason.code())),
            ..TaskResult::bare(task_id, 1, Outcome::Rejected, true, worker.into())
        }
    }

    /// A result with nothing but its identity, outcome and worker filled in;
    /// finished now.
    fn bare(
        task_id: TaskId,
        attempt: u32,
        outcome: Outcome,
        is_final: bool,
        worker: String,
    ) -> TaskResult {
        TaskResult {
            schema_version: crate::SCHEMA_VERSION,
            task_id,
            attempt,
            outcome,
            is_final,
            exit_code: None,
            steps: Vec::new(),
            log_tail: String::new(),
            log_truncated: false,
            artifacts: Vec::new(),
            started_at: None,
            finished_at: Utc::now(),
            worker,
            sandbox: None,
            error: None,
            source: None,
            labels: BTreeMap::new(),
            task: None,
            cancellation: None,
            timings: None,
        }
    }
}
