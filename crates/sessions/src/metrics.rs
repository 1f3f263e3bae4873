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
//! | `sandfleet_sessions_pool_size` | gauge | `pool` (configured idle members) |
//! | `sandfleet_sessions_pool_idle` | gauge | `pool` (idle members ready to claim, as this replica sees them) |
//! | `sandfleet_sessions_pool_claims_total` | counter | `pool` (sessions served by a warm member) |
//! | `sandfleet_sessions_pool_misses_total` | counter | `pool` (sessions that asked for the pool and got a cold start) |
//! | `sandfleet_sessions_pool_claim_duration_seconds` | histogram | — (create request → claimed member ready for commands) |
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

/// Labels of the pool metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// The pool's name.
    pub pool: String,
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
    /// Configured size, by pool.
    pub pool_size: Family<PoolLabels, Gauge>,
    /// Idle members, by pool.
    pub pool_idle: Family<PoolLabels, Gauge>,
    /// Claims served warm, by pool.
    pub pool_claims: Family<PoolLabels, Counter>,
    /// Cold starts of sessions that asked for a pool, by pool.
    pub pool_misses: Family<PoolLabels, Counter>,
    /// Create → claimed member ready.
    pub pool_claim_duration: Histogram,
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
        let pool_size = Family::<PoolLabels, Gauge>::default();
        let pool_idle = Family::<PoolLabels, Gauge>::default();
        let pool_claims = Family::<PoolLabels, Counter>::default();
        let pool_misses = Family::<PoolLabels, Counter>::default();
        // 1 ms .. ~16 s: a claim is a patch and an exec, a miss is not in it.
        let pool_claim_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "sandfleet_sessions_pool_size",
            "Idle members each warm pool is configured to keep",
            pool_size.clone(),
        );
        registry.register(
            "sandfleet_sessions_pool_idle",
            "Idle warm pool members ready to claim",
            pool_idle.clone(),
        );
        registry.register(
            "sandfleet_sessions_pool_claims",
            "Sessions served by a warm pool member",
            pool_claims.clone(),
        );
        registry.register(
            "sandfleet_sessions_pool_misses",
            "Sessions that asked for a warm pool and got a cold start",
            pool_misses.clone(),
        );
        registry.register(
            "sandfleet_sessions_pool_claim_duration_seconds",
            "Time from a create request to a claimed pool member ready for commands",
            pool_claim_duration.clone(),
        );
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
            pool_size,
            pool_idle,
            pool_claims,
            pool_misses,
            pool_claim_duration,
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

    /// The labels of `pool`.
    pub fn pool(pool: &str) -> PoolLabels {
        PoolLabels { pool: pool.into() }
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
