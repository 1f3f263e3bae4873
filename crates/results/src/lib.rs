//! Publish and subscribe to sandfleet results.
//!
//! Workers publish every attempt's [`TaskResult`] with a [`ResultPublisher`]
//! (confirmed, `mandatory`) to the results topic exchange, routing key
//! `<outcome>.<final|retrying>` (e.g. `succeeded.final`, `pod_evicted.retrying`),
//! so consumers can bind their own queues to just what they need. The exchange
//! also feeds the results *stream*, a replayable log: a [`ResultSubscriber`]
//! reads it from the first retained result, the last chunk, only new ones, or
//! from a point in time ([`StartAt`]). Results are delivered at least once;
//! [`Dedup`] drops repeats by `(task_id, attempt)`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use sandfleet_amqp::{Amqp, Topology};
//! use sandfleet_results::{Dedup, ResultPublisher, ResultSubscriber, StartAt};
//! use sandfleet_settings::{AmqpSettings, TopologySettings};
//! use sandfleet_proto::{Outcome, TaskResult};
//!
//! let settings = AmqpSettings {
//!     url: std::env::var("AMQP_ADDR")
//!         .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
//!     ..AmqpSettings::default()
//! };
//! let amqp = Amqp::connect(&settings, "results-example").await?;
//! # let prefix = format!("doctest-results-{}", uuid::Uuid::new_v4().simple());
//! let topology = Topology::new(&TopologySettings { prefix, ..TopologySettings::default() });
//! topology.apply(&amqp).await?;
//!
//! let since = chrono::Utc::now();
//! let publisher = ResultPublisher::new(&amqp, &topology).await?;
//! let result = TaskResult {
//!     schema_version: 1,
//!     task_id: uuid::Uuid::now_v7(),
//!     attempt: 1,
//!     outcome: Outcome::Succeeded,
//!     is_final: true,
//!     exit_code: Some(0),
//!     steps: vec![],
//!     log_tail: String::new(),
//!     log_truncated: false,
//!     artifacts: vec![],
//!     started_at: None,
//!     finished_at: chrono::Utc::now(),
//!     worker: "example".into(),
//!     sandbox: None,
//!     error: None,
//!     source: None,
//!     labels: Default::default(),
//!     task: None,
//!     cancellation: None,
//!     timings: None,
//! };
//! publisher.publish(&result, None).await?; // twice: delivery is at-least-once
//! publisher.publish(&result, None).await?;
//!
//! let mut results = ResultSubscriber::new(&amqp, &topology).subscribe(StartAt::Timestamp(since)).await?;
//! let mut dedup = Dedup::new(10_000);
//! let first = results.next().await.expect("stream open")?;
//! assert!(dedup.first_time(&first.result));
//! let again = results.next().await.expect("stream open")?;
//! assert!(!dedup.first_time(&again.result)); // the duplicate
//! # topology.delete(&amqp).await?;
//! # Ok(())
//! # }
//! ```

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use sandfleet_amqp::{
    Amqp, AmqpError, Consumer, ConsumerOptions, Delivery, HEADER_PUBLISHED_AT_MS, OutgoingMessage,
    PublishError, Publisher, StreamOffset, Topology,
};
use sandfleet_proto::{CONTENT_TYPE, RESULT_MESSAGE_TYPE, TaskId, TaskResult};

/// Errors publishing or reading results.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    /// Connecting or subscribing failed.
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    /// The broker did not confirm a result.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// A result could not be encoded.
    #[error("cannot encode result: {0}")]
    Encode(#[source] serde_json::Error),
    /// A message on the stream is not a valid result (skipped).
    #[error("message at offset {offset:?} is not a valid result: {source}")]
    Decode {
        /// Its stream offset.
        offset: Option<u64>,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

impl ResultsError {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ResultsError::Amqp(e) => e.is_transient(),
            ResultsError::Publish(e) => e.is_transient(),
            ResultsError::Encode(_) | ResultsError::Decode { .. } => false,
        }
    }
}

/// The routing key of a result: `<outcome>.<final|retrying>`.
pub fn routing_key(result: &TaskResult) -> String {
    format!(
        "{}.{}",
        result.outcome.as_str(),
        if result.is_final { "final" } else { "retrying" }
    )
}

/// The message id of a result: `<task_id>:<attempt>`, the same for every
/// republish of it, so duplicates are recognisable.
pub fn message_id(result: &TaskResult) -> String {
    format!("{}:{}", result.task_id, result.attempt)
}

/// Publishes results, confirmed. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ResultPublisher {
    publisher: Publisher,
    exchange: String,
}

