//! W3C trace context for the per-task span (helpers from `sandfleet-telemetry`).
//!
//! The task's span takes its parent from the message's `traceparent` header,
//! and its own context travels on to the Job's annotations (through
//! `RunContext::traceparent`) and the result's headers. When no OpenTelemetry
//! layer is installed the span has no context of its own and the incoming
//! `traceparent` is passed on unchanged, so the chain is never broken.

use tracing::debug;

/// Makes the remote context in `traceparent` the parent of `span`.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent
        && let Err(e) = sandfleet_telemetry::set_parent_from_traceparent(span, tp)
    {
        // Malformed header, or no OpenTelemetry layer: nothing to join.
        debug!(error = %e, "task span keeps no remote parent");
    }
}

/// The `traceparent` of `span` itself, when OpenTelemetry is recording it.
pub fn current_traceparent(span: &tracing::Span) -> Option<String> {
    sandfleet_telemetry::inject_traceparent(span)
}
