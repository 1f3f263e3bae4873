//! The Kubernetes side of the worker: the breaker-gated executor, the probe
//! that closes the breaker again, and the orphan-Job garbage collector.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams};
use sandfleet_sandbox::{ApiGate, ApiRetry, CallClass, KubeApi, KubeExecutor};
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

/// The breaker probe: lists Jobs with `limit=1` through the gate, the
/// cheapest call that proves the API answers.
pub struct ListProbe {
    jobs: Api<Job>,
    gate: Arc<BreakerGate>,
}

impl ListProbe {
    /// A probe on `api`'s namespace through `gate`.
    pub fn new(api: &KubeApi, gate: Arc<BreakerGate>) -> Self {
        ListProbe {
            jobs: Api::namespaced(api.client().clone(), api.namespace()),
            gate,
        }
    }
}

#[async_trait]
impl Probe for ListProbe {
    async fn probe(&self) -> Result<(), String> {
        self.gate.permit().map_err(|e| e.to_string())?;
        let start = Instant::now();
        let r = self.jobs.list(&ListParams::default().limit(1)).await;
        let class = match &r {
            Ok(_) => CallClass::Success,
            Err(kube::Error::Api(status)) => CallClass::from_status(status.code, None),
            // Connection refused, timeouts, broken bodies: the API's fault.
            Err(_) => CallClass::Failure,
        };
        self.gate.record("list", class, start.elapsed());
        r.map(|_| ()).map_err(|e| e.to_string())
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
    let executor = KubeExecutor::new(api.clone(), k.clone()).keep_finished_jobs(true);
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
        Arc::new(ListProbe::new(&api, gate)),
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
    };
    dispatch(broker, choice, sink, config, metrics, health, shutdown).await
}
