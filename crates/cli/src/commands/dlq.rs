//! `sandfleet dlq list | requeue | purge`.
//!
//! The dead-letter queue is read by consuming with a prefetch large enough to
//! hold every message read in one pass, so none is delivered twice during the
//! pass; what is not acted on is handed back (`nack` with requeue) at the end.
//!
//! Every dead letter has a handle an operator can pass to `--task`: its task
//! id, or for a message without one (a malformed body with no `message_id`)
//! `raw-` and the first 12 hex digits of the body's SHA-256, which stays the
//! same from one listing to the next whatever the queue's order.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use sandfleet_amqp::lapin::types::{AMQPValue, FieldTable};
use sandfleet_amqp::{
    Amqp, Consumer, ConsumerOptions, Delivery, HEADER_ATTEMPT, HEADER_REJECT_CODE,
    HEADER_REJECT_REASON, Publisher, TASK_ROUTING_KEY, amqp_int,
};
use sandfleet_settings::Settings;
use serde_json::json;
use sha2::Digest;

use crate::args::{DlqCommand, DlqPurgeArgs, DlqRequeueArgs};
use crate::broker;
use crate::exit::{CliError, CliResult, Exit};
use crate::output::{Output, diag};

/// Prefix of the handle of a dead letter without a task id.
pub const RAW_HANDLE_PREFIX: &str = "raw-";

/// How long a pass waits for the next message before it decides the queue is
/// read to its end.
const IDLE: Duration = Duration::from_millis(700);

