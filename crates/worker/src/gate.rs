//! The worker's [`ApiGate`]: the circuit breaker plus Kubernetes API metrics.
//!
//! Every Kubernetes API call of the sandbox executor asks
//! [`ApiGate::permit`] first and reports with [`ApiGate::record`]. The gate
//! feeds the [`CircuitBreaker`] (clock: tokio's, so paused-time tests drive
//! it), keeps `sandfleet_breaker_state` and the API metrics current, and
//! broadcasts state changes to the flow controller ([`crate::flow`]), which
//! pauses consumption while the breaker is open.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sandfleet_sandbox::gate::Permission;
use sandfleet_sandbox::{ApiGate, CallClass, GateClosed};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::breaker::{BreakerConfig, BreakerState, CallVerdict, CircuitBreaker};
use crate::metrics::Metrics;

/// The circuit-breaking, metrics-recording gate of the Kubernetes API.
#[derive(Debug)]
pub struct BreakerGate {
    breaker: Mutex<CircuitBreaker>,
    metrics: Arc<Metrics>,
    state: watch::Sender<BreakerState>,
    /// Permissions the API refused (401/403), with its message; the flow
    /// controller pauses while any is missing and probes them.
    denied: watch::Sender<BTreeMap<Permission, String>>,
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl BreakerGate {
    /// A closed gate.
    pub fn new(config: BreakerConfig, metrics: Arc<Metrics>) -> Self {
        metrics.set_breaker_state(BreakerState::Closed);
        BreakerGate {
            breaker: Mutex::new(CircuitBreaker::new(config)),
            metrics,
            state: watch::channel(BreakerState::Closed).0,
            denied: watch::channel(BTreeMap::new()).0,
        }
    }

    /// The permissions the API refused and no probe has shown back yet.
    pub fn denied_permissions(&self) -> BTreeMap<Permission, String> {
        self.denied.borrow().clone()
    }

    /// Changes of [`BreakerGate::denied_permissions`].
    pub fn subscribe_denied(&self) -> watch::Receiver<BTreeMap<Permission, String>> {
        self.denied.subscribe()
    }

    /// A probe showed `permission` granted again.
    pub fn granted(&self, permission: &Permission) {
        self.denied.send_if_modified(|d| {
            let removed = d.remove(permission).is_some();
            if removed {
                info!(%permission, "kubernetes API permission granted again");
            }
            removed
        });
    }

    /// The verbs the breaker refuses while it is not closed.
    pub fn failing_verbs(&self) -> Vec<&'static str> {
        self.lock().failing_verbs()
    }

    /// Times the breaker went from closed to open.
    pub fn times_tripped(&self) -> u64 {
        self.lock().times_tripped()
    }

    fn lock(&self) -> MutexGuard<'_, CircuitBreaker> {
        // The breaker holds plain counters; a panic elsewhere leaves it usable.
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        self.lock().state(now())
    }

    /// How long until an open breaker's cooldown ends (zero when it has).
    pub fn cooldown_left(&self) -> Option<Duration> {
        let b = self.lock();
        b.open_until().map(|u| u.saturating_duration_since(now()))
    }

    /// Times the breaker has opened.
    pub fn times_opened(&self) -> u64 {
        self.lock().times_opened()
    }

    /// State changes, for the flow controller.
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.state.subscribe()
    }

    fn publish(&self, state: BreakerState) {
        self.metrics.set_breaker_state(state);
        self.state.send_if_modified(|s| {
            if *s == state {
                return false;
            }
            match state {
                BreakerState::Open => warn!("kubernetes API circuit breaker opened"),
                BreakerState::HalfOpen => {
                    info!("kubernetes API circuit breaker half-open: probing")
                }
                BreakerState::Closed => info!("kubernetes API circuit breaker closed"),
            }
            *s = state;
            true
        });
    }
}

fn verdict(class: CallClass) -> (CallVerdict, Option<&'static str>) {
    match class {
        CallClass::Success => (CallVerdict::Success, None),
        CallClass::Failure => (CallVerdict::Failure, Some("failure")),
        CallClass::Ignored => (CallVerdict::Ignored, Some("ignored")),
        CallClass::Throttled { retry_after } => {
            (CallVerdict::Throttled(retry_after), Some("throttled"))
        }
    }
}

