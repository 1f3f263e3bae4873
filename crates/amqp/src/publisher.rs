//! The confirmed publisher: every publish ends in a broker ack, or in an error
//! the caller sees.
//!
//! One channel in confirm mode, pipelined: [`Publisher::send`] queues the
//! message's frames and returns a [`Confirm`] future at once, so many
//! publishes can be in flight (lapin's IO thread writes the queued frames of
//! many publishes in one go); a semaphore bounds them
//! (`amqp.max_outstanding_confirms`). A driver task per channel awaits each
//! message's write, then the broker's confirms in publish order, and settles
//! each [`Confirm`]:
//!
//! - ack, and no `basic.return` for the message → `Ok(())`;
//! - ack after a `basic.return` (unroutable, `mandatory`) → [`PublishError::Returned`];
//! - nack (e.g. the queue is full with `x-overflow: reject-publish`) → [`PublishError::Nacked`];
//! - the write failed, or the channel or connection died before the confirm →
//!   [`PublishError::Unconfirmed`]:
//!   the message may or may not have reached the queue; publish it again
//!   (consumers deduplicate).
//!
//! After a channel or connection loss the next publish opens a new channel
//! (jittered backoff, bounded wait) on a fresh pooled connection.
//!
//! Matching returns to messages: lapin hands a `basic.return` to whichever
//! confirm its ack frame resolves first, which under a `multiple` ack may be
//! another message of the same batch. So the driver collects the returned
//! messages from all confirms of a batch before it settles any of them, and
//! matches each to the oldest unsettled message with the same fingerprint
//! (exchange, routing key, `message_id`, body length). The broker returns
//! messages in publish order, and messages with the same fingerprint are
//! routed alike, so the match is exact. (A header carrying a sequence number
//! would be simpler, but the broker parses every header of every message:
//! it measurably cut the publish rate.)

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::Utc;
use futures::FutureExt;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, PublisherConfirm};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::error::lapin_is_transient;
use crate::{Amqp, AmqpError, OutgoingMessage};

/// Why a publish did not end in a clean broker ack.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker could not route the message to any queue (`basic.return`
    /// on a `mandatory` publish): a missing exchange binding or queue.
    #[error(
        "message {message_id:?} was returned by the broker as unroutable ({reply_code} {reply_text}); is the topology applied?"
    )]
    Returned {
        /// The message's `message_id`.
        message_id: Option<String>,
        /// AMQP reply code (312 NO_ROUTE).
        reply_code: u16,
        /// The broker's reply text.
        reply_text: String,
    },
    /// The broker refused responsibility for the message (`basic.nack`): a
    /// full queue with `x-overflow: reject-publish`, or an internal error.
    #[error(
        "message {message_id:?} was nacked by the broker (queue full with reject-publish, or broker error)"
    )]
    Nacked {
        /// The message's `message_id`.
        message_id: Option<String>,
    },
    /// The channel or connection was lost before the broker confirmed the
    /// message. It may or may not be in the queue; publishing again is safe
    /// for consumers that deduplicate.
    #[error("message {message_id:?} is unconfirmed: {reason}")]
    Unconfirmed {
        /// The message's `message_id`.
        message_id: Option<String>,
        /// What happened to the channel.
        reason: String,
        /// Whether a retry on a new channel may succeed.
        transient: bool,
    },
    /// No channel could be opened to publish on.
    #[error("cannot publish: {0}")]
    Unavailable(#[source] Box<AmqpError>),
    /// A property does not fit AMQP (e.g. a `message_id` over 255 bytes).
    #[error("invalid AMQP property {field}: {reason}")]
    InvalidProperty {
        /// The property.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl PublishError {
    /// True when publishing the same message again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            PublishError::Returned { .. } | PublishError::InvalidProperty { .. } => false,
            PublishError::Nacked { .. } => true,
            PublishError::Unconfirmed { transient, .. } => *transient,
            PublishError::Unavailable(e) => e.is_transient(),
        }
    }

    /// A suggested wait before retrying a transient failure.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            PublishError::Nacked { .. } => Some(Duration::from_secs(1)),
            PublishError::Unconfirmed {
                transient: true, ..
            }
            | PublishError::Unavailable(_) => Some(Duration::from_millis(200)),
            _ => None,
        }
    }

    /// True when the message certainly did not reach a queue (returned,
    /// nacked, never sent); false when it may have (unconfirmed).
    pub fn surely_not_enqueued(&self) -> bool {
        !matches!(self, PublishError::Unconfirmed { .. })
    }
}

