//! Turning raw message bytes into a validated [`Task`], or a reason to reject.
//!
//! The order matters: the size is checked before any parsing (a 2 GB body is
//! never parsed), then the JSON, then the schema version (so a version-2
//! message gets "unknown schema version", not a confusing field error), then
//! the structure and every validation rule.

use serde_json::Value;

use crate::validate::{FieldError, ValidationErrors};
use crate::{Limits, SCHEMA_VERSION, Task, TaskId, validate};

/// Why a task message was rejected. Rejected messages are dead-lettered with
/// [`RejectReason::code`] and the [`Display`](std::fmt::Display) text, and a
/// `rejected` result is published when [`RejectReason::task_id`] is known.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RejectReason {
    /// The message is larger than `Limits::max_message_bytes`.
    #[error("message is {size} bytes; the limit is {limit}")]
    Oversize {
        /// Size of the message body.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The body is not JSON, or not a JSON object.
    #[error("malformed JSON: {detail}")]
    MalformedJson {
        /// The parser's message.
        detail: String,
        /// The task id, when it could be read.
        task_id: Option<TaskId>,
    },
    /// `schema_version` is missing or not a version this build understands.
    #[error("unknown schema_version {found}; this worker understands version {SCHEMA_VERSION}")]
    UnknownSchemaVersion {
        /// The value found (`missing` when absent), as JSON text.
        found: String,
        /// The task id, when it could be read.
        task_id: Option<TaskId>,
    },
    /// The message is a version-1 task with invalid or missing fields.
    #[error("invalid task: {errors}")]
    Invalid {
        /// Every violated rule.
        errors: ValidationErrors,
        /// The task id, when it could be read.
        task_id: Option<TaskId>,
    },
}

impl RejectReason {
    /// Short machine code: `oversize`, `malformed_json`,
    /// `unknown_schema_version`, `invalid`. Used in the dead-letter header
    /// `x-sandfleet-reject-code` and the `reason` label of metrics.
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::Oversize { .. } => "oversize",
            RejectReason::MalformedJson { .. } => "malformed_json",
            RejectReason::UnknownSchemaVersion { .. } => "unknown_schema_version",
            RejectReason::Invalid { .. } => "invalid",
        }
    }

    /// The task's id when it could be read from the message, even though the
    /// message as a whole was rejected. Never read from an oversize message.
    pub fn task_id(&self) -> Option<TaskId> {
        match self {
            RejectReason::Oversize { .. } => None,
            RejectReason::MalformedJson { task_id, .. }
            | RejectReason::UnknownSchemaVersion { task_id, .. }
            | RejectReason::Invalid { task_id, .. } => *task_id,
        }
    }

    /// The field errors, for [`RejectReason::Invalid`].
    pub fn validation_errors(&self) -> Option<&ValidationErrors> {
        match self {
            RejectReason::Invalid { errors, .. } => Some(errors),
            _ => None,
        }
    }

    /// Always false: a rejected message is rejected again on every delivery,
    /// so it is dead-lettered, never requeued.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// Decodes and validates a task message.
///
/// ```
/// use sandfleet_proto::{decode_task, Limits};
/// let err = decode_task(br#"{"schema_version": 2, "id": "0190b0a4-7c1e-7d2a-8f00-000000000001"}"#, &Limits::default())
///     .unwrap_err();
/// assert_eq!(err.code(), "unknown_schema_version");
/// assert!(err.task_id().is_some());
/// ```
pub fn decode_task(bytes: &[u8], limits: &Limits) -> Result<Task, RejectReason> {
    if bytes.len() > limits.max_message_bytes {
        return Err(RejectReason::Oversize {
            size: bytes.len(),
            limit: limits.max_message_bytes,
        });
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| RejectReason::MalformedJson {
        detail: e.to_string(),
        task_id: None,
    })?;
    let Value::Object(object) = &value else {
        return Err(RejectReason::MalformedJson {
            detail: format!("expected a JSON object, found {}", json_kind(&value)),
            task_id: None,
        });
    };
    let task_id = object
        .get("id")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<TaskId>().ok());
    match object.get("schema_version") {
        Some(Value::Number(n)) if n.as_u64() == Some(u64::from(SCHEMA_VERSION)) => {}
        other => {
            return Err(RejectReason::UnknownSchemaVersion {
                found: other.map_or_else(|| "missing".to_owned(), Value::to_string),
                task_id,
            });
        }
    }
    let task: Task = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        RejectReason::Invalid {
            errors: ValidationErrors(vec![FieldError {
                path: structure_error_path(&path, &message),
                rule: "structure",
                message,
            }]),
            task_id,
        }
    })?;
    validate(&task, limits).map_err(|errors| RejectReason::Invalid {
        errors,
        task_id: Some(task.id),
    })?;
    Ok(task)
}

