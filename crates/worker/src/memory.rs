//! A first-party in-memory [`Broker`]: the dispatch loop's component tests and
//! the one-process `sandfleet demo` run on it. It is a real queue, not a mock:
//! ready messages, unacked tracking per "channel", redelivery when a channel
//! closes, a delivery limit counted as a RabbitMQ quorum queue counts it
//! (every return to the queue), releases that republish a fresh copy (so they
//! never count, as [`crate::rabbit`] does), a dead-letter queue with reasons,
//! and delayed retries on tokio time (so paused-time tests work).
//! It is never the production path: nothing survives the process.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use sandfleet_proto::Task;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, Delivery, RetryMessage};

/// The reason code the broker itself uses when a message exceeds its delivery
/// limit (RabbitMQ's `x-last-death-reason`).
pub const DELIVERY_LIMIT_CODE: &str = "delivery_limit";

/// A message as the in-memory broker stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Body bytes.
    pub body: Vec<u8>,
    /// The attempt header (absent → 1 on delivery).
    pub attempt: Option<u32>,
    /// The traceparent header.
    pub traceparent: Option<String>,
    /// True once delivered before.
    pub redelivered: bool,
    /// Times delivered and returned to the queue (crash, channel loss), as
    /// RabbitMQ's `x-delivery-count`; compared with the limit.
    pub delivery_count: u32,
}

impl StoredMessage {
    /// A fresh message.
    pub fn new(body: Vec<u8>) -> Self {
        StoredMessage {
            body,
            attempt: None,
            traceparent: None,
            redelivered: false,
            delivery_count: 0,
        }
    }
}

/// A message in the dead-letter queue, with why it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message.
    pub message: StoredMessage,
    /// Short machine code (`malformed_json`, `max_attempts`, `delivery_limit`).
    pub code: String,
    /// Human-readable reason.
    pub reason: String,
}

#[derive(Debug)]
struct Unacked {
    message: StoredMessage,
    channel: u64,
    lost: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    ready: VecDeque<StoredMessage>,
    unacked: HashMap<u64, Unacked>,
    dead: Vec<DeadLetter>,
    /// Retries waiting out their delay.
    delayed: usize,
    next_tag: u64,
    /// The current channel; closing it returns its unacked messages.
    channel: u64,
    paused: bool,
    closed: bool,
    published: u64,
    acked: u64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Notify,
    delivery_limit: Option<u32>,
    name: String,
}

/// An in-memory task queue with a dead-letter queue and a retry ladder.
/// Cheap to clone; clones share the queue.
#[derive(Debug, Clone)]
pub struct InMemoryBroker {
    shared: Arc<Shared>,
}

impl Default for InMemoryBroker {
    fn default() -> Self {
        InMemoryBroker::new(None)
    }
}

