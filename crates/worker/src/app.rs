//! [`run`]: the worker process, wired from [`Settings`].
//!
//! Start-up never panics and never gives up on the broker: the HTTP server
//! comes up first (so `/healthz` answers and `/readyz` says why the worker is
//! not ready), then the worker waits for RabbitMQ with capped, jittered
//! backoff, declares the topology, and starts consuming. Shutdown (the
//! `shutdown` token, cancelled by the CLI on SIGTERM/SIGINT) stops consuming,
//! drains in-flight tasks for `worker.drain_timeout_secs`, and hands what is
//! left back to the broker with its sandboxes still running.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use sandfleet_amqp::{Amqp, AmqpError, Publisher, Topology, TopologyError};
use sandfleet_results::ResultPublisher;
use sandfleet_sandbox::{ExecError, Executor, LocalExecutor};
use sandfleet_settings::{ExecutorKind, Settings};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::broker::Broker;
use crate::dispatch::{DispatchConfig, DispatchError, Dispatcher};
use crate::health::{self, Health};
use crate::metrics::Metrics;
use crate::rabbit::RabbitBroker;
use crate::retry::RetryConfig;
use crate::sink::{ResultSink, SinkError};

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A setting is unusable (bad URL, executor configuration).
    #[error("configuration: {0}")]
    Config(String),
    /// The health/metrics port could not be bound.
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        /// `worker.http_addr`.
        addr: String,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// The broker holds a conflicting topology (needs an operator).
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The executor could not be built.
    #[error("executor: {0}")]
    Executor(#[from] ExecError),
    /// The dispatch loop stopped.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
}

impl WorkerError {
    /// True when restarting the process may help (never for configuration).
    pub fn is_transient(&self) -> bool {
        match self {
            WorkerError::Config(_) | WorkerError::Executor(_) => false,
            WorkerError::Http { .. } => true,
            WorkerError::Topology(e) => e.is_transient(),
            WorkerError::Dispatch(e) => e.is_transient(),
        }
    }
}

#[async_trait::async_trait]
impl ResultSink for ResultPublisher {
    async fn publish(
        &self,
        result: &sandfleet_proto::TaskResult,
        traceparent: Option<&str>,
    ) -> Result<(), SinkError> {
        ResultPublisher::publish(self, result, traceparent)
            .await
            .map_err(|e| SinkError::new(e.to_string()))
    }
}

/// This worker's name: `worker.name`, else the host (pod) name.
pub fn worker_name(settings: &Settings) -> String {
    settings.worker.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "sandfleet-worker".to_owned())
    })
}

/// The dispatch settings from the worker's configuration.
pub fn dispatch_config(settings: &Settings) -> DispatchConfig {
    DispatchConfig {
        concurrency: usize::from(settings.worker.concurrency.max(1)),
        limits: settings.limits.clone(),
        consumer_timeout: Duration::from_secs(settings.limits.broker_consumer_timeout_secs),
        drain_timeout: Duration::from_secs(settings.worker.drain_timeout_secs),
        worker: worker_name(settings),
        retry: RetryConfig::new(&settings.retry, &settings.topology),
    }
}

