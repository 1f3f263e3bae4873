//! The replay ledger: which replay idempotency keys were already sent.
//!
//! A key is `replay:<origin>:<batch>` ([`crate::replay::replay_key`]): the
//! build a replay stands for, not the replayed task's own id, so a replay of
//! a replay finds the record of the first one.
//!
//! It lives in the broker, so operators on different machines share it: a
//! RabbitMQ **stream** queue `<prefix>.replays` (age retention as the results
//! stream, `topology.results_max_age`). A replay appends one record per task
//! it enqueued, after the broker confirmed the task. Before sending, a replay
//! reads the stream from its first retained record up to a probe message it
//! publishes itself, so it knows it saw everything written before it started.
//!
//! Guarantees and limits:
//! - Records are written after the task's confirm: a crash between the two can
//!   make a rerun send that task again (at-least-once, never lost).
//! - Two replays of the same batch started at the same moment can both send a
//!   task; replays are operator actions, run one at a time.
//! - Records older than the retention are forgotten.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use sandfleet_amqp::lapin::options::QueueDeclareOptions;
use sandfleet_amqp::lapin::types::{AMQPValue, FieldTable};
use sandfleet_amqp::{Amqp, Consumer, ConsumerOptions, OutgoingMessage, Publisher, StreamOffset};
use sandfleet_proto::Task;
use serde_json::json;
use uuid::Uuid;

use crate::OpsError;

/// AMQP `type` of a ledger record.
pub const RECORD_TYPE: &str = "sandfleet.replay.v1";
/// AMQP `type` of the probe a reader publishes to find the end.
pub const PROBE_TYPE: &str = "sandfleet.replay-probe.v1";
/// How long reading the ledger may take before it is given up.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The ledger stream's name for a topology prefix.
pub fn queue_name(prefix: &str) -> String {
    format!("{prefix}.replays")
}

/// A handle on the ledger stream.
#[derive(Debug)]
pub struct ReplayLedger {
    amqp: Amqp,
    queue: String,
    publisher: Publisher,
}

impl ReplayLedger {
    /// Declares the ledger stream (idempotent) and opens a publisher.
    pub async fn open(amqp: &Amqp, prefix: &str, max_age: &str) -> Result<ReplayLedger, OpsError> {
        let queue = queue_name(prefix);
        let channel = amqp.channel().await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("stream".into()),
        );
        args.insert("x-max-age".into(), AMQPValue::LongString(max_age.into()));
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .map_err(|e| {
                OpsError::Broker(format!("cannot declare the replay ledger {queue}: {e}"))
            })?;
        let _ = channel.close(200, "OK".into()).await;
        let publisher = Publisher::new(amqp).await?;
        Ok(ReplayLedger {
            amqp: amqp.clone(),
            queue,
            publisher,
        })
    }

    /// The stream's name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Every key recorded so far.
    pub async fn keys(&self) -> Result<HashSet<String>, OpsError> {
        let probe = Uuid::now_v7().to_string();
        let msg = OutgoingMessage::new(
            "",
            self.queue.as_str(),
            json!({ "probe": probe }).to_string().into_bytes(),
        )
        .kind(PROBE_TYPE)
        .message_id(probe.clone())
        .content_type("application/json");
        self.publisher.publish(&msg).await?;
        let opts = ConsumerOptions::new(self.queue.as_str(), 1000)
            .stream_offset(StreamOffset::First)
            .tag("sandfleet-replay-ledger");
        let mut consumer = Consumer::start(&self.amqp, opts).await?;
        let mut keys = HashSet::new();
        let read = async {
            while let Some(d) = consumer.next_delivery().await {
                let _ = d.ack().await;
                if d.message_id() == Some(probe.as_str()) {
                    return true;
                }
                if d.properties().kind().as_ref().map(|k| k.as_str()) == Some(RECORD_TYPE)
                    && let Ok(v) = serde_json::from_slice::<serde_json::Value>(d.body())
                    && let Some(k) = v.get("key").and_then(|k| k.as_str())
                {
                    keys.insert(k.to_owned());
                }
            }
            false
        };
        let done = tokio::time::timeout(READ_TIMEOUT, read).await;
        consumer.cancel();
        match done {
            Ok(true) => Ok(keys),
            Ok(false) => Err(OpsError::Broker(format!(
                "the replay ledger {} closed while reading",
                self.queue
            ))),
            Err(_) => Err(OpsError::Broker(format!(
                "reading the replay ledger {} took over {READ_TIMEOUT:?}",
                self.queue
            ))),
        }
    }

    /// Records that `task` (a replay) was enqueued.
    pub async fn record(&self, task: &Task, batch: &str) -> Result<(), OpsError> {
        let body = json!({
            "key": task.idempotency_key,
            "task_id": task.id,
            "replay_of": task.replay_of,
            "origin": crate::replay::origin(task),
            "batch": batch,
            "at": Utc::now(),
        });
        let msg = OutgoingMessage::new("", self.queue.as_str(), body.to_string().into_bytes())
            .kind(RECORD_TYPE)
            .message_id(task.id.to_string())
            .idempotency_key(task.idempotency_key.clone())
            .content_type("application/json");
        Ok(self.publisher.publish(&msg).await?)
    }
}
