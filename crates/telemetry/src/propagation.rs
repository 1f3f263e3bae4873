//! W3C trace context in and out of a `traceparent` string.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::TelemetryError;

/// AMQP header carrying the trace context of a task or result message.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Annotation carrying the trace context on a sandbox Job.
pub const TRACEPARENT_ANNOTATION: &str = "sandfleet.dev/traceparent";

/// The `traceparent` value of `span` (`00-<trace id>-<span id>-<flags>`), or
/// `None` when the span has no valid trace context (it is disabled by the
/// filter, or no OpenTelemetry layer is installed).
///
/// Reading the context starts the span's OpenTelemetry side, so set a
/// remote parent ([`set_parent_from_traceparent`]) before calling this.
pub fn inject_traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT_HEADER)
}

/// The remote context in `traceparent`, when it is well-formed: version
/// `00`, 32 and 16 lowercase hex digits (not all zero), 2 hex flag digits.
/// The SDK's propagator is lenient about lengths; the W3C spec is not.
fn extract(traceparent: &str) -> Option<opentelemetry::Context> {
    let value = traceparent.trim();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let p: Vec<&str> = value.split('-').collect();
    let shape_ok = p.len() == 4 && p[0] == "00" && hex(p[1], 32) && hex(p[2], 16) && hex(p[3], 2);
    if !shape_ok {
        return None;
    }
    let carrier = HashMap::from([(TRACEPARENT_HEADER.to_owned(), value.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` a child of the remote span described by `traceparent`, so
/// its trace continues the producer's. Call it right after creating the span,
/// before entering it.
pub fn set_parent_from_traceparent(
    span: &tracing::Span,
    traceparent: &str,
) -> Result<(), TelemetryError> {
    let cx = extract(traceparent)
        .ok_or_else(|| TelemetryError::InvalidTraceparent(traceparent.to_owned()))?;
    span.set_parent(cx)
        .map_err(|e| TelemetryError::ParentNotSet(e.to_string()))
}

/// The 32-hex trace id of a `traceparent` value, when it is well-formed.
/// Handy for log fields and for asserting that a trace was continued.
pub fn trace_id(traceparent: &str) -> Option<String> {
    let cx = extract(traceparent)?;
    Some(cx.span().span_context().trace_id().to_string())
}
