//! Logs and traces for every sandfleet process.
//!
//! [`init`] installs the global `tracing` subscriber from the `telemetry`
//! section of the configuration: an env-filter, human or JSON log lines on
//! stderr, and an OpenTelemetry layer. Spans always get W3C trace ids, so the
//! trace context travels from the webhook through the AMQP `traceparent`
//! header and the Job's `sandfleet.dev/traceparent` annotation to the result
//! even when nothing is exported; spans are exported over OTLP/HTTP only when
//! `telemetry.otlp_endpoint` is set. Keep the returned [`TelemetryGuard`]
//! alive for the life of the process: dropping it (or better, awaiting
//! [`TelemetryGuard::shutdown`]) flushes the spans still buffered.
//!
//! Short commands use [`init_console`] instead: the same log lines, no export.
//! Log lines go through [`QuietStderr`], which drops what a closed stderr
//! cannot take instead of panicking, and are coloured only on a terminal
//! without `NO_COLOR` ([`use_colour`]).
//!
//! [`inject_traceparent`] and [`set_parent_from_traceparent`] move a span's
//! context in and out of a `traceparent` string (start with those when you
//! publish or consume a message).

mod console;
mod init;
mod propagation;

pub use console::{QuietStderr, colour_wanted, eprint_line, use_colour};
pub use init::{TelemetryGuard, init, init_console, subscriber, with_library_defaults};
pub use propagation::{
    TRACEPARENT_ANNOTATION, TRACEPARENT_HEADER, inject_traceparent, set_parent_from_traceparent,
    trace_id,
};

/// The version every sandfleet process reports in `sandfleet_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the binary was built from: the `SANDFLEET_GIT_SHA`
/// environment variable at build time (the Dockerfile and the release
/// workflow set it), or `unknown` for a plain `cargo build`.
pub const GIT_SHA: &str = match option_env!("SANDFLEET_GIT_SHA") {
    Some(sha) => sha,
    None => "unknown",
};

/// The labels of `sandfleet_build_info` for `component` (`worker`,
/// `gateway`): `version`, `git_sha`, `component`. The metric's value is
/// always 1; dashboards join on it to show which build runs where.
pub fn build_info_labels(component: &str) -> Vec<(String, String)> {
    vec![
        ("version".to_owned(), VERSION.to_owned()),
        ("git_sha".to_owned(), GIT_SHA.to_owned()),
        ("component".to_owned(), component.to_owned()),
    ]
}

/// Why telemetry could not be set up, or a trace context not applied.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `telemetry.log_filter` is not a valid env-filter directive list.
    #[error("telemetry.log_filter: {0}")]
    Filter(String),
    /// The OTLP exporter could not be built (bad endpoint URL).
    #[error("telemetry.otlp_endpoint: {0}")]
    Exporter(String),
    /// OTLP export was requested outside a Tokio runtime.
    #[error("telemetry.otlp_endpoint is set, so init must run inside a Tokio runtime")]
    NoRuntime,
    /// A global subscriber was installed already (init called twice).
    #[error("a global tracing subscriber is already installed")]
    AlreadyInitialized,
    /// The value is not a valid W3C `traceparent`.
    #[error("not a valid W3C traceparent: {0:?}")]
    InvalidTraceparent(String),
    /// The span could not take a parent: it is disabled by the filter, has
    /// already started, or no OpenTelemetry layer is installed.
    #[error("cannot set the span's parent: {0}")]
    ParentNotSet(String),
    /// Flushing buffered spans failed.
    #[error("flushing spans failed: {0}")]
    Flush(String),
}

impl TelemetryError {
    /// Only a failed flush may succeed when tried again (the collector was
    /// briefly away); everything else is a configuration or usage error.
    pub fn is_transient(&self) -> bool {
        matches!(self, TelemetryError::Flush(_))
    }
}