/// Options of a [`Publisher`].
#[derive(Debug, Clone)]
pub struct PublisherOptions {
    /// Bound on publishes awaiting their confirm.
    pub max_outstanding_confirms: usize,
    /// How long a publish waits for a channel (re)open before failing with
    /// [`PublishError::Unavailable`].
    pub reopen_timeout: Duration,
}

impl PublisherOptions {
    /// From `amqp.max_outstanding_confirms`; reopen timeout =
    /// `amqp.connect_timeout_secs + amqp.reconnect_max_delay_secs`.
    pub fn from_amqp(amqp: &Amqp) -> PublisherOptions {
        let s = amqp.settings();
        PublisherOptions {
            max_outstanding_confirms: s.max_outstanding_confirms.max(1),
            reopen_timeout: Duration::from_secs(
                s.connect_timeout_secs + s.reconnect_max_delay_secs,
            ),
        }
    }
}

/// A confirmed, pipelined publisher. Cheap to clone; clones share the channel.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("amqp", &self.inner.amqp)
            .finish()
    }
}

struct Inner {
    amqp: Amqp,
    options: PublisherOptions,
    permits: Arc<Semaphore>,
    active: Mutex<Option<Active>>,
}

/// The current channel and the queue of its unsettled publishes.
struct Active {
    channel: Channel,
    pending: mpsc::UnboundedSender<Pending>,
}

struct Pending {
    fingerprint: u64,
    message_id: Option<String>,
    stage: Stage,
    done: oneshot::Sender<Result<(), PublishError>>,
    _permit: OwnedSemaphorePermit,
}

/// `basic_publish` of one message, whose frames are queued; resolves to its
/// confirm once lapin wrote them.
type WriteFuture = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

/// Where an unsettled publish is: frames queued, or written and awaiting
/// the broker's confirm.
enum Stage {
    Writing(WriteFuture),
    Confirming(PublisherConfirm),
}

impl Pending {
    /// Polls the write, then the confirm.
    fn poll_outcome(&mut self, cx: &mut Context<'_>) -> Poll<lapin::Result<Confirmation>> {
        loop {
            match &mut self.stage {
                Stage::Writing(write) => match write.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(confirm)) => self.stage = Stage::Confirming(confirm),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                },
                Stage::Confirming(confirm) => return confirm.poll_unpin(cx),
            }
        }
    }
}

/// The broker's verdict on one published message; resolves once the broker
/// confirmed it (or the channel died).
#[must_use = "a publish is only safe once its Confirm resolved to Ok"]
#[derive(Debug)]
pub struct Confirm {
    rx: oneshot::Receiver<Result<(), PublishError>>,
    message_id: Option<String>,
}

impl Future for Confirm {
    type Output = Result<(), PublishError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.rx.poll_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(r)) => Poll::Ready(r),
            Poll::Ready(Err(_)) => Poll::Ready(Err(PublishError::Unconfirmed {
                message_id: self.message_id.take(),
                reason: "the publisher's confirm tracker stopped".to_owned(),
                transient: true,
            })),
        }
    }
}

impl Publisher {
    /// Opens a channel in confirm mode, with options from the settings.
    pub async fn new(amqp: &Amqp) -> Result<Publisher, AmqpError> {
        Publisher::with_options(amqp, PublisherOptions::from_amqp(amqp)).await
    }

    /// Opens a channel in confirm mode.
    pub async fn with_options(
        amqp: &Amqp,
        options: PublisherOptions,
    ) -> Result<Publisher, AmqpError> {
        let active = open(amqp).await?;
        Ok(Publisher {
            inner: Arc::new(Inner {
                amqp: amqp.clone(),
                permits: Arc::new(Semaphore::new(options.max_outstanding_confirms.max(1))),
                options,
                active: Mutex::new(Some(active)),
            }),
        })
    }

    /// Publishes and waits for the broker's confirm.
    pub async fn publish(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        self.send(message).await?.await
    }