impl ResultPublisher {
    /// Opens its own confirmed publisher on `amqp`.
    pub async fn new(amqp: &Amqp, topology: &Topology) -> Result<ResultPublisher, ResultsError> {
        Ok(ResultPublisher::from_publisher(
            Publisher::new(amqp).await?,
            topology,
        ))
    }

    /// Shares an existing publisher.
    pub fn from_publisher(publisher: Publisher, topology: &Topology) -> ResultPublisher {
        ResultPublisher {
            publisher,
            exchange: topology.results_exchange.clone(),
        }
    }

    /// The message for `result` (for callers that pipeline with [`Publisher::send`]).
    pub fn message(
        &self,
        result: &TaskResult,
        traceparent: Option<&str>,
    ) -> Result<OutgoingMessage, ResultsError> {
        let body = serde_json::to_vec(result).map_err(ResultsError::Encode)?;
        let mut m = OutgoingMessage::new(&self.exchange, routing_key(result), body)
            .message_id(message_id(result))
            .kind(RESULT_MESSAGE_TYPE)
            .content_type(CONTENT_TYPE)
            .correlation_id(result.task_id.to_string())
            .attempt(result.attempt)
            .traceparent(traceparent);
        // Millisecond publish time, for `StartAt::Timestamp` subscriptions.
        m.stamp_published_at_ms = true;
        Ok(m)
    }

    /// Publishes `result` and waits for the broker's confirm. An unroutable
    /// result (no binding on the results exchange) is an error: the caller
    /// must not ack the task.
    pub async fn publish(
        &self,
        result: &TaskResult,
        traceparent: Option<&str>,
    ) -> Result<(), ResultsError> {
        let m = self.message(result, traceparent)?;
        self.publisher.publish(&m).await?;
        Ok(())
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest result still retained.
    First,
    /// The most recent chunk of results, then new ones.
    Last,
    /// Only results published after subscribing.
    Next,
    /// Results published at or after this time.
    Timestamp(DateTime<Utc>),
}

/// A result read from the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The result.
    pub result: TaskResult,
    /// Its offset in the stream (to resume from).
    pub offset: Option<u64>,
    /// When it was published (millisecond header, else the AMQP timestamp).
    pub published_at: Option<DateTime<Utc>>,
    /// Its `traceparent`.
    pub traceparent: Option<String>,
}

/// Reads the results stream.
#[derive(Debug, Clone)]
pub struct ResultSubscriber {
    amqp: Amqp,
    stream: String,
    prefetch: u16,
}

impl ResultSubscriber {
    /// A subscriber to `topology.results_stream`, prefetch 500.
    pub fn new(amqp: &Amqp, topology: &Topology) -> ResultSubscriber {
        ResultSubscriber {
            amqp: amqp.clone(),
            stream: topology.results_stream.clone(),
            prefetch: 500,
        }
    }

    /// Sets the prefetch (credit) of the stream consumer.
    pub fn prefetch(mut self, prefetch: u16) -> ResultSubscriber {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Starts reading. A subscription that loses its connection resumes
    /// after the last offset it delivered.
    pub async fn subscribe(&self, from: StartAt) -> Result<Subscription, ResultsError> {
        let (offset, not_before_ms) = match from {
            StartAt::First => (StreamOffset::First, None),
            StartAt::Last => (StreamOffset::Last, None),
            StartAt::Next => (StreamOffset::Next, None),
            // The broker seeks by chunk and by whole seconds, so start a
            // second early and drop what was published before `t`.
            StartAt::Timestamp(t) => (
                StreamOffset::Timestamp(t.timestamp() - 1),
                Some(t.timestamp_millis()),
            ),
        };
        let options = ConsumerOptions::new(&self.stream, self.prefetch)
            .tag("sandfleet-results")
            .stream_offset(offset);
        let consumer = Consumer::start(&self.amqp, options).await?;
        Ok(Subscription {
            consumer,
            not_before_ms,
        })
    }
}

/// A live subscription: a stream of results. Each message is acknowledged
/// (stream credit) as it is handed out; a stream keeps its messages anyway.
pub struct Subscription {
    consumer: Consumer,
    not_before_ms: Option<i64>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("not_before_ms", &self.not_before_ms)
            .finish()
    }
}

