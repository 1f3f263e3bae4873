//! The consumer: a stream of [`Delivery`]s that survives connection loss.
//!
//! [`Consumer::start`] subscribes once (so a missing queue is reported at
//! once), then a pump task forwards deliveries. When the channel or the
//! connection drops, the broker requeues every unacked delivery; the pump
//! reopens a channel with jittered backoff and subscribes again, and the
//! requeued messages come back with `redelivered = true`. Deliveries received
//! before the loss can no longer be acknowledged
//! ([`AmqpError::DeliveryChannelClosed`]).
//!
//! For stream queues ([`ConsumerOptions::stream_offset`]) the pump resumes
//! after the last offset it delivered, not from the original offset.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use backon::BackoffBuilder;
use futures::{Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{REPLY_NOT_FOUND, reply_code};
use crate::message::{
    HEADER_ATTEMPT, HEADER_IDEMPOTENCY_KEY, HEADER_REJECT_CODE, HEADER_REJECT_REASON,
    HEADER_TRACEPARENT, header_i64, header_str,
};
use crate::{Amqp, AmqpError, OutgoingMessage, Publisher};

/// Header on a message released by [`Delivery::requeue_fresh`]: the returns
/// (`x-delivery-count`) its earlier copies had accumulated.
pub const HEADER_RETURNS: &str = "x-sandfleet-returns";

/// Where a stream-queue consumer starts (`x-stream-offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOffset {
    /// The first message still retained.
    First,
    /// The last chunk written (its messages, then everything after).
    Last,
    /// Only messages published after the subscription.
    Next,
    /// A numeric offset.
    Offset(u64),
    /// Messages from this time on (seconds since the epoch; chunk resolution).
    Timestamp(i64),
}

impl StreamOffset {
    fn argument(self) -> AMQPValue {
        match self {
            StreamOffset::First => AMQPValue::LongString("first".into()),
            StreamOffset::Last => AMQPValue::LongString("last".into()),
            StreamOffset::Next => AMQPValue::LongString("next".into()),
            StreamOffset::Offset(o) => AMQPValue::LongLongInt(o as i64),
            StreamOffset::Timestamp(t) => AMQPValue::Timestamp(t.max(0) as u64),
        }
    }
}

/// What to consume and how.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// The queue.
    pub queue: String,
    /// Prefetch: unacknowledged deliveries the broker sends ahead (≥ 1).
    pub prefetch: u16,
    /// Consumer tag prefix (the broker's UI shows it); a unique suffix is added.
    pub tag: String,
    /// For stream queues: where to start.
    pub stream_offset: Option<StreamOffset>,
    /// Further `basic.consume` arguments.
    pub arguments: FieldTable,
    /// Hands prefetched messages back on [`Consumer::cancel`] as fresh copies
    /// ([`Delivery::requeue_fresh`]) through this publisher instead of with a
    /// requeueing nack, which a quorum queue counts toward its delivery limit.
    pub release_with: Option<Publisher>,
}

impl ConsumerOptions {
    /// Consume `queue` with `prefetch` unacked deliveries at most.
    pub fn new(queue: impl Into<String>, prefetch: u16) -> ConsumerOptions {
        ConsumerOptions {
            queue: queue.into(),
            prefetch: prefetch.max(1),
            tag: "sandfleet".to_owned(),
            stream_offset: None,
            arguments: FieldTable::default(),
            release_with: None,
        }
    }

    /// Give prefetched messages back as fresh copies published with
    /// `publisher` (see [`ConsumerOptions::release_with`]).
    pub fn release_with(mut self, publisher: Publisher) -> ConsumerOptions {
        self.release_with = Some(publisher);
        self
    }

    /// Start a stream-queue consumer at `offset`.
    pub fn stream_offset(mut self, offset: StreamOffset) -> ConsumerOptions {
        self.stream_offset = Some(offset);
        self
    }

