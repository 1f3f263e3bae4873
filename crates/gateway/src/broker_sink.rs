//! [`BrokerSink`]: the production [`TaskSink`], publishing to RabbitMQ with
//! publisher confirms. The CLI also uses it for `enqueue` and `replay`.

use crate::sink::{SinkError, TaskSink};
use async_trait::async_trait;
use sandfleet_amqp::{Amqp, OutgoingMessage, Publisher, TASK_ROUTING_KEY, Topology};
use sandfleet_proto::{CONTENT_TYPE, Limits, TASK_MESSAGE_TYPE, Task};

/// Publishes validated tasks to `<prefix>.tasks` (routing key `task`) as
/// persistent, mandatory messages with `message_id` = task id, `type`
/// `sandfleet.task.v1`, `x-sandfleet-attempt: 1` and `x-idempotency-key`, and
/// waits for the broker's confirm. An unroutable message (topology missing)
/// or a nack (queue full) is an error, never a silent drop.
#[derive(Debug)]
pub struct BrokerSink {
    amqp: Amqp,
    publisher: Publisher,
    exchange: String,
    limits: Limits,
}

impl BrokerSink {
    /// A sink on an open connection pool.
    pub async fn new(
        amqp: &Amqp,
        topology: &Topology,
        limits: Limits,
    ) -> Result<BrokerSink, sandfleet_amqp::AmqpError> {
        Ok(BrokerSink {
            amqp: amqp.clone(),
            publisher: Publisher::new(amqp).await?,
            exchange: topology.tasks_exchange.clone(),
            limits,
        })
    }
}

#[async_trait]
impl TaskSink for BrokerSink {
    async fn enqueue(&self, task: &Task) -> Result<(), SinkError> {
        sandfleet_proto::validate(task, &self.limits)
            .map_err(|e| SinkError::Invalid(e.to_string()))?;
        let body = serde_json::to_vec(task).map_err(|e| SinkError::Invalid(e.to_string()))?;
        if body.len() > self.limits.max_message_bytes {
            return Err(SinkError::Invalid(format!(
                "task is {} bytes; limits.max_message_bytes is {}",
                body.len(),
                self.limits.max_message_bytes
            )));
        }
        let msg = OutgoingMessage::new(self.exchange.as_str(), TASK_ROUTING_KEY, body)
            .message_id(task.id.to_string())
            .kind(TASK_MESSAGE_TYPE)
            .content_type(CONTENT_TYPE)
            .attempt(1)
            .idempotency_key(task.idempotency_key.clone());
        // Every publish failure is the broker's side (down, full, topology
        // missing): the caller may retry once it is fixed.
        self.publisher
            .publish(&msg)
            .await
            .map_err(|e| SinkError::Unavailable(e.to_string()))
    }

    async fn is_ready(&self) -> bool {
        self.amqp.channel().await.is_ok()
    }
}
