//! The Kubernetes side of the worker: the breaker-gated executor, the probe
//! that closes the breaker (and clears a denied permission) again, and the
//! orphan-Job garbage collector.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sandfleet_sandbox::gate::ApiOp;
use sandfleet_sandbox::{ApiGate, ApiRetry, KubeApi, KubeExecutor};
use sandfleet_settings::Settings;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::app::{ExecutorChoice, WorkerError, dispatch};
use crate::breaker::BreakerConfig;
use crate::broker::Broker;
use crate::dispatch::DispatchConfig;
use crate::flow::{Probe, run_flow_control};
use crate::gate::BreakerGate;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::sink::ResultSink;

/// The flow controller's probe: one harmless call of an operation through
/// the gate ([`KubeApi::probe`]: a dry-run create, a one-item list, a read
/// of a missing object).
pub struct ApiProbe {
    api: KubeApi,
}

impl ApiProbe {
    /// A probe of `api` (its gate and namespace).
    pub fn new(api: &KubeApi) -> Self {
        ApiProbe { api: api.clone() }
    }
}

#[async_trait]
impl Probe for ApiProbe {
    async fn probe(&self, op: ApiOp) -> Result<(), String> {
        self.api.probe(op).await.map_err(|e| e.to_string())
    }
}

/// Deletes orphaned sandfleet Jobs every `every` until `stop`.
pub async fn collect_garbage(executor: KubeExecutor, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match executor.collect_garbage().await {
            Ok(deleted) if !deleted.is_empty() => {
                info!(?deleted, "garbage-collected orphaned jobs")
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "orphan job collection failed"),
        }
    }
}

/// Runs the dispatch loop with the Kubernetes executor behind the circuit
/// breaker, the flow controller and the garbage collector.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_kubernetes<B: Broker, S: ResultSink>(
    settings: &Settings,
    broker: Arc<B>,
    sink: S,
    config: DispatchConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    background: &CancellationToken,
    cancels: Arc<crate::cancel::Cancels>,
) -> Result<(), WorkerError> {
    let k = &settings.sandbox.kubernetes;
    let gate = Arc::new(BreakerGate::new(
        BreakerConfig::from(&settings.breaker),
        metrics.clone(),
    ));
    let api = KubeApi::infer(
        k,
        gate.clone() as Arc<dyn ApiGate>,
        ApiRetry::from(&settings.retry),
    )
    .await?;
    // Finished Jobs stay until the delivery is settled, then the dispatch
    // loop deletes them: a crash between the result and the ack leaves the
    // finished Job for the redelivery to adopt instead of re-running it.
    // Under Kueue, a suspended Job is given up in time for the task to
    // still fit in the broker's consumer timeout.
    let executor = KubeExecutor::new(api.clone(), k.clone())
        .keep_finished_jobs(true)
        .hold_deliveries_for(Duration::from_secs(
            settings.limits.broker_consumer_timeout_secs,
        ));
    info!(namespace = api.namespace(), worker = %config.worker, "worker running with the kubernetes executor");
    health.set_executor_syncing(true);
    {
        let (executor, health, stop) = (executor.clone(), health.clone(), background.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = executor.synced() => health.set_executor_syncing(false),
            }
        });
    }
    tokio::spawn(run_flow_control(
        gate.clone(),
        broker.clone(),
        health.clone(),
        Arc::new(ApiProbe::new(&api)),
        // A fixed Role is noticed within one breaker cooldown.
        Duration::from_secs(settings.breaker.cooldown_secs.max(1)),
        background.clone(),
    ));
    tokio::spawn(collect_garbage(
        executor.clone(),
        Duration::from_secs(k.gc_interval_secs.max(1)),
        background.clone(),
    ));
    let choice = ExecutorChoice {
        executor: Arc::new(executor),
        delete_after_settle: true,
        cancels,
    };
    dispatch(broker, choice, sink, config, metrics, health, shutdown).await
}
