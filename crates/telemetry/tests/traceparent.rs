//! Trace context survives the trip through a `traceparent` string.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sandfleet_settings::TelemetrySettings;
use sandfleet_telemetry::{
    TelemetryError, inject_traceparent, set_parent_from_traceparent, subscriber, trace_id,
};

fn with_subscriber<R>(filter: &str, f: impl FnOnce() -> R) -> R {
    let settings = TelemetrySettings {
        log_filter: filter.to_owned(),
        ..TelemetrySettings::default()
    };
    let (subscriber, guard) = subscriber(&settings).unwrap();
    assert!(!guard.is_exporting(), "no endpoint, no export");
    tracing::subscriber::with_default(subscriber, f)
}

/// `00-<32 hex>-<16 hex>-<2 hex>`.
fn parts(tp: &str) -> (String, String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    assert_eq!(p[0], "00");
    assert_eq!((p[1].len(), p[2].len(), p[3].len()), (32, 16, 2), "{tp}");
    (p[1].to_owned(), p[2].to_owned(), p[3].to_owned())
}

#[test]
fn injected_then_extracted_keeps_the_trace_id() {
    with_subscriber("info", || {
        let producer = tracing::info_span!("enqueue");
        let tp =
            inject_traceparent(&producer).expect("spans have a trace context without an exporter");
        let (trace, producer_span, flags) = parts(&tp);
        assert_eq!(flags, "01", "sampled");
        assert_eq!(trace_id(&tp).as_deref(), Some(trace.as_str()));

        // The consumer side: a new span continued from the header value.
        let consumer = tracing::info_span!("run_task");
        set_parent_from_traceparent(&consumer, &tp).unwrap();
        let child = inject_traceparent(&consumer).unwrap();
        let (child_trace, child_span, _) = parts(&child);
        assert_eq!(child_trace, trace, "the trace continues");
        assert_ne!(child_span, producer_span, "as a new span");

        // A span created inside the consumer inherits the trace too.
        let inner = consumer.in_scope(|| tracing::info_span!("create_job"));
        assert_eq!(
            trace_id(&inject_traceparent(&inner).unwrap()).unwrap(),
            trace
        );
    });
}

#[test]
fn a_foreign_traceparent_is_continued() {
    with_subscriber("info", || {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span = tracing::info_span!("webhook");
        set_parent_from_traceparent(&span, incoming).unwrap();
        let out = inject_traceparent(&span).unwrap();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(!out.contains("00f067aa0ba902b7"), "a new span id: {out}");
    });
}

#[test]
fn invalid_traceparents_are_refused() {
    with_subscriber("info", || {
        let span = tracing::info_span!("x");
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f35-00f0-01",
        ] {
            assert!(
                matches!(
                    set_parent_from_traceparent(&span, bad),
                    Err(TelemetryError::InvalidTraceparent(_))
                ),
                "{bad:?}"
            );
            assert_eq!(trace_id(bad), None);
        }
    });
}

#[test]
fn a_span_disabled_by_the_filter_has_no_traceparent() {
    with_subscriber("warn", || {
        let span = tracing::info_span!("quiet");
        assert_eq!(inject_traceparent(&span), None);
        assert!(!tracing::warn_span!("loud").is_disabled());
    });
}

#[test]
fn a_bad_filter_is_a_clear_error() {
    let settings = TelemetrySettings {
        log_filter: "sandfleet=loud".to_owned(),
        ..TelemetrySettings::default()
    };
    let err = subscriber(&settings).err().unwrap();
    assert!(
        err.to_string().starts_with("telemetry.log_filter: "),
        "{err}"
    );
}

#[test]
fn export_needs_a_runtime() {
    let settings = TelemetrySettings {
        otlp_endpoint: Some("http://127.0.0.1:4318".to_owned()),
        ..TelemetrySettings::default()
    };
    assert!(matches!(
        subscriber(&settings).err().unwrap(),
        TelemetryError::NoRuntime
    ));
}
