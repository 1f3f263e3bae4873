//! Flow control: stop consuming while the Kubernetes API breaker is open.
//!
//! [`run_flow_control`] follows the [`BreakerGate`]'s state. When the breaker
//! opens it pauses the broker consumer (tasks stay queued for healthy
//! workers; in-flight tasks keep their deliveries and keep watching their
//! Jobs) and marks the worker not ready. When the cooldown ends it sends
//! cheap probe calls ([`Probe`], e.g. listing Jobs with `limit=1`) through the
//! gate until the breaker closes (then consumption resumes) or re-opens.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::breaker::BreakerState;
use crate::broker::Broker;
use crate::gate::BreakerGate;
use crate::health::Health;

/// Pause between probes while half-open.
const PROBE_SPACING: Duration = Duration::from_millis(200);

/// A cheap API call that passes through the gate (it asks
/// `ApiGate::permit` and records its result itself).
#[async_trait]
pub trait Probe: Send + Sync + 'static {
    /// Makes one call; `Err` describes the failure.
    async fn probe(&self) -> Result<(), String>;
}

/// Runs until `shutdown`: pauses `broker` while the breaker is open and
/// resumes it once probes have closed it.
pub async fn run_flow_control<B: Broker>(
    gate: Arc<BreakerGate>,
    broker: Arc<B>,
    health: Arc<Health>,
    probe: Arc<dyn Probe>,
    shutdown: CancellationToken,
) {
    let mut changes = gate.subscribe();
    let mut paused = false;
    loop {
        let state = gate.state();
        match state {
            BreakerState::Closed => {
                if paused {
                    match broker.resume().await {
                        Ok(()) => {
                            paused = false;
                            health.set_breaker_open(false);
                            info!("breaker closed: consuming again");
                        }
                        Err(e) => {
                            warn!(error = %e, "resume failed; retrying");
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                            continue;
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
            }
            BreakerState::Open | BreakerState::HalfOpen => {
                if !paused {
                    health.set_breaker_open(true);
                    match broker.pause().await {
                        Ok(()) => {
                            paused = true;
                            warn!("breaker open: consumption paused, tasks stay queued");
                        }
                        Err(e) => warn!(error = %e, "pause failed; retrying"),
                    }
                }
                let wait = gate.cooldown_left().unwrap_or(Duration::ZERO);
                if state == BreakerState::Open && !wait.is_zero() {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
                // Cooldown over: probe. The probe's own permit moves the
                // breaker to half-open; its result closes or re-opens it.
                match probe.probe().await {
                    Ok(()) => debug!("probe succeeded"),
                    Err(e) => debug!(error = %e, "probe failed"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(PROBE_SPACING) => {}
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use sandfleet_sandbox::{ApiGate, CallClass};

    use super::*;
    use crate::breaker::BreakerConfig;
    use crate::broker::Delivery;
    use crate::memory::{InMemoryBroker, StoredMessage};
    use crate::metrics::Metrics;

    /// A probe against an "API" whose health the test switches.
    struct SwitchProbe {
        gate: Arc<BreakerGate>,
        healthy: AtomicBool,
        calls: AtomicUsize,
    }

    #[async_trait]
    impl Probe for SwitchProbe {
        async fn probe(&self) -> Result<(), String> {
            self.gate.permit().map_err(|e| e.to_string())?;
            self.calls.fetch_add(1, Ordering::SeqCst);
            let ok = self.healthy.load(Ordering::SeqCst);
            let class = if ok {
                CallClass::Success
            } else {
                CallClass::Failure
            };
            self.gate.record("list", class, Duration::from_millis(1));
            if ok { Ok(()) } else { Err("500".into()) }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_pauses_consumption_until_a_probe_closes_it() {
        let metrics = Arc::new(Metrics::new());
        let gate = Arc::new(BreakerGate::new(
            BreakerConfig {
                consecutive_failures: 3,
                failure_rate: 1.0,
                window: 10,
                min_calls: 10,
                cooldown: Duration::from_secs(30),
                half_open_probes: 2,
            },
            metrics.clone(),
        ));
        let broker = Arc::new(InMemoryBroker::default());
        let health = Arc::new(Health::new());
        health.set_broker_connected(true);
        let probe = Arc::new(SwitchProbe {
            gate: gate.clone(),
            healthy: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_flow_control(
            gate.clone(),
            broker.clone(),
            health.clone(),
            probe.clone(),
            stop.clone(),
        ));

        // A burst of 500s from the executor's calls.
        for _ in 0..3 {
            gate.permit().unwrap();
            gate.record("create", CallClass::Failure, Duration::ZERO);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(health.readiness().is_err(), "not ready while open");
        broker.publish(StoredMessage::new(b"task".to_vec()));
        let none = tokio::time::timeout(Duration::from_secs(25), broker.next_delivery()).await;
        assert!(none.is_err(), "no delivery while the breaker is open");
        assert_eq!(broker.ready_len(), 1, "the task stays queued");
        assert_eq!(
            probe.calls.load(Ordering::SeqCst),
            0,
            "no probe during cooldown"
        );

        // The API is still down at the first probe: open for another cooldown.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
        assert_eq!(gate.state(), BreakerState::Open);
        assert_eq!(gate.times_opened(), 2);

        // The API recovers: the next probes close the breaker and the
        // backlog drains.
        probe.healthy.store(true, Ordering::SeqCst);
        let d = tokio::time::timeout(Duration::from_secs(60), broker.next_delivery())
            .await
            .expect("consumption resumed")
            .unwrap();
        assert_eq!(d.body(), b"task");
        assert_eq!(gate.state(), BreakerState::Closed);
        assert_eq!(probe.calls.load(Ordering::SeqCst), 3);
        assert!(health.readiness().is_ok());
        stop.cancel();
        task.await.unwrap();
    }
}