impl ApiGate for BreakerGate {
    fn permit(&self, verb: &'static str) -> Result<(), GateClosed> {
        let t = now();
        let (r, state) = {
            let mut b = self.lock();
            (b.try_acquire(t, verb), b.state(t))
        };
        self.publish(state);
        r.map_err(|_| {
            self.metrics.kube_error("any", "refused");
            GateClosed
        })?;
        // The first create an attempt sends ends its dispatch (the clock the
        // dispatch loop started for the delivery this task handles).
        if verb == "create"
            && let Some(elapsed) = crate::dispatch::dispatch_elapsed()
        {
            self.metrics.observe_dispatch(elapsed);
        }
        Ok(())
    }

    fn record(&self, verb: &'static str, class: CallClass, elapsed: Duration) {
        let (v, label) = verdict(class);
        let (state, tripped) = {
            let mut b = self.lock();
            let before = b.times_tripped();
            let state = b.on_result(now(), verb, v);
            (state, b.times_tripped() > before)
        };
        self.metrics.kube_request(verb, label, elapsed);
        if tripped {
            self.metrics.breaker_tripped();
        }
        self.publish(state);
    }

    fn denied(&self, permission: Permission, message: &str) {
        self.denied.send_if_modified(|d| {
            let new = !d.contains_key(&permission);
            if new {
                warn!(%permission, %message, "the kubernetes API refused a permission the worker needs; pausing");
            }
            d.insert(permission, message.to_owned());
            new
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn gate() -> BreakerGate {
        BreakerGate::new(
            BreakerConfig {
                consecutive_failures: 3,
                failure_rate: 1.0,
                window: 10,
                min_calls: 10,
                cooldown: Duration::from_secs(30),
                max_cooldown: Duration::from_secs(120),
                half_open_probes: 2,
            },
            Arc::new(Metrics::new()),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn server_errors_open_it_and_conflicts_do_not() {
        let g = gate();
        let mut rx = g.subscribe();
        for _ in 0..5 {
            g.permit("create").unwrap();
            g.record("create", CallClass::from_status(409, None), Duration::ZERO);
        }
        assert_eq!(g.state(), BreakerState::Closed);
        for _ in 0..3 {
            g.permit("create").unwrap();
            g.record("create", CallClass::from_status(500, None), Duration::ZERO);
        }
        assert_eq!(g.state(), BreakerState::Open);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), BreakerState::Open);
        assert_eq!(g.permit("create"), Err(GateClosed));
        let text = g.metrics.encode();
        assert!(text.contains("sandfleet_breaker_state 2"));
        assert!(
            text.contains("sandfleet_kube_api_errors_total{verb=\"create\",class=\"failure\"} 3")
        );
        assert!(
            text.contains("sandfleet_kube_api_errors_total{verb=\"create\",class=\"ignored\"} 5")
        );
        // After the cooldown two good probes close it.
        tokio::time::advance(Duration::from_secs(30)).await;
        for _ in 0..2 {
            g.permit("create").unwrap();
            g.record("create", CallClass::Success, Duration::from_millis(3));
        }
        assert_eq!(g.state(), BreakerState::Closed);
        let text = g.metrics.encode();
        assert!(text.contains("sandfleet_breaker_state 0"));
        assert!(text.contains("sandfleet_breaker_trips_total 1"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_by_the_gate() {
        let g = gate();
        g.permit("create").unwrap();
        g.record(
            "create",
            CallClass::from_status(429, Some(Duration::from_secs(3))),
            Duration::ZERO,
        );
        assert_eq!(g.permit("create"), Err(GateClosed));
        tokio::time::advance(Duration::from_millis(2900)).await;
        assert_eq!(g.permit("create"), Err(GateClosed));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(g.permit("create").is_ok());
        assert_eq!(g.state(), BreakerState::Closed, "429 does not trip");
    }

    #[test]
    fn a_denied_permission_is_kept_until_granted() {
        use sandfleet_sandbox::gate::ApiOp;
        let g = gate();
        let mut rx = g.subscribe_denied();
        let p = Permission {
            op: ApiOp::CreateJob,
            namespace: "ns".into(),
        };
        g.denied(p.clone(), "jobs.batch is forbidden");
        g.denied(p.clone(), "jobs.batch is forbidden");
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().len(), 1);
        assert!(
            !rx.has_changed().unwrap(),
            "the same denial twice is one change"
        );
        // A 403 is the caller's problem for the breaker: it stays closed.
        assert_eq!(g.state(), BreakerState::Closed);
        g.granted(&p);
        assert!(g.denied_permissions().is_empty());
    }
}
