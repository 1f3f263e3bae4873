//! The production [`Broker`]: RabbitMQ through `sandfleet-amqp`.
//!
//! - Consuming: an [`sandfleet_amqp::Consumer`] on the task queue with
//!   prefetch = the worker's concurrency. It resubscribes by itself after a
//!   channel or connection loss; the broker has already requeued what was
//!   unacked on the lost channel, and each such [`RabbitDelivery`]'s
//!   [`Delivery::lost`] token fires (its channel is watched) so the dispatch
//!   loop forgets it and leaves its Job for the redelivery to adopt.
//! - Pausing (breaker open, shutdown) cancels the consumer (`basic.cancel`)
//!   and releases what was prefetched but not yet taken; in-flight
//!   deliveries stay ackable. Resuming subscribes again.
//! - Releasing ("try again later") republishes a fresh copy of the message
//!   to the task queue, confirmed, then acks the delivery: a requeueing nack
//!   would count toward the quorum queue's `x-delivery-limit` on RabbitMQ
//!   3.10 and later, and "later" must never spend the delivery budget.
//! - Retries go to the delay queue of their tier through the default
//!   exchange, with the jittered delay as per-message `expiration`; the queue
//!   dead-letters them back to the task exchange.
//! - Dead letters are republished to `<prefix>.dead` with the reason headers,
//!   confirmed, then acked (a plain reject would lose the reason).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use backon::BackoffBuilder;
use sandfleet_amqp::lapin::Channel;
use sandfleet_amqp::lapin::options::BasicQosOptions;
use sandfleet_amqp::{
    Amqp, AmqpError, Consumer, ConsumerOptions, OutgoingMessage, Publisher, TASK_ROUTING_KEY,
    Topology,
};
use sandfleet_proto::{CONTENT_TYPE, TASK_MESSAGE_TYPE};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};

use crate::broker::{Broker, BrokerError, Delivery, RetryMessage};

/// How often a delivery's channel is checked for closure.
const CHANNEL_WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// The task queue on RabbitMQ.
pub struct RabbitBroker {
    amqp: Amqp,
    topology: Topology,
    publisher: Publisher,
    prefetch: u16,
    consumer: Mutex<Option<Consumer>>,
    paused: watch::Sender<bool>,
    connected: Arc<AtomicBool>,
    closed: CancellationToken,
    /// The settle barrier of the consumer's current channel.
    barrier: std::sync::Mutex<Option<Arc<SettleBarrier>>>,
}

impl std::fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitBroker")
            .field("queue", &self.topology.tasks_queue)
            .field("prefetch", &self.prefetch)
            .finish()
    }
}

fn broker_error(e: AmqpError) -> BrokerError {
    match e {
        AmqpError::DeliveryChannelClosed => BrokerError::DeliveryLost,
        other => BrokerError::Unavailable(other.to_string()),
    }
}

impl RabbitBroker {
    /// A broker on the task queue of `topology` (which must be applied);
    /// nothing is consumed until the first [`Broker::next_delivery`].
    pub fn new(amqp: Amqp, topology: Topology, publisher: Publisher, prefetch: u16) -> Self {
        RabbitBroker {
            amqp,
            topology,
            publisher,
            prefetch: prefetch.max(1),
            consumer: Mutex::new(None),
            paused: watch::channel(false).0,
            connected: Arc::new(AtomicBool::new(false)),
            closed: CancellationToken::new(),
            barrier: std::sync::Mutex::new(None),
        }
    }

