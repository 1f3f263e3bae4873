//! Flow control: stop consuming while the Kubernetes API cannot take new
//! tasks, and find out by itself when it can again.
//!
//! [`run_flow_control`] follows two signals of the [`BreakerGate`]:
//! - the **circuit breaker**: while it is open it pauses the broker consumer
//!   (tasks stay queued for healthy workers; in-flight tasks keep their
//!   deliveries and keep watching their Jobs) and marks the worker not ready.
//!   When a cooldown ends it probes each *failing* verb ([`Probe`]: a
//!   server-side dry-run create when Job creation fails, a one-item list, a
//!   read of a missing object), so the breaker closes only on evidence that
//!   the failing call works again;
//! - **denied permissions** (401/403): the same pause, with `/readyz` naming
//!   each missing permission (verb, resource, namespace), and a probe of each
//!   one every `recheck` until the Role grants it again.
//!
//! Consumption resumes once the breaker is closed and nothing is denied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sandfleet_sandbox::gate::{ApiOp, Permission};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::breaker::BreakerState;
use crate::broker::Broker;
use crate::gate::BreakerGate;
use crate::health::Health;

/// Pause between trials while half-open.
const PROBE_SPACING: Duration = Duration::from_millis(200);

/// One harmless API call of a given operation, through the gate (it asks
/// `ApiGate::permit` and records its result itself, and reports a 401/403
/// with `ApiGate::denied`).
#[async_trait]
pub trait Probe: Send + Sync + 'static {
    /// Makes one call of `op`; `Ok` when the API answered and allowed it.
    async fn probe(&self, op: ApiOp) -> Result<(), String>;
}