    /// Sets the consumer tag prefix.
    pub fn tag(mut self, tag: impl Into<String>) -> ConsumerOptions {
        self.tag = tag.into();
        self
    }
}

/// A stream of deliveries; reconnects by itself. Dropping it stops consuming
/// (deliveries already handed out stay ackable while their channel lives).
pub struct Consumer {
    rx: mpsc::Receiver<Delivery>,
    stop: CancellationToken,
    connected: Arc<AtomicBool>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Consumer {
    /// Subscribes to `options.queue`. Errors (missing queue, access refused,
    /// broker down) are returned; later losses are recovered in the background.
    pub async fn start(amqp: &Amqp, options: ConsumerOptions) -> Result<Consumer, AmqpError> {
        let (channel, lapin_consumer) = subscribe(amqp, &options, None).await?;
        // A hand-over buffer of one: prefetched messages wait in lapin's
        // buffer, from where a cancel can give them back to the broker.
        let (tx, rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let connected = Arc::new(AtomicBool::new(true));
        tokio::spawn(pump(
            amqp.clone(),
            options,
            channel,
            lapin_consumer,
            tx,
            stop.clone(),
            connected.clone(),
        ));
        Ok(Consumer {
            rx,
            stop,
            connected,
        })
    }

    /// The next delivery; `None` once [`cancel`](Consumer::cancel)led and drained.
    pub async fn next_delivery(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// True while subscribed on a live channel (for readiness).
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Stops receiving new deliveries (`basic.cancel`); prefetched messages
    /// not yet handed over are requeued at once, so other consumers get
    /// them. Deliveries already handed over stay ackable; those still in the
    /// hand-over buffer are yielded by [`next_delivery`](Consumer::next_delivery)
    /// (then `None`): settle them (e.g. `nack(true)` to give them back).
    pub fn cancel(&self) {
        self.stop.cancel();
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Stream for Consumer {
    type Item = Delivery;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.rx.poll_recv(cx)
    }
}

async fn subscribe(
    amqp: &Amqp,
    options: &ConsumerOptions,
    resume_after: Option<u64>,
) -> Result<(Channel, lapin::Consumer), AmqpError> {
    let channel = amqp.channel().await?;
    channel
        .basic_qos(options.prefetch.max(1), BasicQosOptions::default())
        .await
        .map_err(|e| AmqpError::broker("basic.qos", e))?;
    let mut args = options.arguments.clone();
    let offset = match (resume_after, options.stream_offset) {
        (Some(last), Some(_)) => Some(StreamOffset::Offset(last + 1)),
        (_, o) => o,
    };
    if let Some(o) = offset {
        args.insert("x-stream-offset".into(), o.argument());
    }
    let tag = format!("{}-{}", options.tag, uuid::Uuid::new_v4().simple());
    let consumer = channel
        .basic_consume(
            options.queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .map_err(|e| {
            if reply_code(&e) == Some(REPLY_NOT_FOUND) {
                AmqpError::NotFound {
                    kind: "queue",
                    name: options.queue.clone(),
                }
            } else {
                AmqpError::broker("basic.consume", e)
            }
        })?;
    Ok((channel, consumer))
}

async fn pump(
    amqp: Amqp,
    options: ConsumerOptions,
    mut channel: Channel,
    mut consumer: lapin::Consumer,
    tx: mpsc::Sender<Delivery>,
    stop: CancellationToken,
    connected: Arc<AtomicBool>,
) {
    let mut last_offset: Option<u64> = None;
    loop {
        let item = tokio::select! {
            _ = stop.cancelled() => {
                stop_consuming(&channel, &mut consumer, &options).await;
                break;
            }
            item = consumer.next() => item,
        };
        match item {
            Some(Ok(d)) => {
                if let Some(o) = header_i64(d.properties.headers().as_ref(), "x-stream-offset") {
                    last_offset = Some(o as u64);
                }
                let delivery = Delivery {
                    inner: d,
                    channel: channel.clone(),
                };
                // Wait for room in the hand-over buffer, but not past a
                // cancel: a consumer paused by its owner (e.g. the worker's
                // breaker opened) must give its prefetched work back at once
                // so healthy consumers get it.
                tokio::select! {
                    permit = tx.reserve() => match permit {
                        Ok(permit) => permit.send(delivery),
                        Err(_) => {
                            give_back(&delivery, &options).await;
                            stop_consuming(&channel, &mut consumer, &options).await;
                            break;
                        }
                    },
                    _ = stop.cancelled() => {
                        give_back(&delivery, &options).await;
                        stop_consuming(&channel, &mut consumer, &options).await;
                        break;
                    }
                }
            }
            other => {
                connected.store(false, Ordering::Relaxed);
                match other {
                    Some(Err(e)) => {
                        tracing::warn!(queue = %options.queue, error = %e, "consumer lost its channel; resubscribing")
                    }
                    _ => {
                        tracing::warn!(queue = %options.queue, "consumer cancelled by the broker; resubscribing")
                    }
                }
                let mut delays = amqp.reconnect_backoff().without_max_times().build();
                loop {
                    let delay = delays.next().unwrap_or(std::time::Duration::from_secs(1));
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    match subscribe(&amqp, &options, last_offset).await {
                        Ok((c, s)) => {
                            channel = c;
                            consumer = s;
                            connected.store(true, Ordering::Relaxed);
                            tracing::info!(queue = %options.queue, "consumer resubscribed");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(queue = %options.queue, error = %e, ?delay, "resubscribe failed")
                        }
                    }
                }
            }
        }
    }
    connected.store(false, Ordering::Relaxed);
}

/// Gives a delivery that was not handed over back to the broker: as a fresh
/// copy when the options name a publisher, else with a requeueing nack. A
/// stream queue keeps every message whatever its readers do and answers a
/// nack or reject by closing the connection (`NOT_IMPLEMENTED - basic.nack
/// and basic.reject not supported by stream queues`): there, it is left alone.
async fn give_back(delivery: &Delivery, options: &ConsumerOptions) {
    if options.stream_offset.is_some() {
        return;
    }
    if let Some(publisher) = &options.release_with
        && delivery
            .requeue_fresh(publisher, &options.queue)
            .await
            .is_ok()
    {
        return;
    }
    let _ = delivery.nack(true).await;
}

/// Cancels the subscription (`basic.cancel`) and returns (requeues) what
/// the broker already sent but was not handed over yet. On a stream queue
/// nothing is returned (see [`give_back`]): closing the channel ends the
/// subscription and drops what was sent ahead.
async fn stop_consuming(
    channel: &Channel,
    consumer: &mut lapin::Consumer,
    options: &ConsumerOptions,
) {
    if options.stream_offset.is_some() {
        let _ = channel.close(200, "OK".into()).await;
        return;
    }
    let _ = channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    // After cancel-ok the stream yields what is buffered, then ends; bound
    // the wait in case the channel is already gone.
    let drain = async {
        while let Some(Ok(d)) = consumer.next().await {
            let delivery = Delivery {
                inner: d,
                channel: channel.clone(),
            };
            give_back(&delivery, options).await;
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
}

/// One message received from a queue. Settle it exactly once with
/// [`ack`](Delivery::ack), [`reject`](Delivery::reject) (to the dead-letter
/// exchange), [`nack`](Delivery::nack), [`dead_letter`](Delivery::dead_letter)
/// or [`forward`](Delivery::forward). An unsettled delivery is requeued by the
/// broker when its channel closes.
pub struct Delivery {
    inner: lapin::message::Delivery,
    // Keeps the channel open while the delivery may still be settled.
    channel: Channel,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("routing_key", &self.inner.routing_key)
            .field("message_id", &self.message_id())
            .field("redelivered", &self.inner.redelivered)
            .field("bytes", &self.inner.data.len())
            .finish()
    }
}

impl Delivery {
    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.inner.data
    }
    /// All AMQP properties.
    pub fn properties(&self) -> &BasicProperties {
        &self.inner.properties
    }
    /// The headers table, if any.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.inner.properties.headers().as_ref()
    }
    /// A string header.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        header_str(self.headers(), name)
    }
    /// An integer header (any AMQP integer type).
    pub fn header_i64(&self, name: &str) -> Option<i64> {
        header_i64(self.headers(), name)
    }
    /// True when the broker delivered this message before (to any consumer).
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }
    /// The exchange it was published to.
    pub fn exchange(&self) -> &str {
        self.inner.exchange.as_str()
    }
    /// Its routing key.
    pub fn routing_key(&self) -> &str {
        self.inner.routing_key.as_str()
    }
    /// `message_id`.
    pub fn message_id(&self) -> Option<&str> {
        self.inner
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
    }
    /// `x-sandfleet-attempt`.
    pub fn attempt(&self) -> Option<u32> {
        self.header_i64(HEADER_ATTEMPT)
            .and_then(|a| u32::try_from(a).ok())
    }
    /// `x-idempotency-key`.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.header_str(HEADER_IDEMPOTENCY_KEY)
    }
    /// `traceparent`.
    pub fn traceparent(&self) -> Option<&str> {
        self.header_str(HEADER_TRACEPARENT)
    }
    /// Quorum queues: how often the broker delivered it before (`x-delivery-count`).
    pub fn delivery_count(&self) -> Option<i64> {
        self.header_i64("x-delivery-count")
    }
    /// Stream queues: the message's offset.
    pub fn stream_offset(&self) -> Option<u64> {
        self.header_i64("x-stream-offset").map(|o| o as u64)
    }

    /// Acknowledges: the broker forgets the message.
    pub async fn ack(&self) -> Result<(), AmqpError> {
        settled(
            self.inner.acker.ack(BasicAckOptions::default()).await,
            "basic.ack",
        )
    }
    /// Rejects without requeue: the queue dead-letters it (to `<prefix>.dead`
    /// for the task queue). Counts toward the delivery limit.
    pub async fn reject(&self) -> Result<(), AmqpError> {
        settled(
            self.inner
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await,
            "basic.reject",
        )
    }
    /// Negative ack; `requeue` puts it back at the head of the queue. A
    /// quorum queue counts a requeue toward `x-delivery-limit` (measured on
    /// RabbitMQ 3.10: `x-delivery-count` goes 0, 1, 2, ... with each
    /// requeueing nack), so "try again later" must use
    /// [`requeue_fresh`](Delivery::requeue_fresh) instead.
    pub async fn nack(&self, requeue: bool) -> Result<(), AmqpError> {
        settled(
            self.inner
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue,
                })
                .await,
            "basic.nack",
        )
    }

    /// A copy of this message (body, properties, headers) addressed to
    /// `exchange`/`routing_key`, to republish.
    pub fn to_outgoing(&self, exchange: &str, routing_key: &str) -> OutgoingMessage {
        let p = &self.inner.properties;
        let s = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|x| x.to_string());
        let mut m = OutgoingMessage::new(exchange, routing_key, self.inner.data.clone());
        m.message_id = s(p.message_id());
        m.kind = s(p.kind());
        m.content_type = s(p.content_type());
        m.correlation_id = s(p.correlation_id());
        m.timestamp = p
            .timestamp()
            .and_then(|t| chrono::DateTime::from_timestamp(t as i64, 0));
        // Keep the headers (x-death included: the broker maintains it), but
        // not the per-delivery ones the broker sets, which would be stale,
        // nor the returns count: only `requeue_fresh` carries it on (a dead
        // letter an operator requeues starts with a fresh budget).
        let mut headers = FieldTable::default();
        for (k, v) in p
            .headers()
            .as_ref()
            .map(|h| h.inner().iter())
            .into_iter()
            .flatten()
        {
            if !matches!(
                k.as_str(),
                "x-delivery-count" | "x-stream-offset" | HEADER_RETURNS
            ) {
                headers.insert(k.clone(), v.clone());
            }
        }
        m.headers = headers;
        m.persistent = p.delivery_mode().is_none_or(|d| d == 2);
        m
    }

    /// Publishes `message` (confirmed), then acks this delivery. If the
    /// publish fails the delivery is left unsettled and the error returned,
    /// so nothing is lost. Used for the retry ladder (publish the next attempt
    /// to a delay queue, then ack).
    pub async fn forward(
        &self,
        publisher: &Publisher,
        message: &OutgoingMessage,
    ) -> Result<(), AmqpError> {
        publisher.publish(message).await?;
        self.ack().await
    }

    /// Hands the message back to `queue` without spending its delivery
    /// budget: publishes a copy (body, properties, headers: attempt, message
    /// id, traceparent) to `queue` through the default exchange, waits for the
    /// confirm, then acks this delivery. The copy is a new message, so the
    /// broker's `x-delivery-count` starts again from zero on every RabbitMQ
    /// version, whatever it counts as a failed delivery.
    ///
    /// At least once: if the process dies between the confirm and the ack,
    /// the broker redelivers the original too and the message exists twice;
    /// both carry the same task and attempt, so the second adopts the first's
    /// sandbox by its deterministic name.
    ///
    /// The copy carries the returns counted so far in [`HEADER_RETURNS`], so
    /// [`returns`](Delivery::returns) keeps counting crashes across releases
    /// (a release itself adds nothing).
    pub async fn requeue_fresh(&self, publisher: &Publisher, queue: &str) -> Result<(), AmqpError> {
        // A delivery whose channel is gone is back in the queue already: a
        // copy now would be a second message for the same work.
        if !self.channel.status().connected() {
            return Err(AmqpError::DeliveryChannelClosed);
        }
        let mut m = self.to_outgoing("", queue);
        m.headers.insert(
            HEADER_RETURNS.into(),
            AMQPValue::LongLongInt(i64::from(self.returns())),
        );
        self.forward(publisher, &m).await
    }

    /// Times this message went back to its queue unsettled (a consumer died
    /// or its channel closed while holding it): the broker's
    /// `x-delivery-count` plus what earlier copies counted
    /// ([`requeue_fresh`](Delivery::requeue_fresh)).
    pub fn returns(&self) -> u32 {
        let count = |v: Option<i64>| v.and_then(|c| u32::try_from(c).ok()).unwrap_or(0);
        count(self.delivery_count()).saturating_add(count(self.header_i64(HEADER_RETURNS)))
    }

    /// Dead-letters this delivery *with a reason*: publishes a copy to
    /// `exchange` (the dead-letter exchange) with the
    /// `x-sandfleet-reject-reason` and `x-sandfleet-reject-code` headers, waits
    /// for the confirm, then acks. A plain [`reject`](Delivery::reject) would
    /// dead-letter too, but without saying why.
    pub async fn dead_letter(
        &self,
        publisher: &Publisher,
        exchange: &str,
        code: &str,
        reason: &str,
    ) -> Result<(), AmqpError> {
        let mut m = self.to_outgoing(exchange, self.routing_key());
        m.headers.insert(
            HEADER_REJECT_REASON.into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        m.headers.insert(
            HEADER_REJECT_CODE.into(),
            AMQPValue::LongString(LongString::from(code)),
        );
        self.forward(publisher, &m).await
    }

    /// The channel this delivery came on.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

fn settled(r: lapin::Result<bool>, op: &'static str) -> Result<(), AmqpError> {
    match r {
        Ok(true) => Ok(()),
        // lapin: the acker was already used, or its channel closed (poisoned).
        Ok(false) => Err(AmqpError::DeliveryChannelClosed),
        Err(e) => Err(AmqpError::broker(op, e)),
    }
}
