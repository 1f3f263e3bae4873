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
        match self.producer.enqueue_with(task, &options).await {
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
