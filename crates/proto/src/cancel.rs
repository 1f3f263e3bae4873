//! The cancellation message: a fact, recorded once, that some tasks must stop.
//!
//! A [`Cancellation`] is published (with a publisher confirm) to the
//! cancellations stream; every worker reads the whole stream from its start
//! and keeps an in-memory index, so a cancel reaches a task wherever it is —
//! queued, prefetched, in a retry delay queue, or running — and also workers
//! that start or reconnect after it was issued (design decision 14).
//!
//! It names its targets in one of two ways ([`CancelTarget`]): one task by
//! id, or every task with a supersede key that was created before a newer
//! task with the same key (a new push to the same branch makes the fix
//! attempt for the previous commit moot).

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{SCHEMA_VERSION, Task, TaskId};

/// AMQP `type` property of a cancellation message.
pub const CANCELLATION_MESSAGE_TYPE: &str = "sandfleet.cancellation.v1";

/// Longest accepted `by` / `reason` / supersede key, in bytes.
pub const MAX_CANCEL_TEXT: usize = 512;

/// One cancel request, as published to the cancellations stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Cancellation {
    /// Version of this contract; must be 1.
    #[schemars(extend("const" = 1))]
    pub schema_version: u32,
    /// Unique id of this cancel request (UUIDv7).
    pub id: Uuid,
    /// Which tasks it cancels.
    pub target: CancelTarget,
    /// Who asked (a user, a token's name, `gateway`, a supersede).
    pub by: String,
    /// Why, for humans.
    pub reason: String,
    /// When it was requested.
    pub requested_at: DateTime<Utc>,
}

/// The tasks a [`Cancellation`] applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CancelTarget {
    /// One task, by id (every attempt of it).
    Task {
        /// The task to cancel.
        task_id: TaskId,
    },
    /// Every task carrying `supersede_key` that was created before
    /// `created_before`, except `superseded_by` (the newer task itself).
    Supersede {
        /// The key shared by the tasks (e.g. `github:acme/widgets:ref:main`).
        supersede_key: String,
        /// The newer task that makes the older ones moot.
        superseded_by: TaskId,
        /// The newer task's `created_at`: older tasks with the key are cancelled.
        created_before: DateTime<Utc>,
    },
    /// Not a cancel: a worker's read barrier. A worker publishes one and reads
    /// the stream until it sees it, so it knows every cancel confirmed before
    /// has been applied. Ignored by everything else.
    Marker,
}

/// Who cancelled a task and why, as carried in a `cancelled` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelInfo {
    /// The cancel request's id.
    pub cancel_id: Uuid,
    /// Who asked.
    pub by: String,
    /// Why.
    pub reason: String,
    /// For a supersede: the newer task that replaced this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<TaskId>,
}

/// The supersede key an intake sets on a CI task: newer work for the same
/// merge request (`<provider>:<repository>:mr:<number>`) or, without one,
/// the same branch (`<provider>:<repository>:ref:<branch>`). `None` when the
/// source names neither.
pub fn supersede_key_for(source: &crate::Source) -> Option<String> {
    let provider = match source.provider {
        crate::Provider::Github => "github",
        crate::Provider::Gitlab => "gitlab",
        crate::Provider::Api => "api",
    };
    match (source.pull_request, source.git_ref.as_deref()) {
        (Some(n), _) => Some(format!("{provider}:{}:mr:{n}", source.repository)),
        (None, Some(r)) if !r.is_empty() => {
            Some(format!("{provider}:{}:ref:{r}", source.repository))
        }
        _ => None,
    }
}

impl Cancellation {
    /// A cancel of one task, requested now.
    pub fn task(task_id: TaskId, by: impl Into<String>, reason: impl Into<String>) -> Self {
        Cancellation::new(CancelTarget::Task { task_id }, by.into(), reason.into())
    }

    /// The supersede a newer task implies: `None` when it has no supersede key.
    pub fn supersede_by(newer: &Task) -> Option<Self> {
        let key = newer.supersede_key.clone()?;
        Some(Cancellation::new(
            CancelTarget::Supersede {
                supersede_key: key,
                superseded_by: newer.id,
                created_before: newer.created_at,
            },
            "supersede".into(),
            format!("superseded by the newer task {}", newer.id),
        ))
    }

    /// A worker's read barrier (see [`CancelTarget::Marker`]).
    pub fn marker(by: impl Into<String>) -> Self {
        Cancellation::new(CancelTarget::Marker, by.into(), String::new())
    }

    fn new(target: CancelTarget, by: String, reason: String) -> Self {
        Cancellation {
            schema_version: SCHEMA_VERSION,
            id: Uuid::now_v7(),
            target,
            by,
            reason,
            requested_at: Utc::now(),
        }
    }