/// Runs until `shutdown`: pauses `broker` while the breaker is open or a
/// permission is denied, probes the failing calls, and resumes once both
/// have cleared. Denied permissions are probed every `recheck`.
pub async fn run_flow_control<B: Broker>(
    gate: Arc<BreakerGate>,
    broker: Arc<B>,
    health: Arc<Health>,
    probe: Arc<dyn Probe>,
    recheck: Duration,
    shutdown: CancellationToken,
) {
    let mut changes = gate.subscribe();
    let mut denied_changes = gate.subscribe_denied();
    let mut paused = false;
    // When each denied permission is probed next.
    let mut recheck_at: HashMap<Permission, Instant> = HashMap::new();
    loop {
        let state = gate.state();
        let denied = gate.denied_permissions();
        let report = || {
            health.set_breaker_open(state != BreakerState::Closed);
            health.set_denied(
                denied
                    .iter()
                    .map(|(p, message)| {
                        format!("kubernetes API permission denied: {p} (the worker's Role must grant it; {message})")
                    })
                    .collect(),
            );
        };
        let hold = state != BreakerState::Closed || !denied.is_empty();
        // Not ready only once the consumer is stopped (and ready again only
        // once it runs), so a 503 from `/readyz` means nothing more is taken.
        if hold == paused {
            report();
        } else {
            let r = if hold {
                broker.pause().await
            } else {
                broker.resume().await
            };
            match r {
                Ok(()) if hold => {
                    paused = true;
                    report();
                    warn!(
                        breaker = state.as_str(),
                        denied = denied.len(),
                        "consumption paused, tasks stay queued"
                    );
                }
                Ok(()) => {
                    paused = false;
                    report();
                    info!("kubernetes API usable again: consuming again");
                }
                Err(e) => {
                    report();
                    warn!(error = %e, "pausing or resuming the consumer failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            }
        }

        let now = Instant::now();
        recheck_at.retain(|p, _| denied.contains_key(p));
        let mut next: Option<Instant> = None;
        let mut soonest = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));

        // The breaker: wait out the cooldown, then try each failing verb.
        if state != BreakerState::Closed {
            let wait = gate.cooldown_left().unwrap_or(Duration::ZERO);
            if state == BreakerState::Open && !wait.is_zero() {
                soonest(now + wait);
            } else {
                // One trial per failing verb, all under way together: each
                // probe's permit (taken on its first poll) moves the breaker
                // to half-open, and a verb that answers leaves the failing set
                // even when another verb's trial re-opens the breaker first.
                let trials = gate
                    .failing_verbs()
                    .into_iter()
                    .filter_map(|verb| Some((verb, ApiOp::for_verb(verb)?)))
                    .map(|(verb, op)| {
                        let probe = probe.clone();
                        async move {
                            match probe.probe(op).await {
                                Ok(()) => debug!(verb, "breaker trial succeeded"),
                                Err(e) => debug!(verb, error = %e, "breaker trial failed"),
                            }
                        }
                    });
                futures::future::join_all(trials).await;
                soonest(Instant::now() + PROBE_SPACING);
            }
        }

        // Denied permissions: probe each one every `recheck`.
        for permission in denied.keys() {
            let due = *recheck_at
                .entry(permission.clone())
                .or_insert(now + recheck);
            if due <= now {
                match probe.probe(permission.op).await {
                    Ok(()) => gate.granted(permission),
                    Err(e) => {
                        debug!(%permission, error = %e, "permission still missing");
                        recheck_at.insert(permission.clone(), Instant::now() + recheck);
                    }
                }
            }
            if let Some(t) = recheck_at.get(permission) {
                soonest(*t);
            }
        }

        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            r = denied_changes.changed() => if r.is_err() { return },
            _ = sleep => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use sandfleet_sandbox::{ApiGate, CallClass};

    use super::*;
    use crate::breaker::BreakerConfig;
    use crate::broker::Delivery;
    use crate::memory::{InMemoryBroker, StoredMessage};
    use crate::metrics::Metrics;

    /// Probes against an "API" whose creates the test breaks (500) or
    /// forbids (403); every other call works.
    struct SwitchProbe {
        gate: Arc<BreakerGate>,
        creates_fail: AtomicBool,
        creates_forbidden: AtomicBool,
        calls: Mutex<Vec<ApiOp>>,
    }

    impl SwitchProbe {
        fn calls_of(&self, op: ApiOp) -> usize {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| **c == op)
                .count()
        }
    }

    #[async_trait]
    impl Probe for SwitchProbe {
        async fn probe(&self, op: ApiOp) -> Result<(), String> {
            self.gate.permit(op.verb()).map_err(|e| e.to_string())?;
            self.calls.lock().unwrap().push(op);
            let create = op == ApiOp::CreateJob;
            if create && self.creates_forbidden.load(Ordering::SeqCst) {
                self.gate
                    .record(op.verb(), CallClass::from_status(403, None), Duration::ZERO);
                self.gate.denied(permission(), "forbidden");
                return Err("403".into());
            }
            let ok = !(create && self.creates_fail.load(Ordering::SeqCst));
            let class = if ok {
                CallClass::Success
            } else {
                CallClass::Failure
            };
            self.gate.record(op.verb(), class, Duration::from_millis(1));
            if ok { Ok(()) } else { Err("500".into()) }
        }
    }

    fn permission() -> Permission {
        Permission {
            op: ApiOp::CreateJob,
            namespace: "sandboxes".into(),
        }
    }

    struct Rig {
        gate: Arc<BreakerGate>,
        broker: Arc<InMemoryBroker>,
        health: Arc<Health>,
        probe: Arc<SwitchProbe>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn rig() -> Rig {
        let gate = Arc::new(BreakerGate::new(
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
        ));
        let broker = Arc::new(InMemoryBroker::default());
        let health = Arc::new(Health::new());
        health.set_broker_connected(true);
        let probe = Arc::new(SwitchProbe {
            gate: gate.clone(),
            creates_fail: AtomicBool::new(false),
            creates_forbidden: AtomicBool::new(false),
            calls: Mutex::default(),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_flow_control(
            gate.clone(),
            broker.clone(),
            health.clone(),
            probe.clone(),
            Duration::from_secs(10),
            stop.clone(),
        ));
        Rig {
            gate,
            broker,
            health,
            probe,
            stop,
            task,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failing_creates_pause_consumption_until_a_create_trial_succeeds() {
        let r = rig();
        r.probe.creates_fail.store(true, Ordering::SeqCst);
        // A burst of 500s on Job creation.
        for _ in 0..3 {
            r.gate.permit("create").unwrap();
            r.gate.record("create", CallClass::Failure, Duration::ZERO);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(r.health.readiness().is_err(), "not ready while open");
        r.broker.publish(StoredMessage::new(b"task".to_vec()));
        let none = tokio::time::timeout(Duration::from_secs(25), r.broker.next_delivery()).await;
        assert!(none.is_err(), "no delivery while the breaker is open");
        assert_eq!(r.broker.ready_len(), 1, "the task stays queued");
        assert!(
            r.probe.calls.lock().unwrap().is_empty(),
            "no probe during cooldown"
        );

        // Cooldown over: a dry-run create is tried (not a list, which works
        // and would prove nothing), fails, and the next cooldown is doubled.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(*r.probe.calls.lock().unwrap(), [ApiOp::CreateJob]);
        assert_eq!(r.gate.state(), BreakerState::Open);
        tokio::time::sleep(Duration::from_secs(58)).await;
        assert_eq!(
            r.probe.calls_of(ApiOp::CreateJob),
            1,
            "60 s until the second trial"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(r.probe.calls_of(ApiOp::CreateJob), 2);

        // Creates work again: the next trials close the breaker and the
        // backlog drains.
        r.probe.creates_fail.store(false, Ordering::SeqCst);
        let d = tokio::time::timeout(Duration::from_secs(200), r.broker.next_delivery())
            .await
            .expect("consumption resumed")
            .unwrap();
        assert_eq!(d.body(), b"task");
        assert_eq!(r.gate.state(), BreakerState::Closed);
        assert_eq!(
            r.gate.times_tripped(),
            1,
            "it never closed while creates failed"
        );
        assert_eq!(r.probe.calls_of(ApiOp::ListJobs), 0);
        assert!(r.health.readiness().is_ok());
        r.stop.cancel();
        r.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_denied_permission_pauses_and_names_itself_until_the_role_is_fixed() {
        let r = rig();
        r.probe.creates_forbidden.store(true, Ordering::SeqCst);
        // The executor's create came back 403.
        r.gate.denied(permission(), "jobs.batch is forbidden");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let why = r.health.readiness().unwrap_err().join("\n");
        assert!(
            why.contains("permission denied: create jobs.batch in namespace \"sandboxes\""),
            "{why}"
        );
        assert_eq!(
            r.gate.state(),
            BreakerState::Closed,
            "not the breaker's business"
        );
        r.broker.publish(StoredMessage::new(b"task".to_vec()));
        let none = tokio::time::timeout(Duration::from_secs(35), r.broker.next_delivery()).await;
        assert!(none.is_err(), "no delivery while create is forbidden");
        // Re-checked every 10 s with a dry-run create.
        assert_eq!(r.probe.calls_of(ApiOp::CreateJob), 3);

        // The Role is fixed: within one recheck the worker consumes again.
        r.probe.creates_forbidden.store(false, Ordering::SeqCst);
        let d = tokio::time::timeout(Duration::from_secs(11), r.broker.next_delivery())
            .await
            .expect("consumption resumed")
            .unwrap();
        assert_eq!(d.body(), b"task");
        assert!(r.health.readiness().is_ok());
        r.stop.cancel();
        r.task.await.unwrap();
    }
}
