//! The sessions service's Prometheus metrics.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `sandfleet_sessions_active` | gauge | — (sessions alive in the namespace, refreshed by the reaper) |
//! | `sandfleet_sessions_started_total` | counter | — |
//! | `sandfleet_sessions_start_duration_seconds` | histogram | — (create → ready for commands) |
//! | `sandfleet_sessions_command_duration_seconds` | histogram | — (request → exit status) |
//! | `sandfleet_sessions_exec_errors_total` | counter | `code` (`connection_lost`, `unavailable`, `not_found`, ...) |
//! | `sandfleet_sessions_reaped_total` | counter | — (ended by idle timeout or lifetime, then deleted) |
//! | `sandfleet_build_info` | info | `version`, `git_sha`, `component="sessions"` |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Labels of `sandfleet_sessions_exec_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The error code.
    pub code: String,
}

/// The service's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Sessions alive.
    pub active: Gauge,
    /// Sessions started by this replica.
    pub started: Counter,
    /// Start latency.
    pub start_duration: Histogram,
    /// Command latency.
    pub command_duration: Histogram,
    /// Failed operations, by code.
    pub exec_errors: Family<ErrorLabels, Counter>,
    /// Sessions reaped.
    pub reaped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let active = Gauge::default();
        let started = Counter::default();
        // 10 ms .. ~5 min: a pod start includes scheduling and image pulls.
        let start_duration = Histogram::new(exponential_buckets(0.01, 2.0, 15));
        // 1 ms .. ~30 min.
        let command_duration = Histogram::new(exponential_buckets(0.001, 2.0, 21));
        let exec_errors = Family::<ErrorLabels, Counter>::default();
        let reaped = Counter::default();
        registry.register(
            "sandfleet_sessions_active",
            "Sessions alive",
            active.clone(),
        );
        registry.register(
            "sandfleet_sessions_started",
            "Sessions started",
            started.clone(),
        );
        registry.register(
            "sandfleet_sessions_start_duration_seconds",
            "Time from create to a sandbox ready for commands",
            start_duration.clone(),
        );
        registry.register(
            "sandfleet_sessions_command_duration_seconds",
            "Time from a run request to the command's exit status",
            command_duration.clone(),
        );
        registry.register(
            "sandfleet_sessions_exec_errors",
            "Session operations that failed, by code",
            exec_errors.clone(),
        );
        registry.register(
            "sandfleet_sessions_reaped",
            "Sessions deleted after ending by idle timeout or lifetime",
            reaped.clone(),
        );
        registry.register(
            "sandfleet_build",
            "The running build: version, git commit, component (value 1)",
            Info::new(sandfleet_telemetry::build_info_labels("sessions")),
        );
        Metrics {
            registry,
            active,
            started,
            start_duration,
            command_duration,
            exec_errors,
            reaped,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a failed operation.
    pub fn error(&self, code: &str) {
        self.exec_errors
            .get_or_create(&ErrorLabels { code: code.into() })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn the_service_says_which_build_it_runs() {
        let text = Metrics::default().encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("sandfleet_build_info{"))
            .unwrap_or_else(|| panic!("no sandfleet_build_info in\n{text}"));
        assert!(line.contains("component=\"sessions\""), "{line}");
        assert!(
            line.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
            "{line}"
        );
        assert!(line.ends_with(" 1"), "{line}");
    }
}