    /// Publishes without waiting for the confirm: returns once the message is
    /// queued for writing (in call order), with the [`Confirm`] to await; a
    /// failed write fails the [`Confirm`]. Waits first while
    /// `max_outstanding_confirms` publishes are unconfirmed.
    pub async fn send(&self, message: &OutgoingMessage) -> Result<Confirm, PublishError> {
        let permit = self
            .inner
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PublishError::Unconfirmed {
                message_id: message.message_id.clone(),
                reason: "publisher closed".into(),
                transient: false,
            })?;
        let now = Utc::now();
        let mut guard = self.inner.active.lock().await;
        let active: &mut Active = match guard.take() {
            Some(a) if a.channel.status().connected() => guard.insert(a),
            // No channel yet, or it died: dropping the old Active closes its
            // pending queue; its driver settles what it holds (those
            // confirms fail with the channel's error).
            _ => {
                let a = open_with_retry(&self.inner.amqp, self.inner.options.reopen_timeout)
                    .await
                    .map_err(|e| PublishError::Unavailable(Box::new(e)))?;
                guard.insert(a)
            }
        };
        let props = message.properties(now)?;
        let channel = active.channel.clone();
        let exchange = message.exchange.as_str().into();
        let routing_key = message.routing_key.as_str().into();
        let options = BasicPublishOptions {
            mandatory: message.mandatory,
            immediate: false,
        };
        let body = message.body.clone();
        let mut write: WriteFuture = Box::pin(async move {
            channel
                .basic_publish(exchange, routing_key, options, &body, props)
                .await
        });
        // The first poll registers the confirm and queues the frames, in
        // publish order (we hold the lock). The frame write is not awaited
        // here: lapin's IO thread writes queued frames of many publishes in
        // one go, and the driver awaits the write before the confirm (a
        // failed write settles the Confirm as Unconfirmed).
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let stage = match write.as_mut().poll(&mut cx) {
            Poll::Pending => Stage::Writing(write),
            Poll::Ready(Ok(confirm)) => Stage::Confirming(confirm),
            Poll::Ready(Err(e)) => {
                return Err(PublishError::Unconfirmed {
                    message_id: message.message_id.clone(),
                    reason: format!("basic.publish failed: {e}"),
                    transient: lapin_is_transient(&e),
                });
            }
        };
        let (done, rx) = oneshot::channel();
        let pending = Pending {
            fingerprint: fingerprint(
                &message.exchange,
                &message.routing_key,
                message.message_id.as_deref(),
                message.body.len(),
            ),
            message_id: message.message_id.clone(),
            stage,
            done,
            _permit: permit,
        };
        if let Err(mpsc::error::SendError(p)) = active.pending.send(pending) {
            let _ = p.done.send(Err(PublishError::Unconfirmed {
                message_id: p.message_id,
                reason: "the publisher's confirm tracker stopped".into(),
                transient: true,
            }));
        }
        Ok(Confirm {
            rx,
            message_id: message.message_id.clone(),
        })
    }

    /// Publishes every message pipelined (at most `max_outstanding_confirms`
    /// unconfirmed at once) and returns each one's fate, in order.
    pub async fn publish_all<'a, I>(&self, messages: I) -> Vec<Result<(), PublishError>>
    where
        I: IntoIterator<Item = &'a OutgoingMessage>,
    {
        let mut confirms = Vec::new();
        for m in messages {
            confirms.push(self.send(m).await);
        }
        let mut out = Vec::with_capacity(confirms.len());
        for c in confirms {
            out.push(match c {
                Ok(c) => c.await,
                Err(e) => Err(e),
            });
        }
        out
    }

    /// The handle this publisher opens channels with.
    pub fn amqp(&self) -> &Amqp {
        &self.inner.amqp
    }
}

async fn open(amqp: &Amqp) -> Result<Active, AmqpError> {
    let channel = amqp.publish_channel().await?;
    activate(channel).await
}

async fn open_with_retry(amqp: &Amqp, within: Duration) -> Result<Active, AmqpError> {
    let channel = amqp.publish_channel_with_retry(Some(within)).await?;
    activate(channel).await
}

async fn activate(channel: Channel) -> Result<Active, AmqpError> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| AmqpError::broker("confirm.select", e))?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(drive(channel.clone(), rx));
    Ok(Active {
        channel,
        pending: tx,
    })
}

/// Identifies a message well enough to match a `basic.return` to it.
fn fingerprint(
    exchange: &str,
    routing_key: &str,
    message_id: Option<&str>,
    body_len: usize,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    exchange.hash(&mut h);
    routing_key.hash(&mut h);
    message_id.hash(&mut h);
    body_len.hash(&mut h);
    h.finish()
}

/// Returned messages not yet matched to an unsettled publish, by fingerprint,
/// oldest first, with the broker's reply code and text.
type Returned = HashMap<u64, VecDeque<(u16, String)>>;

/// Settles the confirms of one channel in publish order; ends when the
/// channel is replaced and every publish on it is settled.
async fn drive(channel: Channel, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut returned = Returned::new();
    let mut head: Option<Pending> = None;
    loop {
        let mut first = match head.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        let outcome = std::future::poll_fn(|cx| first.poll_outcome(cx)).await;
        // lapin resolves all confirms of one (multiple) ack frame while
        // holding the channel's acknowledgement lock, and attaches a pending
        // basic.return to any one of them. `wait_for_confirms` takes that lock
        // on its first poll, so after this line every confirm of the frame
        // that resolved `first` is resolved too, and the return is visible.
        let _ = channel.wait_for_confirms().now_or_never();
        let mut batch = vec![(first, outcome)];
        while let Ok(mut next) = rx.try_recv() {
            match std::future::poll_fn(|cx| next.poll_outcome(cx)).now_or_never() {
                Some(outcome) => batch.push((next, outcome)),
                None => {
                    head = Some(next);
                    break;
                }
            }
        }
        for (_, outcome) in &batch {
            if let Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r))) = outcome {
                note_return(&mut returned, r);
            }
        }
        for (p, outcome) in batch {
            let result = settle(&mut returned, p.fingerprint, p.message_id, outcome);
            let _ = p.done.send(result);
        }
        if head.is_none() && rx.is_empty() {
            // Nothing unsettled: a leftover return can match nothing.
            returned.clear();
        }
    }
}

