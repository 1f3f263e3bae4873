//! Dead letters: read them without losing any, requeue a selection for one
//! more attempt, purge.
//!
//! The dead-letter queue is read by consuming with a prefetch large enough to
//! hold every message read in one pass, so none is delivered twice during the
//! pass; what is not acted on is handed back (`nack` with requeue) at the end.
//!
//! Every dead letter has a handle an operator can select it by: its task
//! id, or for a message without one (a malformed body with no `message_id`)
//! `raw-` and the first 12 hex digits of the body's SHA-256, which stays the
//! same from one listing to the next whatever the queue's order.

use std::time::Duration;

use sandfleet_amqp::lapin::types::{AMQPValue, FieldTable};
use sandfleet_amqp::{
    Amqp, Consumer, ConsumerOptions, Delivery, HEADER_ATTEMPT, HEADER_REJECT_CODE,
    HEADER_REJECT_REASON, Publisher, TASK_ROUTING_KEY, amqp_int,
};
use sha2::Digest;

use crate::OpsError;

/// Prefix of the handle of a dead letter without a task id.
pub const RAW_HANDLE_PREFIX: &str = "raw-";

/// How long a pass waits for the next message before it decides the queue is
/// read to its end.
const IDLE: Duration = Duration::from_millis(700);

/// One dead-lettered message, as shown to an operator.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    /// What `dlq requeue --task` takes: the task id, or `raw-<digest>` for a
    /// message without one.
    pub handle: String,
    /// The task id (`message_id`, or the body's `id`).
    pub task_id: Option<String>,
    /// Repository, when the body is a readable task.
    pub repository: Option<String>,
    /// `x-sandfleet-reject-code`, or the broker's `x-death` reason.
    pub code: Option<String>,
    /// `x-sandfleet-reject-reason`, the human reason.
    pub reason: Option<String>,
    /// The attempt it reached (`x-sandfleet-attempt`).
    pub attempt: Option<u32>,
    /// Times the broker dead-lettered it (`x-death` count).
    pub death_count: Option<i64>,
    /// The queue it was dead-lettered from (`x-death` queue).
    pub from_queue: Option<String>,
}