    /// Whether this cancel applies to `task`, and if so who and why.
    pub fn applies_to(&self, task: &Task) -> Option<CancelInfo> {
        let superseded_by = match &self.target {
            CancelTarget::Task { task_id } if *task_id == task.id => None,
            CancelTarget::Supersede {
                supersede_key,
                superseded_by,
                created_before,
            } if task.supersede_key.as_deref() == Some(supersede_key.as_str())
                && *superseded_by != task.id
                && task.created_at < *created_before =>
            {
                Some(*superseded_by)
            }
            _ => return None,
        };
        Some(self.info(superseded_by))
    }

    /// The [`CancelInfo`] a cancelled result carries.
    pub fn info(&self, superseded_by: Option<TaskId>) -> CancelInfo {
        CancelInfo {
            cancel_id: self.id,
            by: self.by.clone(),
            reason: self.reason.clone(),
            superseded_by,
        }
    }

    /// Checks what a reader relies on: the version and bounded text.
    pub fn validate(&self) -> Result<(), String> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(format!(
                "unsupported schema_version {} (expected {SCHEMA_VERSION})",
                self.schema_version
            ));
        }
        let key_len = match &self.target {
            CancelTarget::Supersede { supersede_key, .. } if supersede_key.is_empty() => {
                return Err("supersede_key is empty".into());
            }
            CancelTarget::Supersede { supersede_key, .. } => supersede_key.len(),
            _ => 0,
        };
        for (field, len) in [
            ("by", self.by.len()),
            ("reason", self.reason.len()),
            ("supersede_key", key_len),
        ] {
            if len > MAX_CANCEL_TEXT {
                return Err(format!("{field} is {len} bytes, over {MAX_CANCEL_TEXT}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::{Provider, SandboxSpec, Source};

    fn task(key: Option<&str>) -> Task {
        let mut source = Source::new(Provider::Github, "acme/widgets", "4f2a9c1");
        source.git_ref = Some("main".into());
        let mut t = Task::fix_attempt(source, SandboxSpec::new("alpine:3", 60));
        t.supersede_key = key.map(Into::into);
        t
    }

    #[test]
    fn a_task_cancel_applies_to_that_task_only() {
        let (a, b) = (task(None), task(None));
        let c = Cancellation::task(a.id, "ops", "runaway");
        let info = c.applies_to(&a).unwrap();
        assert_eq!((info.by.as_str(), info.reason.as_str()), ("ops", "runaway"));
        assert!(c.applies_to(&b).is_none());
    }

    #[test]
    fn a_supersede_cancels_older_tasks_with_the_key_and_spares_the_newer_one() {
        let mut older = task(Some("k"));
        older.created_at -= chrono::Duration::seconds(5);
        let newer = task(Some("k"));
        let mut other_key = task(Some("other"));
        other_key.created_at = older.created_at;
        let mut unkeyed = task(None);
        unkeyed.created_at = older.created_at;
        let mut newest = task(Some("k"));
        newest.created_at += chrono::Duration::seconds(5);
        let s = Cancellation::supersede_by(&newer).unwrap();
        assert_eq!(s.applies_to(&older).unwrap().superseded_by, Some(newer.id));
        assert!(s.applies_to(&newer).is_none());
        assert!(s.applies_to(&newest).is_none());
        assert!(s.applies_to(&other_key).is_none());
        assert!(s.applies_to(&unkeyed).is_none());
        assert!(Cancellation::supersede_by(&unkeyed).is_none());
    }

    #[test]
    fn the_supersede_key_names_the_merge_request_else_the_branch() {
        let mut t = task(None);
        assert_eq!(
            supersede_key_for(&t.source).as_deref(),
            Some("github:acme/widgets:ref:main")
        );
        t.source.pull_request = Some(42);
        assert_eq!(
            supersede_key_for(&t.source).as_deref(),
            Some("github:acme/widgets:mr:42")
        );
        t.source.pull_request = None;
        t.source.git_ref = None;
        assert_eq!(supersede_key_for(&t.source), None);
    }

    #[test]
    fn markers_cancel_nothing_and_the_wire_form_is_tagged() {
        let t = task(Some("k"));
        let m = Cancellation::marker("w1");
        assert!(m.applies_to(&t).is_none());
        let c = Cancellation::task(t.id, "ops", "why");
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["target"]["kind"], "task");
        assert_eq!(json["target"]["task_id"], t.id.to_string());
        let back: Cancellation = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
        assert!(c.validate().is_ok());
        let mut long = c.clone();
        long.reason = "x".repeat(MAX_CANCEL_TEXT + 1);
        assert!(long.validate().unwrap_err().contains("reason"));
    }
}