impl Subscription {
    /// The next result; `None` when the subscription ended. Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<Received, ResultsError>> {
        StreamExt::next(self).await
    }

    /// True while subscribed on a live connection.
    pub fn is_connected(&self) -> bool {
        self.consumer.is_connected()
    }

    /// Adapts the subscription into a stream that drops duplicates by
    /// `(task_id, attempt)`, remembering the last `capacity` keys.
    pub fn deduplicated(
        self,
        capacity: usize,
    ) -> impl Stream<Item = Result<Received, ResultsError>> {
        let mut dedup = Dedup::new(capacity);
        self.filter(move |r| {
            let keep = match r {
                Ok(received) => dedup.first_time(&received.result),
                Err(_) => true,
            };
            futures::future::ready(keep)
        })
    }

    /// Handles one delivery: `None` when it is filtered out.
    fn handle(&self, d: Delivery) -> Option<Result<Received, ResultsError>> {
        let published_ms = published_ms(&d);
        let out = match (self.not_before_ms, published_ms) {
            (Some(min), Some(at)) if at < min => None,
            _ => Some(decode(&d, published_ms)),
        };
        // Stream acks only grant credit; they need not hold up the reader.
        tokio::spawn(async move {
            if let Err(e) = d.ack().await {
                tracing::debug!(error = %e, "stream ack failed (the subscription resumes by offset)");
            }
        });
        out
    }
}

impl Stream for Subscription {
    type Item = Result<Received, ResultsError>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.consumer).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(d)) => {
                    if let Some(item) = this.handle(d) {
                        return Poll::Ready(Some(item));
                    }
                }
            }
        }
    }
}

fn published_ms(d: &Delivery) -> Option<i64> {
    d.header_i64(HEADER_PUBLISHED_AT_MS).or_else(|| {
        d.properties()
            .timestamp()
            .map(|s| (s as i64).saturating_mul(1000))
    })
}

fn decode(d: &Delivery, published_ms: Option<i64>) -> Result<Received, ResultsError> {
    let offset = d.stream_offset();
    let result: TaskResult = serde_json::from_slice(d.body())
        .map_err(|source| ResultsError::Decode { offset, source })?;
    Ok(Received {
        result,
        offset,
        published_at: published_ms.and_then(DateTime::from_timestamp_millis),
        traceparent: d.traceparent().map(str::to_owned),
    })
}

/// Remembers the `(task_id, attempt)` of recent results to drop repeats
/// (results are delivered at least once). Bounded: forgets the oldest keys
/// beyond `capacity`.
#[derive(Debug, Clone)]
pub struct Dedup {
    seen: HashSet<(TaskId, u32)>,
    order: VecDeque<(TaskId, u32)>,
    capacity: usize,
}

impl Dedup {
    /// Remembers up to `capacity` keys.
    pub fn new(capacity: usize) -> Dedup {
        Dedup {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// True the first time this `(task_id, attempt)` is seen.
    pub fn first_time(&mut self, result: &TaskResult) -> bool {
        let key = result.dedup_key();
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use sandfleet_proto::Outcome;

    fn result(task: TaskId, attempt: u32, outcome: Outcome, is_final: bool) -> TaskResult {
        TaskResult {
            schema_version: 1,
            task_id: task,
            attempt,
            outcome,
            is_final,
            exit_code: None,
            steps: vec![],
            log_tail: String::new(),
            log_truncated: false,
            artifacts: vec![],
            started_at: None,
            finished_at: Utc::now(),
            worker: "w".into(),
            sandbox: None,
            error: None,
            source: None,
            labels: Default::default(),
            task: None,
            cancellation: None,
            timings: None,
        }
    }

    #[test]
    fn routing_key_says_outcome_and_finality() {
        let id = uuid::Uuid::now_v7();
        assert_eq!(
            routing_key(&result(id, 1, Outcome::Succeeded, true)),
            "succeeded.final"
        );
        let r = result(id, 2, Outcome::ALL[0], false);
        assert_eq!(
            routing_key(&r),
            format!("{}.retrying", Outcome::ALL[0].as_str())
        );
        assert_eq!(message_id(&r), format!("{id}:2"));
    }

    #[test]
    fn dedup_drops_repeats_of_the_same_attempt_only() {
        let id = uuid::Uuid::now_v7();
        let mut d = Dedup::new(2);
        assert!(d.first_time(&result(id, 1, Outcome::Succeeded, true)));
        assert!(!d.first_time(&result(id, 1, Outcome::Succeeded, true)));
        assert!(d.first_time(&result(id, 2, Outcome::Succeeded, true)));
        // Bounded memory: a third key evicts the oldest.
        assert!(d.first_time(&result(uuid::Uuid::now_v7(), 1, Outcome::Succeeded, true)));
        assert!(d.first_time(&result(id, 1, Outcome::Succeeded, true)));
    }
}