    /// The settle barrier for deliveries of `channel`: one per channel, new
    /// when the consumer moved to another channel.
    fn barrier_for(&self, channel: &Channel) -> Arc<SettleBarrier> {
        let mut slot = self.barrier.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(b) if b.channel.id() == channel.id() && b.channel.status().connected() => {
                b.clone()
            }
            _ => {
                let b = Arc::new(SettleBarrier::new(channel.clone(), self.prefetch));
                *slot = Some(b.clone());
                b
            }
        }
    }

    /// The topology's names.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    fn wrap(&self, inner: sandfleet_amqp::Delivery) -> RabbitDelivery {
        let lost = CancellationToken::new();
        let settled = CancellationToken::new();
        let channel = inner.channel().clone();
        let (lost2, settled2) = (lost.clone(), settled.clone());
        // Watches the delivery's channel until it is settled: when the
        // channel dies the broker requeues the message, so the work on it
        // must be forgotten (not settled on another channel).
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = settled2.cancelled() => return,
                    _ = tokio::time::sleep(CHANNEL_WATCH_INTERVAL) => {}
                }
                if !channel.status().connected() {
                    lost2.cancel();
                    return;
                }
            }
        });
        RabbitDelivery {
            tasks_queue: self.topology.tasks_queue.clone(),
            barrier: self.barrier_for(inner.channel()),
            attempt: inner.attempt().unwrap_or(1).max(1),
            inner,
            publisher: self.publisher.clone(),
            dead_exchange: self.topology.dead_exchange.clone(),
            lost,
            _settled: settled.drop_guard(),
        }
    }

    /// Cancels the consumer and releases what it prefetched but nobody took
    /// (a fresh copy each, so pausing spends no delivery budget either).
    async fn stop_consumer(&self, consumer: Consumer) {
        consumer.cancel();
        let mut consumer = consumer;
        while let Ok(Some(d)) =
            tokio::time::timeout(Duration::from_millis(50), consumer.next_delivery()).await
        {
            if let Err(e) = d
                .requeue_fresh(&self.publisher, &self.topology.tasks_queue)
                .await
            {
                // Unsettled, it goes back when its channel closes.
                debug!(error = %e, "release of a prefetched delivery");
            }
        }
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    type Delivery = RabbitDelivery;

    async fn next_delivery(&self) -> Result<RabbitDelivery, BrokerError> {
        // The same jittered exponential backoff (backon) as every reconnect,
        // so a fleet that lost its broker does not resubscribe in lockstep.
        let mut delays = self.amqp.reconnect_backoff().without_max_times().build();
        loop {
            let mut paused = self.paused.subscribe();
            tokio::select! {
                _ = self.closed.cancelled() => return Err(BrokerError::Closed),
                ok = async { paused.wait_for(|p| !*p).await.is_ok() } => if !ok { return Err(BrokerError::Closed) },
            }
            // Only `next_delivery` and `pause`/`close` take this lock, and
            // they never hold it across a wait on each other.
            let mut slot = self.consumer.lock().await;
            if slot.is_none() {
                // Prefetched messages go back as fresh copies when the
                // consumer stops: pausing spends no delivery budget.
                let opts = ConsumerOptions::new(self.topology.tasks_queue.clone(), self.prefetch)
                    .tag("sandfleet-worker")
                    .release_with(self.publisher.clone());
                match Consumer::start(&self.amqp, opts).await {
                    Ok(c) => {
                        *slot = Some(c);
                        self.connected.store(true, Ordering::Relaxed);
                        delays = self.amqp.reconnect_backoff().without_max_times().build();
                    }
                    Err(e) => {
                        drop(slot);
                        self.connected.store(false, Ordering::Relaxed);
                        let delay = delays.next().unwrap_or(Duration::from_secs(1));
                        warn!(error = %e, ?delay, "cannot consume the task queue; retrying");
                        tokio::select! {
                            _ = self.closed.cancelled() => return Err(BrokerError::Closed),
                            _ = tokio::time::sleep(delay) => {}
                        }
                        continue;
                    }
                }
            }
            let Some(consumer) = slot.as_mut() else {
                continue;
            };
            tokio::select! {
                // mpsc receive: cancel-safe.
                d = consumer.next_delivery() => match d {
                    Some(d) => {
                        self.connected.store(consumer.is_connected(), Ordering::Relaxed);
                        return Ok(self.wrap(d));
                    }
                    None => {
                        *slot = None;
                    }
                },
                ok = async { paused.wait_for(|p| *p).await.is_ok() } => {
                    if !ok { return Err(BrokerError::Closed) }
                    if let Some(c) = slot.take() {
                        self.stop_consumer(c).await;
                    }
                }
                _ = self.closed.cancelled() => return Err(BrokerError::Closed),
            }
        }
    }

    async fn publish_retry(&self, msg: RetryMessage) -> Result<(), BrokerError> {
        let (exchange, routing_key) = match self.topology.retry_tier_for(msg.tier) {
            Some(tier) if !msg.tier.is_zero() => (String::new(), tier.queue.clone()),
            _ => (
                self.topology.tasks_exchange.clone(),
                TASK_ROUTING_KEY.to_owned(),
            ),
        };
        let mut m = OutgoingMessage::new(exchange, routing_key, msg.body)
            .message_id(msg.task_id.to_string())
            .kind(TASK_MESSAGE_TYPE)
            .content_type(CONTENT_TYPE)
            .correlation_id(msg.task_id.to_string())
            .attempt(msg.attempt)
            .traceparent(msg.traceparent.as_deref());
        if !msg.tier.is_zero() {
            m = m.expiration(msg.delay);
        }
        self.publisher
            .publish(&m)
            .await
            .map_err(|e| BrokerError::Publish(e.to_string()))
    }

    async fn pause(&self) -> Result<(), BrokerError> {
        self.paused.send_replace(true);
        // Returns once the consumer is stopped: a `next_delivery` holding the
        // lock sees the flag, stops the consumer and lets go of the lock
        // (it does not take it again while paused). So when `pause` returns,
        // nothing more is delivered and the prefetched messages are back.
        let mut slot = self.consumer.lock().await;
        if let Some(c) = slot.take() {
            self.stop_consumer(c).await;
        }
        Ok(())
    }

    async fn resume(&self) -> Result<(), BrokerError> {
        self.paused.send_replace(false);
        Ok(())
    }

    async fn queue_depth(&self) -> Result<u64, BrokerError> {
        match self.amqp.queue_depth(&self.topology.tasks_queue).await {
            Ok(n) => Ok(u64::from(n)),
            Err(e) => {
                self.connected.store(false, Ordering::Relaxed);
                Err(broker_error(e))
            }
        }
    }

    fn queue_name(&self) -> String {
        self.topology.tasks_queue.clone()
    }

    fn delivery_limit(&self) -> Option<u32> {
        Some(self.topology.settings().delivery_limit)
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    async fn close(&self) -> Result<(), BrokerError> {
        self.paused.send_replace(true);
        self.closed.cancel();
        let mut slot = self.consumer.lock().await;
        if let Some(c) = slot.take() {
            self.stop_consumer(c).await;
        }
        Ok(())
    }
}

/// A task delivery from RabbitMQ.
pub struct RabbitDelivery {
    inner: sandfleet_amqp::Delivery,
    tasks_queue: String,
    barrier: Arc<SettleBarrier>,
    attempt: u32,
    publisher: Publisher,
    dead_exchange: String,
    lost: CancellationToken,
    // Stops the channel watcher once the delivery is settled or dropped.
    _settled: DropGuard,
}

impl std::fmt::Debug for RabbitDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitDelivery")
            .field("inner", &self.inner)
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl RabbitDelivery {
    /// Returns once the broker has processed this delivery's settlement
    /// ([`SettleBarrier`]).
    async fn confirm_settled(&self) -> Result<(), BrokerError> {
        self.barrier.confirm().await
    }
}

/// Proves that settlements written to one channel reached the broker.
///
/// `basic.ack` has no reply: written to a socket that dies a moment later
/// it may never reach the broker, which then redelivers. A synchronous round
/// trip on the same channel afterwards proves it arrived, since the broker
/// handles a channel's frames in order (a `basic.qos` with the prefetch
/// already in force changes nothing). Only then may the worker delete the
/// attempt's finished sandbox; otherwise the delivery counts as lost and its
/// redelivery adopts the sandbox.
///
/// One round trip proves every settlement written before it was sent, so
/// concurrent settlements share one (group commit): each takes a ticket once
/// its own frame is written, and a round trip covers the tickets taken
/// before it started. At most one round trip is in flight per channel; the
/// ones waiting meanwhile are covered by the next. Under load that is one
/// round trip per broker RTT instead of one per task.
struct SettleBarrier {
    channel: Channel,
    prefetch: u16,
    /// Tickets handed out and tickets proven, in that order of locking.
    tickets: std::sync::Mutex<(u64, u64)>,
    /// Held by the one task whose round trip is in flight.
    sender: Mutex<()>,
}

impl SettleBarrier {
    fn new(channel: Channel, prefetch: u16) -> Self {
        SettleBarrier {
            channel,
            prefetch,
            tickets: std::sync::Mutex::new((0, 0)),
            sender: Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, u64)> {
        self.tickets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called after the caller's settlement frame was written: returns once
    /// a round trip sent after it has come back.
    async fn confirm(&self) -> Result<(), BrokerError> {
        let ticket = {
            let mut t = self.lock();
            t.0 += 1;
            t.0
        };
        loop {
            let _sending = self.sender.lock().await;
            let covers = {
                let t = self.lock();
                if t.1 >= ticket {
                    return Ok(());
                }
                t.0
            };
            // Every ticket up to `covers` was taken after its frame was
            // written, so before this round trip is.
            self.channel
                .basic_qos(self.prefetch, BasicQosOptions::default())
                .await
                .map_err(|_| BrokerError::DeliveryLost)?;
            let mut t = self.lock();
            t.1 = t.1.max(covers);
        }
    }
}

/// The channel-wide prefetch of a delivery's channel.
struct RabbitChannelLimit(sandfleet_amqp::lapin::Channel);

#[async_trait]
impl crate::broker::ChannelLimit for RabbitChannelLimit {
    async fn set(&self, unacked: u16) -> Result<(), BrokerError> {
        // `global: true` is channel-wide on RabbitMQ and applies at once;
        // the consumer's own prefetch (global false) stays the upper bound.
        self.0
            .basic_qos(unacked.max(1), BasicQosOptions { global: true })
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))
    }

    fn is_open(&self) -> bool {
        self.0.status().connected()
    }
}

#[async_trait]
impl Delivery for RabbitDelivery {
    fn channel_limit(&self) -> Option<Arc<dyn crate::broker::ChannelLimit>> {
        Some(Arc::new(RabbitChannelLimit(self.inner.channel().clone())))
    }

    fn body(&self) -> &[u8] {
        self.inner.body()
    }

    fn attempt(&self) -> u32 {
        self.attempt
    }

    fn traceparent(&self) -> Option<&str> {
        self.inner.traceparent()
    }

    fn redelivered(&self) -> bool {
        self.inner.redelivered()
    }

    fn delivery_count(&self) -> u32 {
        self.inner.returns()
    }

    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    async fn ack(self) -> Result<(), BrokerError> {
        self.inner.ack().await.map_err(broker_error)?;
        self.confirm_settled().await
    }

    async fn dead_letter(self, code: &str, reason: &str) -> Result<(), BrokerError> {
        self.inner
            .dead_letter(&self.publisher, &self.dead_exchange, code, reason)
            .await
            .map_err(broker_error)?;
        self.confirm_settled().await
    }

    async fn release(self) -> Result<(), BrokerError> {
        match self
            .inner
            .requeue_fresh(&self.publisher, &self.tasks_queue)
            .await
        {
            Ok(()) => self.confirm_settled().await,
            Err(AmqpError::DeliveryChannelClosed) => Err(BrokerError::DeliveryLost),
            Err(e) => {
                // The copy was refused (queue full under `reject-publish`,
                // broker trouble) and the delivery is still ours: a requeueing
                // nack spends one unit of the delivery budget, but strands
                // nothing.
                warn!(error = %e, "could not release by republishing; requeueing instead");
                self.inner.nack(true).await.map_err(broker_error)
            }
        }
    }
}
