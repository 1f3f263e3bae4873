//! The gateway's Prometheus metrics.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `sandfleet_gateway_requests_total` | counter | `route`, `status` |
//! | `sandfleet_gateway_request_duration_seconds` | histogram | `route` |
//! | `sandfleet_gateway_tasks_enqueued_total` | counter | `provider` (`github`, `gitlab`, `api`; at zero from the start) |
//! | `sandfleet_build_info` | info | `version`, `git_sha`, `component="gateway"` |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Labels of `sandfleet_gateway_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The matched route (`/webhooks/github`), or `other`.
    pub route: String,
    /// The HTTP status code answered.
    pub status: u16,
}

/// Labels of `sandfleet_gateway_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The matched route (`/webhooks/github`), or `other`.
    pub route: String,
}

/// The intake routes whose latency histogram exists from the start.
pub const INTAKE_ROUTES: &[&str] = &["/webhooks/github", "/webhooks/gitlab", "/v1/tasks"];

/// The providers whose enqueue counter exists from the start.
pub const PROVIDERS: &[&str] = &["github", "gitlab", "api"];

fn request_duration_histogram() -> Histogram {
    // 1 ms .. ~16 s: a request waits for the broker's publisher confirm.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Labels of `sandfleet_gateway_tasks_enqueued_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// `github`, `gitlab` or `api`.
    pub provider: String,
}

/// The gateway's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Tasks enqueued (broker-confirmed), by provider.
    pub enqueued: Family<ProviderLabels, Counter>,
    /// Time from request to response, by route (the enqueue's confirm included).
    pub request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let enqueued = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "sandfleet_gateway_requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        registry.register(
            "sandfleet_gateway_tasks_enqueued",
            "Tasks enqueued with a broker confirm, by provider",
            enqueued.clone(),
        );
        let request_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                request_duration_histogram,
            );
        registry.register(
            "sandfleet_gateway_request_duration_seconds",
            "Time to answer an HTTP request, by route (an enqueue waits for the broker's confirm)",
            request_duration.clone(),
        );
        registry.register(
            "sandfleet_build",
            "The running build: version, git commit, component (value 1)",
            Info::new(sandfleet_telemetry::build_info_labels("gateway")),
        );
        // At zero from the start: a dashboard shows 0, not "No data", and
        // rate() sees the first task.
        for route in INTAKE_ROUTES {
            let _ = request_duration.get_or_create(&RouteLabels {
                route: (*route).to_owned(),
            });
        }
        for provider in PROVIDERS {
            let _ = enqueued.get_or_create(&ProviderLabels {
                provider: (*provider).to_owned(),
            });
        }
        Metrics {
            registry,
            requests,
            enqueued,
            request_duration,
        }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_and_enqueue_counters_exist_before_any_request() {
        let text = Metrics::default().encode();
        for provider in PROVIDERS {
            let needle =
                format!("sandfleet_gateway_tasks_enqueued_total{{provider=\"{provider}\"}} 0");
            assert!(text.contains(&needle), "missing {needle} in\n{text}");
        }
        assert!(
            text.lines().any(|l| l.starts_with("sandfleet_build_info{")
                && l.contains("component=\"gateway\"")
                && l.ends_with(" 1")),
            "{text}"
        );
        assert!(
            text.contains("# TYPE sandfleet_gateway_request_duration_seconds histogram"),
            "{text}"
        );
    }
}
