//! The broker behind one trait (design decision 6).
//!
//! A [`Broker`] is the task queue as the dispatch loop sees it: a stream of
//! [`Delivery`]s ([`Broker::next_delivery`]), each settled exactly once by
//! [`Delivery::ack`], [`Delivery::dead_letter`] or [`Delivery::release`]; the
//! retry ladder ([`Broker::publish_retry`]); flow control
//! ([`Broker::pause`]/[`Broker::resume`], used while the circuit breaker is
//! open); and the queue depth for metrics.
//!
//! Two implementations: [`crate::memory::InMemoryBroker`] (tests and the
//! one-process demo) and [`crate::rabbit::RabbitBroker`] (production).

use std::time::Duration;

use std::sync::Arc;

use async_trait::async_trait;
use futures::Stream;
use sandfleet_proto::TaskId;
use tokio_util::sync::CancellationToken;

/// AMQP header carrying the attempt number of a task message.
pub const ATTEMPT_HEADER: &str = "x-sandfleet-attempt";
/// AMQP header carrying W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Header on a dead-lettered message: why it was dead-lettered, for humans.
pub const REJECT_REASON_HEADER: &str = "x-sandfleet-reject-reason";
/// Header on a dead-lettered message: a short machine code for the reason.
pub const REJECT_CODE_HEADER: &str = "x-sandfleet-reject-code";

/// Why a broker operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The connection to the broker is down (or not up yet); the broker
    /// reconnects on its own.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The channel this delivery came on closed; the broker has requeued the
    /// message and will redeliver it, so it must be forgotten, not settled.
    #[error("delivery lost: its channel closed and the broker requeues it")]
    DeliveryLost,
    /// A publish was refused (nack, unroutable return, or a timeout waiting
    /// for the confirm).
    #[error("publish not confirmed: {0}")]
    Publish(String),
    /// The broker was shut down.
    #[error("broker closed")]
    Closed,
}

impl BrokerError {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        !matches!(self, BrokerError::Closed)
    }
}

/// A task to put on the retry ladder as a new attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryMessage {
    /// The task's id (the message id).
    pub task_id: TaskId,
    /// The task message body, unchanged.
    pub body: Vec<u8>,
    /// The attempt the republished task carries.
    pub attempt: u32,
    /// How long it waits before it is back on the task queue.
    pub delay: Duration,
    /// The delay queue it waits in.
    pub tier: Duration,
    /// Trace context to carry along.
    pub traceparent: Option<String>,
}

/// The task queue as the dispatch loop sees it.
///
/// Implementations must make [`Broker::next_delivery`] cancel-safe: dropping
/// the future before it resolves loses no message.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// One received message.
    type Delivery: Delivery;

    /// Waits for the next delivery. While paused, or while the connection is
    /// down, it waits; it returns [`BrokerError::Closed`] once the broker is
    /// shut down.
    async fn next_delivery(&self) -> Result<Self::Delivery, BrokerError>;

    /// Publishes a task to the retry ladder (confirmed).
    async fn publish_retry(&self, msg: RetryMessage) -> Result<(), BrokerError>;

    /// Stops receiving new deliveries; deliveries already received stay valid.
    async fn pause(&self) -> Result<(), BrokerError>;

    /// Starts receiving again after [`Broker::pause`].
    async fn resume(&self) -> Result<(), BrokerError>;

    /// Messages ready in the task queue.
    async fn queue_depth(&self) -> Result<u64, BrokerError>;

    /// Name of the task queue, for the metrics label.
    fn queue_name(&self) -> String;

    /// The task queue's delivery limit (`x-delivery-limit`), when it has one:
    /// a delivery whose [`Delivery::delivery_count`] has reached it is the
    /// last one the broker hands out before dead-lettering it on its own.
    fn delivery_limit(&self) -> Option<u32>;

    /// True while connected to the broker (readiness).
    fn is_connected(&self) -> bool;

    /// Stops consuming and hands every unsettled delivery back to the broker
    /// (closing the channel requeues them). Used at the end of a drain.
    async fn close(&self) -> Result<(), BrokerError>;
}

/// The bound on unacknowledged deliveries of the channel a delivery came on
/// (RabbitMQ's channel-wide `basic.qos`). The fair broker keeps it at the
/// tasks it runs from that shard plus a small buffer, so no worker hoards a
/// shard's messages that another worker could choose.
#[async_trait]
pub trait ChannelLimit: Send + Sync + 'static {
    /// Sets the bound.
    async fn set(&self, unacked: u16) -> Result<(), BrokerError>;
    /// True while the channel is open (a new channel needs the bound again).
    fn is_open(&self) -> bool;
}

/// One received task message, to be settled exactly once.
#[async_trait]
pub trait Delivery: Send + Sync + 'static {
    /// The bound on unacknowledged deliveries of this delivery's channel,
    /// where the broker has one.
    fn channel_limit(&self) -> Option<Arc<dyn ChannelLimit>> {
        None
    }

    /// The message body.
    fn body(&self) -> &[u8];

    /// The attempt number from [`ATTEMPT_HEADER`]; 1 when absent or unreadable.
    fn attempt(&self) -> u32;

    /// The [`TRACEPARENT_HEADER`] value, if any.
    fn traceparent(&self) -> Option<&str>;

    /// True when the broker delivered this message before (a worker died or
    /// a channel closed holding it).
    fn redelivered(&self) -> bool;

    /// How often the broker handed this message out before without it being
    /// settled (a worker died or a channel closed holding it): RabbitMQ's
    /// `x-delivery-count`, 0 when absent. Releases do not count.
    fn delivery_count(&self) -> u32;

    /// Cancelled when the delivery is lost (its channel or connection
    /// closed): the broker has requeued it, so the worker stops working on it
    /// and forgets it, leaving its sandbox for the redelivery to adopt.
    fn lost(&self) -> CancellationToken;

    /// Acknowledges: the broker forgets the message. `Ok` means the broker
    /// has processed the ack (not merely that it was sent), so the worker may
    /// clean up after the attempt; an error means the message may come back.
    async fn ack(self) -> Result<(), BrokerError>;

    /// Sends the message to the dead-letter queue with a reason
    /// ([`REJECT_CODE_HEADER`], [`REJECT_REASON_HEADER`]).
    async fn dead_letter(self, code: &str, reason: &str) -> Result<(), BrokerError>;

    /// Hands the message back for redelivery ("try again later") without
    /// spending its delivery budget (design decision 13): the message goes
    /// back to the task queue as a fresh copy with the same body, attempt and
    /// trace context, and this delivery is settled. A requeueing nack would
    /// not do: a quorum queue counts it toward `x-delivery-limit`.
    async fn release(self) -> Result<(), BrokerError>;
}

/// The broker's deliveries as a [`Stream`], ending when the broker is closed
/// (for callers that prefer combinators to [`Broker::next_delivery`]).
/// Transient errors are yielded and the stream goes on.
pub fn deliveries<B: Broker>(
    broker: Arc<B>,
) -> impl Stream<Item = Result<B::Delivery, BrokerError>> {
    futures::stream::unfold(broker, |broker| async move {
        match broker.next_delivery().await {
            Err(BrokerError::Closed) => None,
            other => Some((other, broker)),
        }
    })
}
