//! The gate every Kubernetes API call passes: the worker's circuit breaker
//! and metrics plug in here, the executor only reports what each call did.

use std::time::Duration;

/// Lets calls through (or not) and hears how each one went.
pub trait ApiGate: Send + Sync {
    /// Asks for permission to send one `verb` call (`create`, `get`, `list`,
    /// `delete`, `logs`); `Err` while the breaker refuses that verb.
    fn permit(&self, verb: &'static str) -> Result<(), GateClosed>;
    /// Records the class and duration of a finished call.
    fn record(&self, verb: &'static str, class: CallClass, elapsed: Duration);
    /// The API answered 401 or 403: the worker lacks `permission` (a Role
    /// missing a verb, a revoked token). A fleet problem, not a task's; the
    /// worker pauses and reports it until a probe shows the permission back.
    fn denied(&self, permission: Permission, message: &str) {
        let _ = (permission, message);
    }
}

/// One Kubernetes API call the executor makes, with what RBAC must allow
/// for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ApiOp {
    /// `create jobs`.
    CreateJob,
    /// `get jobs`.
    GetJob,
    /// `delete jobs`.
    DeleteJob,
    /// `list jobs`.
    ListJobs,
    /// `list pods`.
    ListPods,
    /// `get pods/log`.
    ReadLog,
}

impl ApiOp {
    /// The verb label of metrics and of the breaker (`create`, `get`,
    /// `delete`, `list`, `logs`).
    pub fn verb(self) -> &'static str {
        match self {
            ApiOp::CreateJob => "create",
            ApiOp::GetJob => "get",
            ApiOp::DeleteJob => "delete",
            ApiOp::ListJobs | ApiOp::ListPods => "list",
            ApiOp::ReadLog => "logs",
        }
    }

    /// `(API group, resource, RBAC verb)`, as a Role grants it.
    pub fn rbac(self) -> (&'static str, &'static str, &'static str) {
        match self {
            ApiOp::CreateJob => ("batch", "jobs", "create"),
            ApiOp::GetJob => ("batch", "jobs", "get"),
            ApiOp::DeleteJob => ("batch", "jobs", "delete"),
            ApiOp::ListJobs => ("batch", "jobs", "list"),
            ApiOp::ListPods => ("", "pods", "list"),
            ApiOp::ReadLog => ("", "pods/log", "get"),
        }
    }

    /// The operation a breaker verb label stands for, to probe it.
    pub fn for_verb(verb: &str) -> Option<ApiOp> {
        Some(match verb {
            "create" => ApiOp::CreateJob,
            "get" => ApiOp::GetJob,
            "delete" => ApiOp::DeleteJob,
            "list" => ApiOp::ListJobs,
            "logs" => ApiOp::ReadLog,
            _ => return None,
        })
    }
}

/// A permission the API refused: an operation in a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Permission {
    /// The refused operation.
    pub op: ApiOp,
    /// The namespace it was refused in.
    pub namespace: String,
}

impl std::fmt::Display for Permission {
    /// `create jobs.batch in namespace "sandboxes"`, as `kubectl auth can-i` spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (group, resource, verb) = self.op.rbac();
        if group.is_empty() {
            write!(f, "{verb} {resource}")?;
        } else {
            write!(f, "{verb} {resource}.{group}")?;
        }
        write!(f, " in namespace \"{}\"", self.namespace)
    }
}

/// The gate refused the call (the breaker is open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the Kubernetes API gate is closed")]
pub struct GateClosed;

/// How a call went, as far as a circuit breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallClass {
    /// 2xx.
    Success,
    /// 5xx, timeouts, connection errors: counts against the API's health.
    Failure,
    /// 4xx and 409: the caller's problem (or adoption), not the API's. (A
    /// 401/403 is ignored by the breaker too; [`ApiGate::denied`] hears it.)
    Ignored,
    /// 429: back off for `retry_after`, but do not trip.
    Throttled {
        /// The server's Retry-After, when it sent one.
        retry_after: Option<Duration>,
    },
}

impl CallClass {
    /// The class of an HTTP status code.
    pub fn from_status(status: u16, retry_after: Option<Duration>) -> CallClass {
        match status {
            200..=399 => CallClass::Success,
            429 => CallClass::Throttled { retry_after },
            408 | 500..=599 => CallClass::Failure,
            _ => CallClass::Ignored,
        }
    }

    /// A short label for metrics (`success`, `failure`, `ignored`, `throttled`).
    pub fn as_str(self) -> &'static str {
        match self {
            CallClass::Success => "success",
            CallClass::Failure => "failure",
            CallClass::Ignored => "ignored",
            CallClass::Throttled { .. } => "throttled",
        }
    }
}

/// The gate that lets everything through and records nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGate;

impl ApiGate for NoGate {
    fn permit(&self, _verb: &'static str) -> Result<(), GateClosed> {
        Ok(())
    }
    fn record(&self, _verb: &'static str, _class: CallClass, _elapsed: Duration) {}
}

/// A gate that records every call, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct RecordingGate {
    calls: std::sync::Mutex<Vec<(&'static str, CallClass)>>,
    closed: std::sync::atomic::AtomicBool,
}

impl RecordingGate {
    /// Every recorded `(verb, class)`, in order.
    pub fn calls(&self) -> Vec<(&'static str, CallClass)> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
    /// Opens (refuses everything) or closes the gate.
    pub fn set_closed(&self, closed: bool) {
        self.closed
            .store(closed, std::sync::atomic::Ordering::SeqCst);
    }
}

impl ApiGate for RecordingGate {
    fn permit(&self, _verb: &'static str) -> Result<(), GateClosed> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            Err(GateClosed)
        } else {
            Ok(())
        }
    }
    fn record(&self, verb: &'static str, class: CallClass, _elapsed: Duration) {
        if let Ok(mut c) = self.calls.lock() {
            c.push((verb, class));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permission_reads_like_kubectl_auth_can_i() {
        let p = Permission {
            op: ApiOp::CreateJob,
            namespace: "sandboxes".into(),
        };
        assert_eq!(
            p.to_string(),
            "create jobs.batch in namespace \"sandboxes\""
        );
        let p = Permission {
            op: ApiOp::ReadLog,
            namespace: "x".into(),
        };
        assert_eq!(p.to_string(), "get pods/log in namespace \"x\"");
    }

    #[test]
    fn every_op_is_a_required_permission() {
        for op in [
            ApiOp::CreateJob,
            ApiOp::GetJob,
            ApiOp::DeleteJob,
            ApiOp::ListJobs,
            ApiOp::ListPods,
            ApiOp::ReadLog,
        ] {
            assert!(
                crate::REQUIRED_PERMISSIONS.contains(&op.rbac()),
                "{op:?} is not in REQUIRED_PERMISSIONS"
            );
        }
    }
}