/// Reads the facts an operator needs from a dead-lettered delivery.
pub fn describe(d: &Delivery) -> DeadLetter {
    let body: Option<serde_json::Value> = serde_json::from_slice(d.body()).ok();
    let body_str = |k: &str| {
        body.as_ref()
            .and_then(|b| b.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let repository = body
        .as_ref()
        .and_then(|b| b.pointer("/source/repository"))
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let death = first_death(d.headers());
    let task_id = d.message_id().map(str::to_owned).or_else(|| body_str("id"));
    DeadLetter {
        handle: task_id.clone().unwrap_or_else(|| raw_handle(d.body())),
        task_id,
        repository,
        code: d
            .header_str(HEADER_REJECT_CODE)
            .map(str::to_owned)
            .or_else(|| death.1.clone()),
        reason: d.header_str(HEADER_REJECT_REASON).map(str::to_owned),
        attempt: d.attempt(),
        death_count: death.0,
        from_queue: death.2,
    }
}

/// The handle of a message without a task id: stable across listings, since
/// it depends only on the body.
pub fn raw_handle(body: &[u8]) -> String {
    let digest = hex::encode(sha2::Sha256::digest(body));
    format!("{RAW_HANDLE_PREFIX}{}", &digest[..12])
}

/// `(count, reason, queue)` of the first `x-death` entry.
fn first_death(headers: Option<&FieldTable>) -> (Option<i64>, Option<String>, Option<String>) {
    let Some(AMQPValue::FieldArray(arr)) = headers.and_then(|h| h.inner().get("x-death")) else {
        return (None, None, None);
    };
    let Some(AMQPValue::FieldTable(t)) = arr.as_slice().first() else {
        return (None, None, None);
    };
    let s = |k: &str| match t.inner().get(k) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
        _ => None,
    };
    (
        t.inner().get("count").and_then(amqp_int),
        s("reason"),
        s("queue"),
    )
}

/// Most messages one pass holds (the consumer prefetch).
const MAX_PASS: usize = 10_000;

/// Reads up to `limit` messages (at most [`MAX_PASS`]); they stay unacked
/// (held) until settled. The pass ends when no message came for [`IDLE`]:
/// the ready count is not a reliable bound, because a quorum queue applies
/// returns and publishes asynchronously.
pub async fn read(amqp: &Amqp, queue: &str, limit: usize) -> Result<Vec<Delivery>, OpsError> {
    let want = limit.min(MAX_PASS);
    if want == 0 {
        return Ok(Vec::new());
    }
    // Fail fast with a clear error when the queue does not exist.
    amqp.queue_depth(queue).await?;
    let prefetch = u16::try_from(want).unwrap_or(u16::MAX);
    let mut consumer = Consumer::start(
        amqp,
        ConsumerOptions::new(queue, prefetch).tag("sandfleet-dlq-reader"),
    )
    .await?;
    let mut got = Vec::new();
    while got.len() < want {
        match tokio::time::timeout(IDLE, consumer.next_delivery()).await {
            Ok(Some(d)) => got.push(d),
            Ok(None) | Err(_) => break,
        }
    }
    consumer.cancel();
    Ok(got)
}

/// Hands held messages back to the queue (`nack` with requeue); returns once
/// the broker has them back.
pub async fn give_back(deliveries: &[Delivery]) {
    for d in deliveries {
        if let Err(e) = d.nack(true).await {
            tracing::warn!(error = %e, "could not hand a dead letter back; the broker requeues it when the channel closes");
        }
    }
    // basic.nack has no reply; closing the channel waits for close-ok, which
    // the broker sends only after it processed every earlier frame on the
    // channel. So when this returns, the messages are back in the queue.
    for d in deliveries {
        if d.channel().status().connected() {
            let _ = d.channel().close(200, "OK".into()).await;
        }
    }
}

/// Headers the broker or the worker added on the way to the DLQ.
fn is_death_header(k: &str) -> bool {
    k.starts_with("x-death")
        || k.starts_with("x-first-death")
        || k.starts_with("x-last-death")
        || k == HEADER_REJECT_CODE
        || k == HEADER_REJECT_REASON
        || k == "x-delivery-count"
}

/// Reads the dead letters (up to `limit`, one pass) and hands them all back.
pub async fn list(amqp: &Amqp, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, OpsError> {
    let deliveries = read(amqp, queue, limit).await?;
    let letters = deliveries.iter().map(describe).collect();
    give_back(&deliveries).await;
    Ok(letters)
}

/// A dead letter sent back to the tasks exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requeued {
    /// The letter as it was in the queue.
    pub letter: DeadLetter,
    /// The attempt it was sent as.
    pub attempt: u32,
}

/// What [`requeue`] did.
#[derive(Debug, Default)]
pub struct RequeueReport {
    /// Requeued and removed from the dead-letter queue.
    pub requeued: Vec<Requeued>,
    /// Selected but not requeued (still in the queue), with why.
    pub failed: Vec<(DeadLetter, String)>,
    /// Handles (lowercase) of every letter the selection matched.
    pub selected: Vec<String>,
}

/// Requeues the dead letters `select` picks: each goes back to the tasks
/// exchange as one more attempt under the same id, without the headers the
/// way to the DLQ added; the rest are handed back untouched.
pub async fn requeue(
    amqp: &Amqp,
    queue: &str,
    tasks_exchange: &str,
    select: impl Fn(&DeadLetter) -> bool,
) -> Result<RequeueReport, OpsError> {
    let publisher = Publisher::new(amqp).await?;
    let deliveries = read(amqp, queue, usize::MAX).await?;
    let mut report = RequeueReport::default();
    let mut keep = Vec::new();
    for d in deliveries {
        let dl = describe(&d);
        if !select(&dl) {
            keep.push(d);
            continue;
        }
        report.selected.push(dl.handle.to_lowercase());
        let mut msg = d.to_outgoing(tasks_exchange, TASK_ROUTING_KEY);
        let mut headers = FieldTable::default();
        for (k, v) in msg.headers.inner() {
            if !is_death_header(k.as_str()) && k.as_str() != HEADER_ATTEMPT {
                headers.insert(k.clone(), v.clone());
            }
        }
        msg.headers = headers;
        // One more attempt under the same id: the attempt number is raised
        // (not reset), which gives it a fresh sandbox (Job names are per
        // attempt) and keeps its history in the results.
        let attempt = dl.attempt.unwrap_or(1).saturating_add(1);
        msg.attempt = Some(attempt);
        match d.forward(&publisher, &msg).await {
            Ok(()) => report.requeued.push(Requeued {
                letter: dl,
                attempt,
            }),
            Err(e) => {
                report.failed.push((dl, e.to_string()));
                keep.push(d);
            }
        }
    }
    give_back(&keep).await;
    Ok(report)
}

/// Deletes every message in the dead-letter queue; returns how many.
/// Confirmation is the caller's business.
pub async fn purge(amqp: &Amqp, queue: &str) -> Result<u32, OpsError> {
    let channel = amqp.channel().await?;
    let purged = channel
        .queue_purge(queue.into(), Default::default())
        .await
        .map_err(|e| OpsError::Broker(format!("queue.purge {queue}: {e}")))?;
    let _ = channel.close(200, "OK".into()).await;
    Ok(purged)
}
