//! The gate every Kubernetes API call passes: the worker's circuit breaker
//! and metrics plug in here, the executor only reports what each call did.

use std::time::Duration;

/// Lets calls through (or not) and hears how each one went.
pub trait ApiGate: Send + Sync {
    /// Asks for permission to send one call; `Err` while the breaker is open.
    fn permit(&self) -> Result<(), GateClosed>;
    /// Records the class and duration of a finished call.
    fn record(&self, verb: &'static str, class: CallClass, elapsed: Duration);
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
    /// 4xx and 409: the caller's problem (or adoption), not the API's.
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
    fn permit(&self) -> Result<(), GateClosed> {
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
    fn permit(&self) -> Result<(), GateClosed> {
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
