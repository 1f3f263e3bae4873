//! W3C trace context for the per-task span.
//!
//! The task's span takes its parent from the message's `traceparent` header,
//! and its own context travels on to the Job's annotations (through
//! `RunContext::traceparent`) and the result's headers. When no OpenTelemetry
//! layer is installed the span has no context of its own and the incoming
//! `traceparent` is passed on unchanged, so the chain is never broken.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Parses a version-00 `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// Formats a span context as a `traceparent` value.
pub fn format_traceparent(sc: &SpanContext) -> Option<String> {
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Makes the remote context in `traceparent` the parent of `span`.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(sc) = traceparent.and_then(parse_traceparent) else {
        return;
    };
    let cx = opentelemetry::Context::new().with_remote_span_context(sc);
    // Fails only when no OpenTelemetry layer is installed; then there is no
    // trace to join and the header is passed on as it came.
    let _ = span.set_parent(cx);
}

/// The `traceparent` of `span` itself, when OpenTelemetry is recording it.
pub fn current_traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    format_traceparent(&cx.span().span_context().clone())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_w3c_example() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(v).unwrap();
        assert_eq!(format_traceparent(&sc).unwrap(), v);
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_none()
        );
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(parse_traceparent("garbage").is_none());
    }
}
