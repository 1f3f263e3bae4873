//! [`BrokerSink`]: the production [`TaskSink`], the confirmed RabbitMQ
//! producer (`sandfleet-producer`). The CLI also uses it for `enqueue` and
//! `replay`.

use async_trait::async_trait;
use sandfleet_amqp::{Amqp, Topology};
use sandfleet_producer::{EnqueueError, EnqueueOptions, Producer, ProducerError};
use sandfleet_proto::{Limits, Task};

use crate::sink::{SinkError, TaskSink};

/// Publishes validated tasks to `<prefix>.tasks` through [`Producer`]
/// (message id = task id, `x-idempotency-key`, attempt 1, persistent,
/// mandatory) and waits for the broker's confirm. The current span's trace
/// context travels in the `traceparent` header. An unroutable message
/// (topology missing) or a nack (queue full) is an error, never a silent drop.
pub struct BrokerSink {
    producer: Producer,
}

impl std::fmt::Debug for BrokerSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSink")
            .field("amqp", self.producer.amqp())
            .finish()
    }
}

impl BrokerSink {
    /// A sink on an open connection pool; the topology must already exist
    /// (`sandfleet topology apply`, or the worker declares it).
    pub async fn new(
        amqp: &Amqp,
        topology: &Topology,
        limits: Limits,
    ) -> Result<BrokerSink, ProducerError> {
        Ok(BrokerSink {
            producer: Producer::with_amqp(amqp, topology.clone(), limits, false).await?,
        })
    }

    /// The producer underneath.
    pub fn producer(&self) -> &Producer {
        &self.producer
    }
}

#[async_trait]
impl TaskSink for BrokerSink {
    async fn enqueue(&self, task: &Task) -> Result<(), SinkError> {
        let options = EnqueueOptions {
            traceparent: sandfleet_telemetry::inject_traceparent(&tracing::Span::current()),
        };
        // A task with a supersede key cancels the older ones with that key.
        match self.producer.enqueue_superseding_with(task, &options).await {
            Ok(_) => Ok(()),
            Err(EnqueueError::Invalid(errors)) => Err(SinkError::Invalid(errors.to_string())),
            Err(e @ (EnqueueError::TooLarge { .. } | EnqueueError::Encode(_))) => {
                Err(SinkError::Invalid(e.to_string()))
            }
            // Every broker-side failure (down, full, topology missing) may be
            // fixed on that side: the caller retries later.
            Err(e @ EnqueueError::Broker(_)) => Err(SinkError::Unavailable(e.to_string())),
        }
    }

    async fn cancel(
        &self,
        task_id: sandfleet_proto::TaskId,
        by: &str,
        reason: &str,
    ) -> Result<crate::sink::CancelAnswer, SinkError> {
        use crate::sink::CancelAnswer;
        use sandfleet_producer::{CancelError, CancelStatus};
        match self.producer.cancel(task_id, by, reason).await {
            Ok(CancelStatus::Recorded { cancel_id }) => Ok(CancelAnswer::Recorded(cancel_id)),
            Ok(CancelStatus::AlreadyFinished { outcome }) => {
                Ok(CancelAnswer::AlreadyFinished(outcome))
            }
            Err(e @ CancelError::Unknown { .. }) => Ok(CancelAnswer::Unknown(e.to_string())),
            Err(e @ CancelError::Invalid(_)) => Err(SinkError::Invalid(e.to_string())),
            Err(e) => Err(SinkError::Unavailable(e.to_string())),
        }
    }

    async fn is_ready(&self) -> bool {
        // A channel open proves a live connection; close it again so
        // readiness probes do not pile up channels.
        match self.producer.amqp().channel().await {
            Ok(channel) => {
                let _ = channel.close(200, "OK".into()).await;
                true
            }
            Err(_) => false,
        }
    }
}

/// A [`TaskSink`] whose broker connection is made in the background, so the
/// gateway listens (and answers `/healthz`) while RabbitMQ is still down at
/// start-up: until connected, `/readyz` and every enqueue answer 503. Once
/// connected, the pool reconnects by itself after later losses.
pub struct ConnectingSink {
    sink: tokio::sync::OnceCell<BrokerSink>,
}

impl std::fmt::Debug for ConnectingSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectingSink")
            .field("connected", &self.sink.initialized())
            .finish()
    }
}

impl ConnectingSink {
    /// Starts connecting (component name `gateway`), retrying transient
    /// failures with doubling delays up to `amqp.reconnect_max_delay_secs`,
    /// until connected or `shutdown` fires. A permanent failure (bad URL,
    /// refused credentials) is logged and retried at the longest delay, since
    /// the process has nothing else to do.
    pub fn connect_in_background(
        amqp: sandfleet_settings::AmqpSettings,
        topology: Topology,
        limits: Limits,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> std::sync::Arc<ConnectingSink> {
        let this = std::sync::Arc::new(ConnectingSink {
            sink: tokio::sync::OnceCell::new(),
        });
        let weak = std::sync::Arc::downgrade(&this);
        tokio::spawn(async move {
            let max = std::time::Duration::from_secs(amqp.reconnect_max_delay_secs.max(1));
            let mut delay = std::time::Duration::from_millis(250);
            // A broker that stays away (wrong credentials) is reported once per interval.
            let mut outage = sandfleet_amqp::OutageLog::default();
            loop {
                let attempt = async {
                    let conn = Amqp::connect(&amqp, "gateway")
                        .await
                        .map_err(|e| e.to_string())?;
                    BrokerSink::new(&conn, &topology, limits.clone())
                        .await
                        .map_err(|e| e.to_string())
                };
                match attempt.await {
                    Ok(sink) => {
                        if let Some(this) = weak.upgrade() {
                            let _ = this.sink.set(sink);
                            tracing::info!("gateway connected to RabbitMQ");
                        }
                        return;
                    }
                    Err(e) => {
                        if let Some(line) = outage.failed(&e, std::time::Instant::now()) {
                            tracing::warn!(error = %e, ?delay, failed_attempts = line.attempts, "RabbitMQ unavailable; the gateway answers 503 until it connects{}", line.suffix())
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(max);
            }
        });
        this
    }
}

#[async_trait]
impl TaskSink for ConnectingSink {
    async fn enqueue(&self, task: &Task) -> Result<(), SinkError> {
        match self.sink.get() {
            Some(sink) => sink.enqueue(task).await,
            None => Err(SinkError::Unavailable(
                "not connected to RabbitMQ yet".to_owned(),
            )),
        }
    }

    async fn cancel(
        &self,
        task_id: sandfleet_proto::TaskId,
        by: &str,
        reason: &str,
    ) -> Result<crate::sink::CancelAnswer, SinkError> {
        match self.sink.get() {
            Some(sink) => sink.cancel(task_id, by, reason).await,
            None => Err(SinkError::Unavailable(
                "not connected to RabbitMQ yet".to_owned(),
            )),
        }
    }

    async fn is_ready(&self) -> bool {
        match self.sink.get() {
            Some(sink) => sink.is_ready().await,
            None => false,
        }
    }
}
