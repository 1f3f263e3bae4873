//! The gateway's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Labels of `sandfleet_gateway_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The matched route (`/webhooks/github`), or `other`.
    pub route: String,
    /// The HTTP status code answered.
    pub status: u16,
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
        Metrics {
            registry,
            requests,
            enqueued,
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