/// Validates `task` and encodes it as a message body, refusing what a worker
/// would reject: invalid fields ([`RejectReason::Invalid`]) or an encoding
/// larger than `limits.max_message_bytes` ([`RejectReason::Oversize`]).
/// Producers publish the bytes this returns.
pub fn encode_task(task: &Task, limits: &Limits) -> Result<Vec<u8>, RejectReason> {
    validate(task, limits).map_err(|errors| RejectReason::Invalid {
        errors,
        task_id: Some(task.id),
    })?;
    let bytes = serde_json::to_vec(task).map_err(|e| RejectReason::MalformedJson {
        detail: e.to_string(),
        task_id: Some(task.id),
    })?;
    if bytes.len() > limits.max_message_bytes {
        return Err(RejectReason::Oversize {
            size: bytes.len(),
            limit: limits.max_message_bytes,
        });
    }
    Ok(bytes)
}

/// serde reports a missing field at its parent; point at the field itself
/// (`sandbox.deadline_secs`), which is what a user looks for. (An unknown
/// field's path already ends with the field.)
fn structure_error_path(parent: &str, message: &str) -> String {
    let parent = if parent == "." { "" } else { parent };
    let field = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| field);
    match (parent, field) {
        (_, None) => parent.to_owned(),
        ("", Some(f)) => f.to_owned(),
        (p, Some(f)) => format!("{p}.{f}"),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::{Outcome, TaskResult};

    const ID: &str = "0193a6d2-5b1e-7c40-9a2f-3e4d5c6b7a01";

    fn example() -> Value {
        serde_json::from_str(include_str!(
            "../../../examples/tasks/node-fix-attempt.json"
        ))
        .unwrap()
    }

    fn decode(v: &Value) -> Result<Task, RejectReason> {
        decode_task(&serde_json::to_vec(v).unwrap(), &Limits::default())
    }

    #[test]
    fn a_valid_message_decodes() {
        let task = decode(&example()).unwrap();
        assert_eq!(task.id.to_string(), ID);
        assert_eq!(task.steps.len(), 3);
    }

    #[test]
    fn size_is_checked_before_parsing() {
        let limits = Limits {
            max_message_bytes: 16,
            ..Limits::default()
        };
        // Not JSON at all: an oversize body must not even be parsed.
        let err = decode_task(&[b'{'; 17], &limits).unwrap_err();
        assert_eq!(err.code(), "oversize");
        assert_eq!(err.to_string(), "message is 17 bytes; the limit is 16");
        assert_eq!(err.task_id(), None);
        assert_eq!(
            decode_task(&[b'{'; 16], &limits).unwrap_err().code(),
            "malformed_json"
        );
    }

    #[test]
    fn malformed_json_and_non_objects_are_malformed() {
        for body in [
            &b"{\"schema_version\": 1,"[..],
            b"[1,2]",
            b"\"task\"",
            b"",
            b"\xff\xfe",
        ] {
            let err = decode_task(body, &Limits::default()).unwrap_err();
            assert_eq!(err.code(), "malformed_json", "{body:?}");
            assert!(!err.is_transient());
        }
    }

    #[test]
    fn unknown_or_missing_schema_version_is_its_own_reason() {
        let mut v = example();
        v["schema_version"] = 2.into();
        let err = decode(&v).unwrap_err();
        assert_eq!(err.code(), "unknown_schema_version");
        assert_eq!(err.task_id().unwrap().to_string(), ID);
        assert_eq!(
            err.to_string(),
            "unknown schema_version 2; this worker understands version 1"
        );
        v["schema_version"] = "1".into();
        assert_eq!(decode(&v).unwrap_err().code(), "unknown_schema_version");
        v.as_object_mut().unwrap().remove("schema_version");
        let err = decode(&v).unwrap_err();
        assert!(err.to_string().contains("schema_version missing"), "{err}");
    }

    #[test]
    fn structural_errors_name_the_field_and_keep_the_id() {
        let mut v = example();
        v["steps"][1]["timeout_secs"] = "thirty".into();
        let err = decode(&v).unwrap_err();
        assert_eq!(err.code(), "invalid");
        assert_eq!(err.task_id().unwrap().to_string(), ID);
        assert_eq!(
            err.validation_errors().unwrap().paths(),
            ["steps[1].timeout_secs"]
        );

        let mut v = example();
        v["sandbox"]
            .as_object_mut()
            .unwrap()
            .remove("deadline_secs");
        let err = decode(&v).unwrap_err();
        assert_eq!(
            err.validation_errors().unwrap().paths(),
            ["sandbox.deadline_secs"]
        );
    }

    #[test]
    fn validation_failures_are_invalid_with_every_path() {
        let mut v = example();
        v["steps"][0]["timeout_secs"] = 0.into();
        v["sandbox"]["image"] = "NODE".into();
        let err = decode(&v).unwrap_err();
        assert_eq!(err.code(), "invalid");
        assert_eq!(err.task_id().unwrap().to_string(), ID);
        assert_eq!(
            err.validation_errors().unwrap().paths(),
            ["sandbox.image", "steps[0].timeout_secs"]
        );
        assert!(
            err.to_string()
                .starts_with("invalid task: 2 invalid fields: sandbox.image")
        );
    }

    #[test]
    fn encode_refuses_what_decode_would_reject() {
        let task = decode(&example()).unwrap();
        let bytes = encode_task(&task, &Limits::default()).unwrap();
        assert_eq!(decode_task(&bytes, &Limits::default()).unwrap(), task);

        // Every file within its own limit, the message over the total.
        let limits = Limits {
            max_message_bytes: 4096,
            ..Limits::default()
        };
        let big = task.clone().with_file("big.txt", &"x".repeat(5000));
        let err = encode_task(&big, &limits).unwrap_err();
        assert_eq!(err.code(), "oversize");

        let mut invalid = task;
        invalid.steps.clear();
        let err = encode_task(&invalid, &Limits::default()).unwrap_err();
        assert_eq!(err.validation_errors().unwrap().paths(), ["steps"]);
    }

    #[test]
    fn a_rejection_becomes_a_final_rejected_result() {
        let mut v = example();
        v["schema_version"] = 7.into();
        let err = decode(&v).unwrap_err();
        let r = TaskResult::rejected(err.task_id().unwrap_or_default(), &err, "worker-1");
        assert_eq!(r.outcome, Outcome::Rejected);
        assert!(r.is_final);
        assert_eq!(r.task_id.to_string(), ID);
        assert!(
            r.error
                .as_deref()
                .unwrap()
                .starts_with("unknown_schema_version: ")
        );
        // The result itself is a valid result message.
        let back: TaskResult = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn from_task_decides_finality_from_outcome_and_attempts() {
        let task = decode(&example()).unwrap();
        assert_eq!(task.retry.max_attempts, 3);
        let r = TaskResult::from_task(&task, 1, Outcome::Evicted, "w");
        assert!(!r.is_final);
        assert_eq!(r.source.as_ref(), Some(&task.source));
        assert!(TaskResult::from_task(&task, 3, Outcome::Evicted, "w").is_final);
        assert!(TaskResult::from_task(&task, 1, Outcome::Failed, "w").is_final);
    }
}
