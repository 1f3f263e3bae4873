//! The worker's Prometheus metrics (names fixed in the shared interfaces).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `sandfleet_tasks_total` | counter | `outcome` (final results only, `rejected` included) |
//! | `sandfleet_task_retries_total` | counter | |
//! | `sandfleet_tasks_rejected_total` | counter | `reason` (`oversize`, `malformed_json`, `unknown_schema_version`, `invalid`, `deadline_exceeds_consumer_timeout`) |
//! | `sandfleet_tasks_dead_lettered_total` | counter | |
//! | `sandfleet_tasks_in_flight` | gauge | |
//! | `sandfleet_queue_ready_messages` | gauge | `queue` |
//! | `sandfleet_task_duration_seconds` | histogram | `outcome` |
//! | `sandfleet_breaker_state` | gauge | 0 closed, 1 half-open, 2 open |
//! | `sandfleet_breaker_trips_total` | counter | (closed → open transitions) |
//! | `sandfleet_task_releases_total` | counter | (deliveries handed back for later) |
//! | `sandfleet_tasks_cancelled_total` | counter | `stage` (`before_start`: queued, prefetched or delayed; `running`: its sandbox was stopped) |
//! | `sandfleet_cancellations_recorded` | gauge | (cancels and supersedes in this worker's index) |
//! | `sandfleet_runtime_threads` | gauge | (threads of the async runtime the metrics were made on, `worker.runtime_threads`) |
//! | `sandfleet_kube_api_request_duration_seconds` | histogram | `verb` |
//! | `sandfleet_dispatch_duration_seconds` | histogram | (a delivery's arrival at the dispatch loop → its sandbox's create request sent) |
//! | `sandfleet_kube_api_errors_total` | counter | `verb`, `class` (`failure`, `ignored`, `throttled`, `refused`) |
//! | `sandfleet_build_info` | info | `version`, `git_sha`, `component` |
//! | `sandfleet_fair_queued` | gauge | `tenant`, `key`: deliveries this worker holds waiting for its fair scheduler (with `topology.task_shards`) |
//! | `sandfleet_fair_running` | gauge | `tenant`, `key`: tasks it runs |
//! | `sandfleet_fair_served_total` | counter | `tenant`, `key`: tasks it started |
//!
//! The fairness labels are bounded (`fairness.metric_keys`): listed tenants
//! and keys by name, then the first ones seen, then `other`.
//!
//! The labelled counters are created at zero for every known label set
//! (every outcome, [`REJECT_REASONS`], [`KUBE_VERBS`] × classes).

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use sandfleet_proto::Outcome;

use crate::breaker::BreakerState;