fn note_return(returned: &mut Returned, r: &BasicReturnMessage) {
    let d = &r.delivery;
    let fp = fingerprint(
        d.exchange.as_str(),
        d.routing_key.as_str(),
        d.properties.message_id().as_ref().map(|m| m.as_str()),
        d.data.len(),
    );
    returned
        .entry(fp)
        .or_default()
        .push_back((r.reply_code, r.reply_text.to_string()));
}

fn settle(
    returned: &mut Returned,
    fingerprint: u64,
    message_id: Option<String>,
    outcome: lapin::Result<Confirmation>,
) -> Result<(), PublishError> {
    if let Some(queue) = returned.get_mut(&fingerprint)
        && let Some((reply_code, reply_text)) = queue.pop_front()
    {
        if queue.is_empty() {
            returned.remove(&fingerprint);
        }
        return Err(PublishError::Returned {
            message_id,
            reply_code,
            reply_text,
        });
    }
    match outcome {
        Ok(Confirmation::Ack(_)) => Ok(()),
        Ok(Confirmation::Nack(_)) => Err(PublishError::Nacked { message_id }),
        Ok(Confirmation::NotRequested) => Err(PublishError::Unconfirmed {
            message_id,
            reason: "the channel is not in confirm mode".into(),
            transient: false,
        }),
        Err(e) => Err(PublishError::Unconfirmed {
            message_id,
            reason: format!("channel lost before the confirm: {e}"),
            transient: lapin_is_transient(&e),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn ack() -> lapin::Result<Confirmation> {
        Ok(Confirmation::Ack(None))
    }

    #[test]
    fn a_return_fails_its_own_message_even_if_another_confirm_carried_it() {
        let mut returned = Returned::new();
        let a = fingerprint("ex", "task", Some("a"), 10);
        let b = fingerprint("ex", "nowhere", Some("b"), 10);
        // lapin attached b's return to a's confirm; the driver noted it.
        returned
            .entry(b)
            .or_default()
            .push_back((312, "NO_ROUTE".into()));
        assert!(settle(&mut returned, a, Some("a".into()), ack()).is_ok());
        let err = settle(&mut returned, b, Some("b".into()), ack()).unwrap_err();
        assert!(matches!(
            err,
            PublishError::Returned {
                reply_code: 312,
                ..
            }
        ));
        assert!(returned.is_empty());
    }

    #[test]
    fn nacks_and_lost_channels_are_errors_never_successes() {
        let mut returned = Returned::new();
        let fp = fingerprint("ex", "task", None, 1);
        let nack = settle(&mut returned, fp, None, Ok(Confirmation::Nack(None))).unwrap_err();
        assert!(matches!(nack, PublishError::Nacked { .. }) && nack.is_transient());
        let io: lapin::Error = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        let lost = settle(&mut returned, fp, None, Err(io)).unwrap_err();
        assert!(matches!(
            lost,
            PublishError::Unconfirmed {
                transient: true,
                ..
            }
        ));
        assert!(!lost.surely_not_enqueued());
        let none = settle(&mut returned, fp, None, Ok(Confirmation::NotRequested)).unwrap_err();
        assert!(!none.is_transient());
    }

    #[test]
    fn identical_messages_take_returns_oldest_first() {
        let mut returned = Returned::new();
        let fp = fingerprint("ex", "nowhere", None, 3);
        returned
            .entry(fp)
            .or_default()
            .push_back((312, "first".into()));
        returned
            .entry(fp)
            .or_default()
            .push_back((312, "second".into()));
        let e1 = settle(&mut returned, fp, None, ack()).unwrap_err();
        let e2 = settle(&mut returned, fp, None, ack()).unwrap_err();
        assert!(
            matches!(e1, PublishError::Returned { ref reply_text, .. } if reply_text == "first")
        );
        assert!(
            matches!(e2, PublishError::Returned { ref reply_text, .. } if reply_text == "second")
        );
        assert!(settle(&mut returned, fp, None, ack()).is_ok());
    }
}