/// Runs a `dlq` subcommand.
pub async fn run(cmd: &DlqCommand, settings: &Settings, out: Output) -> CliResult<Exit> {
    let amqp = broker::connect(settings, "cli").await?;
    let topology = broker::topology(settings);
    match cmd {
        DlqCommand::List(a) => list(&amqp, &topology.dead_queue, a.limit, out).await,
        DlqCommand::Requeue(a) => {
            requeue(
                &amqp,
                &topology.dead_queue,
                &topology.tasks_exchange,
                a,
                out,
            )
            .await
        }
        DlqCommand::Purge(a) => purge(&amqp, &topology.dead_queue, a, out).await,
    }
}

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
pub(crate) async fn read(amqp: &Amqp, queue: &str, limit: usize) -> CliResult<Vec<Delivery>> {
    let want = limit.min(MAX_PASS);
    if want == 0 {
        return Ok(Vec::new());
    }
    // Fail fast with a clear error when the queue does not exist.
    amqp.queue_depth(queue).await.map_err(broker::amqp_error)?;
    let prefetch = u16::try_from(want).unwrap_or(u16::MAX);
    let mut consumer = Consumer::start(
        amqp,
        ConsumerOptions::new(queue, prefetch).tag("sandfleet-cli-dlq"),
    )
    .await
    .map_err(broker::amqp_error)?;
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

pub(crate) async fn give_back(deliveries: &[Delivery]) {
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

async fn list(amqp: &Amqp, queue: &str, limit: usize, out: Output) -> CliResult<Exit> {
    let deliveries = read(amqp, queue, limit).await?;
    let letters: Vec<DeadLetter> = deliveries.iter().map(describe).collect();
    // Hand the messages back before printing: a reader that stops early
    // (`| head`) must not leave them held.
    give_back(&deliveries).await;
    if letters.is_empty() {
        out.human(format!("{queue} is empty"));
        return Ok(Exit::Ok);
    }
    let table = table(&letters);
    out.human(&table[0]);
    for (dl, line) in letters.iter().zip(&table[1..]) {
        out.emit(line, &serde_json::to_value(dl).unwrap_or_default());
    }
    Ok(Exit::Ok)
}

/// The `dlq list` table: a header and one line per letter, each column as
/// wide as its widest cell (REASON last, unpadded).
pub fn table(letters: &[DeadLetter]) -> Vec<String> {
    let dash = || "-".to_owned();
    let rows: Vec<[String; 6]> = letters
        .iter()
        .map(|dl| {
            [
                dl.handle.clone(),
                dl.code.clone().unwrap_or_else(dash),
                dl.attempt.map(|a| a.to_string()).unwrap_or_else(dash),
                dl.death_count.map(|a| a.to_string()).unwrap_or_else(dash),
                dl.repository.clone().unwrap_or_else(dash),
                dl.reason.clone().unwrap_or_else(dash),
            ]
        })
        .collect();
    let header = ["TASK", "CODE", "ATTEMPT", "DEATHS", "REPOSITORY", "REASON"].map(str::to_owned);
    let mut width = [0usize; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |r: &[String; 6]| {
        format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:<w4$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
            w4 = width[4],
        )
    };
    std::iter::once(&header)
        .chain(&rows)
        .map(|r| line(r).trim_end().to_owned())
        .collect()
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

async fn requeue(
    amqp: &Amqp,
    queue: &str,
    tasks_exchange: &str,
    a: &DlqRequeueArgs,
    out: Output,
) -> CliResult<Exit> {
    let publisher = Publisher::new(amqp).await.map_err(broker::amqp_error)?;
    let deliveries = read(amqp, queue, usize::MAX).await?;
    let wanted: Vec<String> = a.tasks.iter().map(|t| t.trim().to_lowercase()).collect();
    let (mut moved, mut failed) = (0usize, 0usize);
    let mut keep = Vec::new();
    let mut found: Vec<String> = Vec::new();
    for d in deliveries {
        let dl = describe(&d);
        let selected = a.all || wanted.contains(&dl.handle.to_lowercase());
        if selected {
            found.push(dl.handle.to_lowercase());
        }
        if !selected {
            keep.push(d);
            continue;
        }
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
            Ok(()) => {
                moved += 1;
                out.emit(
                    format!("requeued {} as attempt {attempt}", dl.handle),
                    &json!({"requeued": dl.handle, "task_id": dl.task_id, "attempt": attempt}),
                );
            }
            Err(e) => {
                failed += 1;
                diag(format_args!(
                    "sandfleet: could not requeue {}: {e}",
                    dl.handle
                ));
                keep.push(d);
            }
        }
    }
    give_back(&keep).await;
    for id in wanted.iter().filter(|id| !found.contains(*id)) {
        diag(format_args!(
            "sandfleet: {id} is not in {queue} (`sandfleet dlq list` shows the handles)"
        ));
    }
    out.emit(
        format!("{moved} requeued, {failed} failed"),
        &json!({"requeued_total": moved, "failed": failed}),
    );
    Ok(match (moved, failed) {
        (_, 0) if moved > 0 || a.all => Exit::Ok,
        (0, 0) => {
            return Err(CliError::Failed(
                "no dead-lettered task matched the selection".to_owned(),
            ));
        }
        (0, _) => Exit::Failure,
        _ => Exit::Partial,
    })
}

async fn purge(amqp: &Amqp, queue: &str, a: &DlqPurgeArgs, out: Output) -> CliResult<Exit> {
    let depth = amqp.queue_depth(queue).await.map_err(broker::amqp_error)?;
    if !a.yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::Usage(
                "refusing to purge without confirmation: pass --yes (stdin is not a terminal)"
                    .to_owned(),
            ));
        }
        eprint!("Delete all {depth} messages in {queue}? Type 'purge' to confirm: ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        if line.trim() != "purge" {
            diag("not purged");
            return Ok(Exit::Failure);
        }
    }
    let channel = amqp.channel().await.map_err(broker::amqp_error)?;
    let purged = channel
        .queue_purge(queue.into(), Default::default())
        .await
        .map_err(|e| CliError::Broker(format!("queue.purge {queue}: {e}")))?;
    let _ = channel.close(200, "OK".into()).await;
    out.emit(
        format!("purged {purged} messages from {queue}"),
        &json!({"purged": purged, "queue": queue}),
    );
    Ok(Exit::Ok)
}