/// Retries `op` while its error is transient, with the AMQP reconnect backoff
/// (capped, jittered), until it succeeds or `shutdown` fires (`Ok(None)`).
async fn until_up<T, E, F, Fut>(
    amqp: &Amqp,
    what: &str,
    shutdown: &CancellationToken,
    transient: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<Option<T>, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut delays = amqp.reconnect_backoff().without_max_times().build();
    // Wrong credentials retry forever: say so once per interval, not per attempt.
    let mut outage = sandfleet_amqp::OutageLog::default();
    loop {
        match op().await {
            Ok(v) => {
                if let Some(failed) = outage.recovered() {
                    info!(failed_attempts = failed, "{what}: broker reachable again");
                }
                return Ok(Some(v));
            }
            Err(e) if transient(&e) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(1));
                if let Some(line) = outage.failed(&e.to_string(), std::time::Instant::now()) {
                    warn!(error = %e, ?delay, failed_attempts = line.attempts, "{what}: broker unavailable; retrying{}", line.suffix());
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs the worker until `shutdown` is cancelled, then drains.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    // Not ready until the Kubernetes executor's watchers have synced; set
    // before `/readyz` is served, or it would answer 200 in the moment
    // between the broker connecting and the executor starting.
    if settings.worker.executor == ExecutorKind::Kubernetes {
        health.set_executor_syncing(true);
    }
    // Likewise until the cancellations stream has been read up to its tail
    // (the dispatch loop clears it when it starts taking tasks).
    health.set_cancels_syncing(true);
    let http_stop = CancellationToken::new();
    let (addr, http) = health::bind(
        &settings.worker.http_addr,
        health.clone(),
        metrics.clone(),
        http_stop.clone(),
    )
    .await
    .map_err(|source| WorkerError::Http {
        addr: settings.worker.http_addr.clone(),
        source,
    })?;
    info!(%addr, "serving /healthz, /readyz, /metrics");
    let result = run_with_http(&settings, metrics, health, shutdown).await;
    http_stop.cancel();
    let _ = http.await;
    result
}

async fn run_with_http(
    settings: &Settings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let amqp =
        Amqp::lazy(&settings.amqp, "worker").map_err(|e| WorkerError::Config(e.to_string()))?;
    let topology = Topology::new(&settings.topology);
    info!(endpoint = %amqp.endpoint(), connection = amqp.connection_name(), "connecting to RabbitMQ");
    let applied = until_up(
        &amqp,
        "declaring the topology",
        &shutdown,
        TopologyError::is_transient,
        || topology.apply(&amqp),
    )
    .await?;
    if applied.is_none() {
        return Ok(());
    }
    let Some(publisher) = until_up(
        &amqp,
        "opening the publisher",
        &shutdown,
        AmqpError::is_transient,
        || Publisher::new(&amqp),
    )
    .await
    .map_err(|e| WorkerError::Config(e.to_string()))?
    else {
        return Ok(());
    };
    health.set_broker_connected(true);
    let results = ResultPublisher::from_publisher(publisher.clone(), &topology);
    let config = dispatch_config(settings);
    let prefetch = u16::try_from(config.concurrency).unwrap_or(u16::MAX);
    let background = CancellationToken::new();
    // Every cancel on the stream, from its start: the dispatch loop takes
    // no task until the feed has read the stream up to its tail.
    let cancels = crate::cancel::Cancels::fed_from_stream();
    tokio::spawn(crate::cancel::run_feed(
        amqp.clone(),
        topology.clone(),
        publisher.clone(),
        cancels.clone(),
        config.worker.clone(),
        background.clone(),
    ));
    // With shards, a fair broker over the task queue and every shard
    // (`docs/fairness.md`); without, the one FIFO queue.
    let outcome = if topology.task_shards.is_empty() {
        let broker = Arc::new(RabbitBroker::new(
            amqp.clone(),
            topology,
            publisher,
            prefetch,
        ));
        serve(
            settings,
            broker,
            results,
            config,
            metrics,
            health,
            shutdown,
            &background,
            cancels,
        )
        .await
    } else {
        let broker = Arc::new(crate::fair::rabbit_shards(
            &amqp,
            &topology,
            &publisher,
            &settings.fairness,
            prefetch,
            metrics.clone(),
        ));
        serve(
            settings,
            broker,
            results,
            config,
            metrics,
            health,
            shutdown,
            &background,
            cancels,
        )
        .await
    };
    background.cancel();
    amqp.close();
    outcome
}

/// Runs the dispatch loop on `broker` with the configured executor.
#[allow(clippy::too_many_arguments)]
async fn serve<B: Broker>(
    settings: &Settings,
    broker: Arc<B>,
    results: ResultPublisher,
    config: DispatchConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    background: &CancellationToken,
    cancels: Arc<crate::cancel::Cancels>,
) -> Result<(), WorkerError> {
    tokio::spawn(poll_queue_depth(
        broker.clone(),
        metrics.clone(),
        health.clone(),
        Duration::from_secs(settings.worker.queue_depth_poll_secs.max(1)),
        background.clone(),
    ));

    match settings.worker.executor {
        ExecutorKind::Local => {
            let executor = Arc::new(LocalExecutor::new(settings.sandbox.local.clone())?);
            info!(worker = %config.worker, "worker running with the local executor");
            let choice = ExecutorChoice {
                executor,
                // A local sandbox dies with its worker; nothing to adopt.
                delete_after_settle: false,
                cancels,
            };
            dispatch(broker, choice, results, config, metrics, health, shutdown).await
        }
        ExecutorKind::Kubernetes => {
            crate::kube::run_kubernetes(
                settings, broker, results, config, metrics, health, shutdown, background, cancels,
            )
            .await
        }
    }
}

/// The executor a dispatch loop runs on, and whether it keeps finished
/// sandboxes for the worker to delete once a delivery is settled.
pub(crate) struct ExecutorChoice<E> {
    pub(crate) executor: Arc<E>,
    pub(crate) delete_after_settle: bool,
    pub(crate) cancels: Arc<crate::cancel::Cancels>,
}

pub(crate) async fn dispatch<B: Broker, E: Executor, S: ResultSink>(
    broker: Arc<B>,
    choice: ExecutorChoice<E>,
    sink: S,
    config: DispatchConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let report = Dispatcher::new(broker, choice.executor, sink, config, metrics, health)
        .delete_sandboxes_after_settle(choice.delete_after_settle)
        .with_cancels(choice.cancels)
        .run(shutdown)
        .await?;
    info!(
        released = report.released,
        "worker stopped; unfinished tasks were handed back with their sandboxes running"
    );
    Ok(())
}

/// Polls the task queue's depth for `sandfleet_queue_ready_messages`; a
/// failed poll marks the broker disconnected for `/readyz`.
pub async fn poll_queue_depth<B: Broker>(
    broker: Arc<B>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    every: Duration,
    stop: CancellationToken,
) {
    let queue = broker.queue_name();
    loop {
        match broker.queue_depth().await {
            Ok(depth) => {
                metrics.set_queue_depth(&queue, depth);
                health.set_broker_connected(true);
            }
            Err(e) => {
                health.set_broker_connected(false);
                error!(error = %e, "queue depth poll failed");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::memory::{InMemoryBroker, StoredMessage};

    #[tokio::test(start_paused = true)]
    async fn queue_depth_is_polled_into_the_gauge() {
        let broker = Arc::new(InMemoryBroker::default());
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new());
        let stop = CancellationToken::new();
        let poller = tokio::spawn(poll_queue_depth(
            broker.clone(),
            metrics.clone(),
            health.clone(),
            Duration::from_secs(10),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            metrics
                .encode()
                .contains("sandfleet_queue_ready_messages{queue=\"memory.tasks\"} 0")
        );
        assert!(
            health.readiness().is_ok(),
            "a successful poll means connected"
        );
        for _ in 0..3 {
            broker.publish(StoredMessage::new(b"t".to_vec()));
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            metrics
                .encode()
                .contains("sandfleet_queue_ready_messages{queue=\"memory.tasks\"} 3")
        );
        stop.cancel();
        poller.await.unwrap();
    }

    #[test]
    fn dispatch_settings_come_from_the_worker_sections() {
        let mut s = Settings::default();
        s.worker.concurrency = 0;
        s.worker.name = Some("w-7".into());
        s.limits.broker_consumer_timeout_secs = 7200;
        s.worker.drain_timeout_secs = 45;
        s.topology.retry_delays_secs = vec![60, 10];
        let c = dispatch_config(&s);
        assert_eq!(c.concurrency, 1, "at least one task at a time");
        assert_eq!(c.worker, "w-7");
        assert_eq!(c.consumer_timeout, Duration::from_secs(7200));
        assert_eq!(c.drain_timeout, Duration::from_secs(45));
        assert_eq!(
            c.retry.ladder,
            vec![Duration::from_secs(10), Duration::from_secs(60)]
        );
        assert!(!worker_name(&Settings::default()).is_empty());
    }
}