impl InMemoryBroker {
    /// An empty broker. With `delivery_limit`, a message returned more than
    /// that many times (crash, channel loss) is dead-lettered with code
    /// [`DELIVERY_LIMIT_CODE`], as a RabbitMQ quorum queue does: the delivery
    /// whose count equals the limit is the last one.
    pub fn new(delivery_limit: Option<u32>) -> Self {
        InMemoryBroker {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                delivery_limit,
                name: "memory.tasks".to_owned(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }

    /// Publishes a message to the task queue.
    pub fn publish(&self, message: StoredMessage) {
        push_ready(&self.shared, message);
    }

    /// Publishes a task as JSON, attempt 1.
    pub fn publish_task(&self, task: &Task) -> Result<(), serde_json::Error> {
        let body = serde_json::to_vec(task)?;
        self.publish(StoredMessage::new(body));
        Ok(())
    }

    /// Closes the current channel as a crashed consumer or a lost connection
    /// would: every unacked delivery is returned to the queue (redelivered,
    /// its delivery count incremented) and its [`Delivery::lost`] token fires.
    pub fn close_channel(&self) {
        let mut st = self.state();
        let channel = st.channel;
        st.channel += 1;
        // Pausing is the consumer's state; the next channel starts consuming.
        st.paused = false;
        let tags: Vec<u64> = st
            .unacked
            .iter()
            .filter(|(_, u)| u.channel == channel)
            .map(|(t, _)| *t)
            .collect();
        let mut tags = tags;
        tags.sort_unstable();
        // Requeued messages go back to the head, in their original order.
        for tag in tags.into_iter().rev() {
            if let Some(u) = st.unacked.remove(&tag) {
                u.lost.cancel();
                requeue(&mut st, self.shared.delivery_limit, u.message, true);
            }
        }
        drop(st);
        self.shared.changed.notify_waiters();
    }

    /// Messages ready for delivery.
    pub fn ready_len(&self) -> usize {
        self.state().ready.len()
    }

    /// Deliveries handed out and not yet settled.
    pub fn unacked_len(&self) -> usize {
        self.state().unacked.len()
    }

    /// Retries waiting out their delay.
    pub fn delayed_len(&self) -> usize {
        self.state().delayed
    }

    /// Messages acked so far.
    pub fn acked_count(&self) -> u64 {
        self.state().acked
    }

    /// Messages published (including retries) so far.
    pub fn published_count(&self) -> u64 {
        self.state().published
    }

    /// The dead-letter queue's contents.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.state().dead.clone()
    }

    /// True when nothing is ready, unacked or waiting to be retried.
    pub fn is_idle(&self) -> bool {
        let st = self.state();
        st.ready.is_empty() && st.unacked.is_empty() && st.delayed == 0
    }

    /// Stops the broker: pending and future `next_delivery` calls return
    /// [`BrokerError::Closed`].
    pub fn shutdown(&self) {
        self.state().closed = true;
        self.shared.changed.notify_waiters();
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A poisoned lock only means another thread panicked mid-update of plain
    // collections; the data is still usable for a test queue.
    shared
        .state
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
}

fn push_ready(shared: &Shared, message: StoredMessage) {
    let mut st = lock(shared);
    st.published += 1;
    st.ready.push_back(message);
    drop(st);
    shared.changed.notify_waiters();
}

fn requeue(st: &mut State, limit: Option<u32>, mut message: StoredMessage, front: bool) {
    message.redelivered = true;
    message.delivery_count += 1;
    // RabbitMQ's quorum queue (rabbit_fifo) dead-letters on the return that
    // takes the count past the limit.
    if limit.is_some_and(|l| message.delivery_count > l) {
        st.dead.push(DeadLetter {
            message,
            code: DELIVERY_LIMIT_CODE.to_owned(),
            reason: "delivery limit exceeded (the message was returned too often)".to_owned(),
        });
    } else if front {
        st.ready.push_front(message);
    } else {
        st.ready.push_back(message);
    }
}

/// A delivery from [`InMemoryBroker`].
#[derive(Debug)]
pub struct MemoryDelivery {
    shared: Arc<Shared>,
    tag: u64,
    message: StoredMessage,
    lost: CancellationToken,
}

impl MemoryDelivery {
    fn settle(&self) -> Result<StoredMessage, BrokerError> {
        let mut st = lock(&self.shared);
        match st.unacked.remove(&self.tag) {
            Some(u) => Ok(u.message),
            None => Err(BrokerError::DeliveryLost),
        }
    }
}

#[async_trait]
impl Broker for InMemoryBroker {
    type Delivery = MemoryDelivery;

    async fn next_delivery(&self) -> Result<MemoryDelivery, BrokerError> {
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            // Register interest before looking, so a publish between the look
            // and the await is not missed.
            notified.as_mut().enable();
            {
                let mut st = self.state();
                if st.closed {
                    return Err(BrokerError::Closed);
                }
                if !st.paused
                    && let Some(message) = st.ready.pop_front()
                {
                    st.next_tag += 1;
                    let tag = st.next_tag;
                    let lost = CancellationToken::new();
                    let channel = st.channel;
                    st.unacked.insert(
                        tag,
                        Unacked {
                            message: message.clone(),
                            channel,
                            lost: lost.clone(),
                        },
                    );
                    return Ok(MemoryDelivery {
                        shared: self.shared.clone(),
                        tag,
                        message,
                        lost,
                    });
                }
            }
            notified.await;
        }
    }

    async fn publish_retry(&self, msg: RetryMessage) -> Result<(), BrokerError> {
        let message = StoredMessage {
            body: msg.body,
            attempt: Some(msg.attempt),
            traceparent: msg.traceparent,
            redelivered: false,
            delivery_count: 0,
        };
        self.state().delayed += 1;
        let shared = self.shared.clone();
        // The delay queue: the message is invisible until its expiration,
        // then dead-lettered back onto the task queue.
        tokio::spawn(async move {
            tokio::time::sleep(msg.delay).await;
            lock(&shared).delayed -= 1;
            push_ready(&shared, message);
        });
        Ok(())
    }

    async fn pause(&self) -> Result<(), BrokerError> {
        self.state().paused = true;
        Ok(())
    }

    async fn resume(&self) -> Result<(), BrokerError> {
        self.state().paused = false;
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn queue_depth(&self) -> Result<u64, BrokerError> {
        Ok(self.state().ready.len() as u64)
    }

    fn queue_name(&self) -> String {
        self.shared.name.clone()
    }

    fn delivery_limit(&self) -> Option<u32> {
        self.shared.delivery_limit
    }

    fn is_connected(&self) -> bool {
        !self.state().closed
    }

    async fn close(&self) -> Result<(), BrokerError> {
        self.close_channel();
        Ok(())
    }
}

#[async_trait]
impl Delivery for MemoryDelivery {
    fn body(&self) -> &[u8] {
        &self.message.body
    }

    fn attempt(&self) -> u32 {
        self.message.attempt.unwrap_or(1).max(1)
    }

    fn traceparent(&self) -> Option<&str> {
        self.message.traceparent.as_deref()
    }

    fn redelivered(&self) -> bool {
        self.message.redelivered
    }

    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    async fn ack(self) -> Result<(), BrokerError> {
        self.settle()?;
        lock(&self.shared).acked += 1;
        Ok(())
    }

    async fn dead_letter(self, code: &str, reason: &str) -> Result<(), BrokerError> {
        let message = self.settle()?;
        lock(&self.shared).dead.push(DeadLetter {
            message,
            code: code.to_owned(),
            reason: reason.to_owned(),
        });
        Ok(())
    }

    fn delivery_count(&self) -> u32 {
        self.message.delivery_count
    }

    async fn release(self) -> Result<(), BrokerError> {
        let message = self.settle()?;
        // As the RabbitMQ broker does: a fresh copy at the back of the queue
        // (same body, attempt and trace context) that keeps the returns
        // counted so far, so a release never spends the delivery budget.
        push_ready(
            &self.shared,
            StoredMessage {
                redelivered: false,
                ..message
            },
        );
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    const TEST_TIMEOUT: Duration = Duration::from_secs(5);

    fn msg(s: &str) -> StoredMessage {
        StoredMessage::new(s.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn delivers_in_order_and_ack_removes() {
        let b = InMemoryBroker::default();
        b.publish(msg("a"));
        b.publish(msg("b"));
        let d1 = b.next_delivery().await.unwrap();
        let d2 = b.next_delivery().await.unwrap();
        assert_eq!(d1.body(), b"a");
        assert_eq!(d2.body(), b"b");
        assert_eq!(d1.attempt(), 1);
        assert_eq!(b.unacked_len(), 2);
        d1.ack().await.unwrap();
        d2.ack().await.unwrap();
        assert!(b.is_idle());
        assert_eq!(b.acked_count(), 2);
    }

    #[tokio::test]
    async fn closing_the_channel_redelivers_and_marks_the_old_delivery_lost() {
        let b = InMemoryBroker::default();
        b.publish(msg("a"));
        let d = b.next_delivery().await.unwrap();
        let lost = d.lost();
        b.close_channel();
        assert!(lost.is_cancelled());
        let again = b.next_delivery().await.unwrap();
        assert!(again.redelivered());
        assert_eq!(again.body(), b"a");
        // The old delivery can no longer be settled.
        assert!(matches!(d.ack().await, Err(BrokerError::DeliveryLost)));
        again.ack().await.unwrap();
        assert!(b.is_idle());
    }

    #[tokio::test]
    async fn delivery_limit_dead_letters_a_crash_looping_message() {
        let b = InMemoryBroker::new(Some(3));
        b.publish(msg("poison"));
        // Deliveries with counts 0, 1, 2, 3: the fourth is the last allowed.
        for count in 0..4 {
            let d = b.next_delivery().await.unwrap();
            assert_eq!(d.delivery_count(), count);
            b.close_channel();
        }
        assert_eq!(b.ready_len(), 0);
        let dead = b.dead_letters();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].code, DELIVERY_LIMIT_CODE);
        assert_eq!(dead[0].message.body, b"poison");
    }

    #[tokio::test]
    async fn dead_letter_keeps_the_reason_and_release_redelivers() {
        let b = InMemoryBroker::default();
        b.publish(msg("x"));
        b.publish(msg("y"));
        let x = b.next_delivery().await.unwrap();
        x.dead_letter("malformed_json", "expected value at line 1")
            .await
            .unwrap();
        let y = b.next_delivery().await.unwrap();
        y.release().await.unwrap();
        let y2 = b.next_delivery().await.unwrap();
        assert_eq!(y2.body(), b"y");
        assert_eq!(b.dead_letters()[0].reason, "expected value at line 1");
    }

    #[tokio::test]
    async fn releases_never_spend_the_delivery_budget() {
        let b = InMemoryBroker::new(Some(2));
        let mut m = msg("later");
        m.attempt = Some(3);
        m.traceparent = Some("00-t".into());
        b.publish(m);
        // Far more releases than the limit allows returns.
        for _ in 0..10 {
            let d = b.next_delivery().await.unwrap();
            assert_eq!(d.delivery_count(), 0);
            assert_eq!((d.attempt(), d.traceparent()), (3, Some("00-t")));
            d.release().await.unwrap();
        }
        assert!(b.dead_letters().is_empty());
        assert_eq!(b.ready_len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_wait_out_their_delay() {
        let b = InMemoryBroker::default();
        b.publish_retry(RetryMessage {
            task_id: uuid::Uuid::nil(),
            body: b"t".to_vec(),
            attempt: 2,
            delay: Duration::from_secs(10),
            tier: Duration::from_secs(10),
            traceparent: Some("00-abc".into()),
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(b.ready_len(), 0);
        assert_eq!(b.delayed_len(), 1);
        let start = tokio::time::Instant::now();
        let d = b.next_delivery().await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(1));
        assert_eq!(d.attempt(), 2);
        assert_eq!(d.traceparent(), Some("00-abc"));
    }

    #[tokio::test]
    async fn deliveries_form_a_stream_that_ends_with_the_broker() {
        use futures::StreamExt;
        let b = Arc::new(InMemoryBroker::default());
        b.publish(msg("a"));
        b.publish(msg("b"));
        let stream = crate::broker::deliveries(b.clone());
        tokio::pin!(stream);
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.body(), b"a");
        first.ack().await.unwrap();
        let second = stream.next().await.unwrap().unwrap();
        assert_eq!(second.body(), b"b");
        b.shutdown();
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn pause_holds_messages_until_resume() {
        let b = InMemoryBroker::default();
        b.pause().await.unwrap();
        b.publish(msg("a"));
        let waiting = tokio::time::timeout(Duration::from_millis(50), b.next_delivery()).await;
        assert!(waiting.is_err(), "no delivery while paused");
        assert_eq!(b.queue_depth().await.unwrap(), 1);
        b.resume().await.unwrap();
        let d = tokio::time::timeout(TEST_TIMEOUT, b.next_delivery())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.body(), b"a");
    }
}