type Labels = Vec<(&'static str, String)>;

/// The `reason` label values of `sandfleet_tasks_rejected_total`, created at
/// zero: the decode rejections, the deadline budget and the delivery limit.
pub const REJECT_REASONS: &[&str] = &[
    "oversize",
    "malformed_json",
    "unknown_schema_version",
    "invalid",
    sandfleet_proto::DEADLINE_TOO_LONG_CODE,
    crate::dispatch::DELIVERY_LIMIT_CODE,
];

/// The `verb` label values of the Kubernetes API metrics (see
/// `sandfleet_sandbox::ApiOp::verb`); the gate's refusals count as `any`.
pub const KUBE_VERBS: &[&str] = &["create", "get", "delete", "list", "logs"];

fn task_duration_histogram() -> Histogram {
    // 1 s .. ~9 h: sandbox tasks run for seconds to hours.
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

fn api_latency_histogram() -> Histogram {
    // 5 ms .. ~20 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

/// Dispatch overhead: from 250 µs, fine around the milliseconds it should
/// take, up to seconds when something queues.
const DISPATCH_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

fn fair_labels(tenant: &str, key: &str) -> Labels {
    vec![("tenant", tenant.to_owned()), ("key", key.to_owned())]
}

/// Every metric the worker exports, registered in one [`Registry`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    tasks: Family<Labels, Counter>,
    retries: Counter,
    rejected: Family<Labels, Counter>,
    dead_lettered: Counter,
    in_flight: Gauge,
    queue_ready: Family<Labels, Gauge>,
    task_duration: Family<Labels, Histogram, fn() -> Histogram>,
    breaker_state: Gauge,
    breaker_trips: Counter,
    releases: Counter,
    cancelled: Family<Labels, Counter>,
    cancels_recorded: Gauge,
    runtime_threads: Gauge,
    kube_latency: Family<Labels, Histogram, fn() -> Histogram>,
    dispatch: Histogram,
    fair_queued: Family<Labels, Gauge>,
    fair_running: Family<Labels, Gauge>,
    fair_served: Family<Labels, Counter>,
    kube_errors: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            tasks: Family::default(),
            retries: Counter::default(),
            rejected: Family::default(),
            dead_lettered: Counter::default(),
            in_flight: Gauge::default(),
            queue_ready: Family::default(),
            task_duration: Family::new_with_constructor(task_duration_histogram as fn() -> _),
            breaker_state: Gauge::default(),
            breaker_trips: Counter::default(),
            releases: Counter::default(),
            cancelled: Family::default(),
            cancels_recorded: Gauge::default(),
            runtime_threads: Gauge::default(),
            kube_latency: Family::new_with_constructor(api_latency_histogram as fn() -> _),
            kube_errors: Family::default(),
            dispatch: Histogram::new(DISPATCH_BUCKETS.iter().copied()),
            fair_queued: Family::default(),
            fair_running: Family::default(),
            fair_served: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sandfleet_fair_queued",
            "Deliveries held for the fair scheduler, by tenant and key",
            m.fair_queued.clone(),
        );
        registry.register(
            "sandfleet_fair_running",
            "Tasks running, by tenant and key",
            m.fair_running.clone(),
        );
        registry.register(
            "sandfleet_fair_served",
            "Tasks started by the fair scheduler, by tenant and key",
            m.fair_served.clone(),
        );
        registry.register(
            "sandfleet_tasks",
            "Tasks that reached a final result, by outcome",
            m.tasks.clone(),
        );
        registry.register(
            "sandfleet_task_retries",
            "Attempts republished to the retry ladder",
            m.retries.clone(),
        );
        registry.register(
            "sandfleet_tasks_rejected",
            "Task messages refused before running, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "sandfleet_tasks_dead_lettered",
            "Task messages sent to the dead-letter queue",
            m.dead_lettered.clone(),
        );
        registry.register(
            "sandfleet_tasks_cancelled",
            "Tasks that ended cancelled, by where the cancel met them",
            m.cancelled.clone(),
        );
        registry.register(
            "sandfleet_cancellations_recorded",
            "Cancels and supersedes in this worker's index",
            m.cancels_recorded.clone(),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let threads = runtime.metrics().num_workers();
            m.runtime_threads
                .set(i64::try_from(threads).unwrap_or(i64::MAX));
        }
        registry.register(
            "sandfleet_runtime_threads",
            "Threads of the worker's async runtime",
            m.runtime_threads.clone(),
        );
        registry.register(
            "sandfleet_tasks_in_flight",
            "Tasks this worker is running now",
            m.in_flight.clone(),
        );
        registry.register(
            "sandfleet_queue_ready_messages",
            "Messages ready in the task queue",
            m.queue_ready.clone(),
        );
        registry.register(
            "sandfleet_task_duration_seconds",
            "Wall-clock time of one attempt, by outcome",
            m.task_duration.clone(),
        );
        registry.register(
            "sandfleet_breaker_state",
            "Kubernetes API circuit breaker: 0 closed, 1 half-open, 2 open",
            m.breaker_state.clone(),
        );
        registry.register(
            "sandfleet_breaker_trips",
            "Times the Kubernetes API circuit breaker went from closed to open",
            m.breaker_trips.clone(),
        );
        registry.register(
            "sandfleet_task_releases",
            "Deliveries handed back to the queue for later (API unavailable, \
             permission denied, publish failed, drain), without spending their delivery budget",
            m.releases.clone(),
        );
        registry.register(
            "sandfleet_kube_api_request_duration_seconds",
            "Latency of Kubernetes API requests, by verb",
            m.kube_latency.clone(),
        );
        registry.register(
            "sandfleet_dispatch_duration_seconds",
            "Time from a delivery's arrival at the dispatch loop to its sandbox's create request",
            m.dispatch.clone(),
        );
        registry.register(
            "sandfleet_kube_api_errors",
            "Kubernetes API requests that did not succeed, by verb and class",
            m.kube_errors.clone(),
        );
        registry.register(
            "sandfleet_build",
            "The running build: version, git commit, component (value 1)",
            Info::new(sandfleet_telemetry::build_info_labels("worker")),
        );
        // Every known label set exists from the start at zero, so dashboards
        // show 0 rather than "No data" and rate() sees the first event.
        for outcome in Outcome::ALL {
            let _ = m
                .tasks
                .get_or_create(&vec![("outcome", outcome.as_str().to_owned())]);
        }
        for stage in ["before_start", "running"] {
            let _ = m
                .cancelled
                .get_or_create(&vec![("stage", stage.to_owned())]);
        }
        for reason in REJECT_REASONS {
            let _ = m
                .rejected
                .get_or_create(&vec![("reason", (*reason).to_owned())]);
        }
        for verb in KUBE_VERBS {
            for class in ["failure", "ignored", "throttled"] {
                let _ = m.kube_errors.get_or_create(&vec![
                    ("verb", (*verb).to_owned()),
                    ("class", class.to_owned()),
                ]);
            }
        }
        let _ = m.kube_errors.get_or_create(&vec![
            ("verb", "any".to_owned()),
            ("class", "refused".to_owned()),
        ]);
        Metrics { registry, ..m }
    }

    /// A final result of an attempt that ran was published.
    pub fn task_finished(&self, outcome: Outcome, duration: Duration) {
        self.count_final(outcome);
        self.observe_duration(outcome, duration);
    }

    /// A final result was published (also for messages rejected unrun).
    pub fn count_final(&self, outcome: Outcome) {
        self.tasks
            .get_or_create(&vec![("outcome", outcome.as_str().to_owned())])
            .inc();
    }

    /// One attempt's wall-clock time, final or not.
    pub fn observe_duration(&self, outcome: Outcome, duration: Duration) {
        self.task_duration
            .get_or_create(&vec![("outcome", outcome.as_str().to_owned())])
            .observe(duration.as_secs_f64());
    }

    /// An attempt went to the retry ladder.
    pub fn task_retried(&self) {
        self.retries.inc();
    }

    /// A message was refused before running.
    pub fn task_rejected(&self, reason: &str) {
        self.rejected
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }

    /// A message went to the dead-letter queue.
    pub fn task_dead_lettered(&self) {
        self.dead_lettered.inc();
    }

    /// The in-flight gauge; the dispatch loop increments it around a run.
    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// Sets the ready-messages gauge of `queue`.
    pub fn set_queue_depth(&self, queue: &str, depth: u64) {
        self.queue_ready
            .get_or_create(&vec![("queue", queue.to_owned())])
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// Sets the breaker gauge.
    pub fn set_breaker_state(&self, state: BreakerState) {
        self.breaker_state.set(state.as_gauge());
    }

    /// Counts a closed → open transition of the breaker.
    pub fn breaker_tripped(&self) {
        self.breaker_trips.inc();
    }

    /// Counts a task that ended cancelled; `stage` is `before_start` or `running`.
    pub fn task_cancelled(&self, stage: &'static str) {
        self.cancelled
            .get_or_create(&vec![("stage", stage.to_owned())])
            .inc();
    }

    /// Sets how many cancels this worker's index holds.
    pub fn set_cancels_recorded(&self, n: usize) {
        self.cancels_recorded
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A delivery of `tenant`/`key` entered (`+1`) or left (`-1`) the fair
    /// scheduler's buffer.
    pub fn fair_queued(&self, tenant: &str, key: &str, delta: i64) {
        self.fair_queued
            .get_or_create(&fair_labels(tenant, key))
            .inc_by(delta);
    }

    /// The fair scheduler started a task of `tenant`/`key`.
    pub fn fair_started(&self, tenant: &str, key: &str) {
        let l = fair_labels(tenant, key);
        self.fair_running.get_or_create(&l).inc();
        self.fair_served.get_or_create(&l).inc();
    }

    /// A task of `tenant`/`key` the fair scheduler started is over.
    pub fn fair_finished(&self, tenant: &str, key: &str) {
        self.fair_running
            .get_or_create(&fair_labels(tenant, key))
            .dec();
    }

    /// Counts a delivery handed back for later.
    pub fn task_released(&self) {
        self.releases.inc();
    }

    /// Records one Kubernetes API request: its latency and, unless it
    /// succeeded, its error class.
    pub fn kube_request(&self, verb: &'static str, class: Option<&'static str>, elapsed: Duration) {
        self.kube_latency
            .get_or_create(&vec![("verb", verb.to_owned())])
            .observe(elapsed.as_secs_f64());
        if let Some(class) = class {
            self.kube_error(verb, class);
        }
    }

    /// Records one attempt's dispatch overhead: delivery arrival → sandbox
    /// create request sent.
    pub fn observe_dispatch(&self, elapsed: Duration) {
        self.dispatch.observe(elapsed.as_secs_f64());
    }

    /// Counts one Kubernetes API error of `class` (also used for calls the
    /// gate refused: class `refused`).
    pub fn kube_error(&self, verb: &'static str, class: &'static str) {
        self.kube_errors
            .get_or_create(&vec![
                ("verb", verb.to_owned()),
                ("class", class.to_owned()),
            ])
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn labelled_counters_exist_at_zero_before_their_first_event() {
        let text = Metrics::new().encode();
        for needle in [
            "sandfleet_tasks_total{outcome=\"oom_killed\"} 0",
            "sandfleet_tasks_rejected_total{reason=\"malformed_json\"} 0",
            "sandfleet_tasks_rejected_total{reason=\"deadline_exceeds_consumer_timeout\"} 0",
            "sandfleet_tasks_rejected_total{reason=\"delivery_limit\"} 0",
            "sandfleet_kube_api_errors_total{verb=\"create\",class=\"failure\"} 0",
            "sandfleet_kube_api_errors_total{verb=\"logs\",class=\"throttled\"} 0",
            "sandfleet_kube_api_errors_total{verb=\"any\",class=\"refused\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        let build = text
            .lines()
            .find(|l| l.starts_with("sandfleet_build_info{"))
            .expect("sandfleet_build_info");
        assert!(
            build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
            "{build}"
        );
        assert!(
            build.contains("git_sha=") && build.contains("component=\"worker\""),
            "{build}"
        );
        assert!(build.ends_with(" 1"), "{build}");
    }

    #[test]
    fn exposition_carries_the_agreed_names() {
        let m = Metrics::new();
        m.task_finished(Outcome::Failed, Duration::from_secs(3));
        m.task_retried();
        m.task_rejected("malformed_json");
        m.task_dead_lettered();
        m.in_flight().inc();
        m.set_queue_depth("sandfleet.tasks", 42);
        m.set_breaker_state(BreakerState::Open);
        m.kube_request("create", Some("failure"), Duration::from_millis(20));
        m.observe_dispatch(Duration::from_micros(1500));
        let text = m.encode();
        for needle in [
            "sandfleet_tasks_total{outcome=\"failed\"} 1",
            "sandfleet_task_retries_total 1",
            "sandfleet_tasks_rejected_total{reason=\"malformed_json\"} 1",
            "sandfleet_tasks_dead_lettered_total 1",
            "sandfleet_tasks_in_flight 1",
            "sandfleet_queue_ready_messages{queue=\"sandfleet.tasks\"} 42",
            "sandfleet_task_duration_seconds_count{outcome=\"failed\"} 1",
            "sandfleet_breaker_state 2",
            "sandfleet_kube_api_request_duration_seconds_count{verb=\"create\"} 1",
            "sandfleet_kube_api_errors_total{verb=\"create\",class=\"failure\"} 1",
            "sandfleet_dispatch_duration_seconds_bucket{le=\"0.002\"} 1",
            "sandfleet_dispatch_duration_seconds_bucket{le=\"0.001\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
