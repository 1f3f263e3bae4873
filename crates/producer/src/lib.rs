//! Publish sandfleet tasks to RabbitMQ with publisher confirms.
//!
//! [`Producer::connect`] connects, declares the topology (idempotently), and
//! returns a producer that validates every task against the fleet's
//! [`Limits`] *before* publishing, so an invalid task is an
//! [`EnqueueError::Invalid`] for the caller, never a message the workers
//! must dead-letter. That includes the consumer-timeout budget
//! (`Limits::broker_consumer_timeout_secs`): a task whose deadline no worker
//! would run is refused here with the worker's own reason.
//! [`Producer::check`] runs the same checks without publishing (dry runs). [`Producer::enqueue`] returns a [`Receipt`] only once the
//! broker has confirmed the message; [`Producer::enqueue_batch`] pipelines the
//! confirms and reports each task's fate in a [`BatchReport`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use sandfleet_producer::Producer;
//! use sandfleet_proto::{Limits, Provider, SandboxSpec, Source, Task};
//! use sandfleet_settings::{AmqpSettings, TopologySettings};
//!
//! let amqp = AmqpSettings {
//!     url: std::env::var("AMQP_ADDR")
//!         .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
//!     ..AmqpSettings::default()
//! };
//! # let prefix = format!("doctest-producer-{}", uuid::Uuid::new_v4().simple());
//! let topology = TopologySettings { prefix /* e.g. "sandfleet" */, ..TopologySettings::default() };
//! let producer = Producer::connect(&amqp, &topology, Limits::default()).await?;
//!
//! let source = Source {
//!     provider: Provider::Api,
//!     repository: "acme/widgets".into(),
//!     commit: "4f2a9c1e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a39".into(),
//!     git_ref: None,
//!     ci_run_id: None,
//!     pull_request: None,
//!     url: None,
//! };
//! let sandbox = SandboxSpec {
//!     image: "docker.io/library/node:20-alpine".into(),
//!     resources: Default::default(),
//!     env: Default::default(),
//!     deadline_secs: 900,
//!     pending_timeout_secs: 300,
//! };
//! let task = Task::fix_attempt(source, sandbox).with_step("test", "npm test", 600);
//!
//! let receipt = producer.enqueue(&task).await?; // confirmed by the broker
//! assert_eq!(receipt.task_id, task.id);
//!
//! let batch = vec![task.clone(), task.clone()];
//! let report = producer.enqueue_batch(batch).await;
//! assert_eq!(report.accepted().count(), 2);
//! # producer.topology().delete(producer.amqp()).await?;
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use sandfleet_amqp::{
    Amqp, AmqpError, Consumer, ConsumerOptions, OutgoingMessage, PublishError, Publisher,
    StreamOffset, Topology, TopologyError,
};
use sandfleet_proto::{
    CANCELLATION_MESSAGE_TYPE, CONTENT_TYPE, Cancellation, FairKey, Limits, Outcome,
    TASK_MESSAGE_TYPE, Task, TaskId, TaskResult, ValidationErrors,
};
use sandfleet_settings::{AmqpSettings, TopologySettings};

/// Why a producer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// RabbitMQ is unreachable or refused us.
    #[error(transparent)]
    Connect(#[from] AmqpError),
    /// The topology could not be declared (for example it conflicts with
    /// existing queues; the error says how to migrate).
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

impl ProducerError {
    /// True when starting again later may work (the broker was down).
    pub fn is_transient(&self) -> bool {
        match self {
            ProducerError::Connect(e) => e.is_transient(),
            ProducerError::Topology(e) => e.is_transient(),
        }
    }
}

/// Why one task was not enqueued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The task breaks the contract or the limits; nothing was published.
    #[error("invalid task: {0}")]
    Invalid(ValidationErrors),
    /// The encoded task is larger than `limits.max_message_bytes`.
    #[error("task is {size} bytes encoded, over the {limit}-byte limit")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The task could not be encoded as JSON.
    #[error("cannot encode task: {0}")]
    Encode(#[source] serde_json::Error),
    /// The broker did not confirm it (nack, return, connection lost).
    #[error(transparent)]
    Broker(#[from] PublishError),
}

impl EnqueueError {
    /// True when enqueueing the same task again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            EnqueueError::Broker(e) => e.is_transient(),
            _ => false,
        }
    }

    /// Suggested wait before retrying a transient failure.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            EnqueueError::Broker(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// Proof that the broker accepted a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The task's id (also the message id).
    pub task_id: TaskId,
    /// The exchange it was published to.
    pub exchange: String,
    /// Encoded size in bytes.
    pub bytes: usize,
}

/// Why a cancel was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// The id cannot name a task of this fleet (not a UUIDv7, or created in
    /// the future or before the cancellations stream's retention).
    #[error("unknown task {task_id}: {why}")]
    Unknown {
        /// The id given.
        task_id: TaskId,
        /// Why it cannot be a task.
        why: String,
    },
    /// `by`, `reason` or the key is too long, or empty where it must not be.
    #[error("invalid cancel: {0}")]
    Invalid(String),
    /// The results stream could not be read to find out whether the task
    /// already finished.
    #[error("could not look the task up in the results stream: {0}")]
    Lookup(#[from] AmqpError),
    /// The cancel could not be encoded.
    #[error("cannot encode the cancel: {0}")]
    Encode(#[source] serde_json::Error),
    /// The broker did not confirm the cancel: it is not recorded.
    #[error(transparent)]
    Broker(#[from] PublishError),
}

impl CancelError {
    /// True when cancelling again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            CancelError::Broker(e) => e.is_transient(),
            CancelError::Lookup(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// What [`Producer::cancel`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelStatus {
    /// The cancel is recorded (confirmed by the broker): the task ends with a
    /// `cancelled` result unless it finishes first.
    Recorded {
        /// The cancel request's id.
        cancel_id: uuid::Uuid,
    },
    /// The task already has a final result; nothing was recorded.
    AlreadyFinished {
        /// Its final outcome.
        outcome: Outcome,
    },
}

/// How long [`Producer::cancel`] waits for the next result while looking
/// for the task's final one: the lookup stops once the stream has been quiet
/// this long (it reads a live stream, which has no end marker).
const LOOKUP_QUIET: Duration = Duration::from_millis(300);

/// The longest the finished-task lookup reads before deciding.
const LOOKUP_BUDGET: Duration = Duration::from_secs(5);

/// Per-call options of [`Producer::enqueue_with`].
#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    /// W3C `traceparent` to propagate to the worker and the sandbox.
    pub traceparent: Option<String>,
}

/// Each task's fate in [`Producer::enqueue_batch`], in input order.
#[derive(Debug)]
pub struct BatchReport {
    /// `(task id, outcome)`, in the order the tasks were given.
    pub outcomes: Vec<(TaskId, Result<Receipt, EnqueueError>)>,
}

impl BatchReport {
    /// Receipts of the tasks the broker confirmed.
    pub fn accepted(&self) -> impl Iterator<Item = &Receipt> {
        self.outcomes.iter().filter_map(|(_, r)| r.as_ref().ok())
    }

    /// The tasks that were not enqueued, with why.
    pub fn failed(&self) -> impl Iterator<Item = (TaskId, &EnqueueError)> {
        self.outcomes
            .iter()
            .filter_map(|(id, r)| r.as_ref().err().map(|e| (*id, e)))
    }

    /// True when every task was confirmed.
    pub fn all_accepted(&self) -> bool {
        self.outcomes.iter().all(|(_, r)| r.is_ok())
    }

    /// Ids of failed tasks worth enqueueing again (transient failures).
    pub fn retryable(&self) -> Vec<TaskId> {
        self.failed()
            .filter(|(_, e)| e.is_transient())
            .map(|(id, _)| id)
            .collect()
    }
}

/// Publishes tasks to `<prefix>.tasks`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Producer {
    amqp: Amqp,
    publisher: Publisher,
    topology: Topology,
    limits: Limits,
}

impl Producer {
    /// Connects (component name `producer`), declares the topology and opens
    /// a confirmed publisher.
    pub async fn connect(
        amqp: &AmqpSettings,
        topology: &TopologySettings,
        limits: Limits,
    ) -> Result<Producer, ProducerError> {
        let amqp = Amqp::connect(amqp, "producer").await?;
        Producer::with_amqp(&amqp, Topology::new(topology), limits, true).await
    }

    /// A producer on an existing handle; declares the topology when `apply`.
    pub async fn with_amqp(
        amqp: &Amqp,
        topology: Topology,
        limits: Limits,
        apply: bool,
    ) -> Result<Producer, ProducerError> {
        if apply {
            topology.apply(amqp).await?;
        }
        let publisher = Publisher::new(amqp).await?;
        Ok(Producer {
            amqp: amqp.clone(),
            publisher,
            topology,
            limits,
        })
    }

    /// The topology tasks go to.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The broker handle.
    pub fn amqp(&self) -> &Amqp {
        &self.amqp
    }

    /// The limits tasks are validated against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs every check [`enqueue`](Producer::enqueue) runs before it
    /// publishes (validation with the consumer-timeout budget, encoding, the
    /// size limit), without publishing: what a dry run reports, so it agrees
    /// with the real run.
    pub fn check(&self, task: &Task) -> Result<(), EnqueueError> {
        self.prepare(task, &EnqueueOptions::default()).map(|_| ())
    }

    /// Validates, publishes and waits for the broker's confirm.
    pub async fn enqueue(&self, task: &Task) -> Result<Receipt, EnqueueError> {
        self.enqueue_with(task, &EnqueueOptions::default()).await
    }

    /// [`enqueue`](Producer::enqueue) with options (trace context).
    pub async fn enqueue_with(
        &self,
        task: &Task,
        options: &EnqueueOptions,
    ) -> Result<Receipt, EnqueueError> {
        let (message, receipt) = self.prepare(task, options)?;
        self.publisher.publish(&message).await?;
        Ok(receipt)
    }

    /// Enqueues many tasks with pipelined confirms (at most
    /// `amqp.max_outstanding_confirms` in flight). Invalid tasks are reported
    /// and skipped; the others are published. Every task gets an outcome;
    /// `Ok` means the broker confirmed it.
    pub async fn enqueue_batch(&self, tasks: Vec<Task>) -> BatchReport {
        self.enqueue_batch_with(tasks, &EnqueueOptions::default())
            .await
    }

    /// [`enqueue_batch`](Producer::enqueue_batch) with options.
    pub async fn enqueue_batch_with(
        &self,
        tasks: Vec<Task>,
        options: &EnqueueOptions,
    ) -> BatchReport {
        enum Slot {
            Sent(sandfleet_amqp::Confirm, Receipt),
            Done(Result<Receipt, EnqueueError>),
        }
        let mut slots = Vec::with_capacity(tasks.len());
        for task in &tasks {
            let slot = match self.prepare(task, options) {
                Err(e) => Slot::Done(Err(e)),
                Ok((message, receipt)) => match self.publisher.send(&message).await {
                    Ok(confirm) => Slot::Sent(confirm, receipt),
                    Err(e) => Slot::Done(Err(e.into())),
                },
            };
            slots.push((task.id, slot));
        }
        let mut outcomes = Vec::with_capacity(slots.len());
        for (id, slot) in slots {
            let outcome = match slot {
                Slot::Done(r) => r,
                Slot::Sent(confirm, receipt) => confirm.await.map(|()| receipt).map_err(Into::into),
            };
            outcomes.push((id, outcome));
        }
        BatchReport { outcomes }
    }

    /// Cancels one task: records a [`Cancellation`] (confirmed) on the
    /// cancellations stream, which every worker reads. A task that already
    /// has a final result is not cancelled and says so; an id that cannot be
    /// a task of this fleet is [`CancelError::Unknown`].
    ///
    /// The finished check reads the results stream from the task's creation
    /// time (its UUIDv7 timestamp) until the stream is quiet: a final result
    /// published during the check may be missed, which is harmless — the
    /// worker holding the task decides, and a task has one final result.
    pub async fn cancel(
        &self,
        task_id: TaskId,
        by: &str,
        reason: &str,
    ) -> Result<CancelStatus, CancelError> {
        let created = created_at(task_id)?;
        let cancel = Cancellation::task(task_id, by, reason);
        cancel.validate().map_err(CancelError::Invalid)?;
        if let Some(outcome) = self.final_outcome(task_id, created).await? {
            return Ok(CancelStatus::AlreadyFinished { outcome });
        }
        self.publish_cancellation(&cancel).await?;
        Ok(CancelStatus::Recorded {
            cancel_id: cancel.id,
        })
    }

    /// Publishes `task` and, when it carries a supersede key, the
    /// cancellation of the older tasks with that key (after the task is
    /// confirmed, so a failed enqueue supersedes nothing).
    pub async fn enqueue_superseding(&self, task: &Task) -> Result<Receipt, EnqueueError> {
        self.enqueue_superseding_with(task, &EnqueueOptions::default())
            .await
    }

    /// [`enqueue_superseding`](Producer::enqueue_superseding) with options.
    pub async fn enqueue_superseding_with(
        &self,
        task: &Task,
        options: &EnqueueOptions,
    ) -> Result<Receipt, EnqueueError> {
        let receipt = self.enqueue_with(task, options).await?;
        // The key was validated with the task, so only the broker can refuse.
        if let Some(supersede) = Cancellation::supersede_by(task) {
            let body = serde_json::to_vec(&supersede).map_err(EnqueueError::Encode)?;
            self.publisher
                .publish(&cancellation_message(&self.topology, &supersede, body))
                .await?;
        }
        Ok(receipt)
    }

    /// Publishes a cancellation as is (confirmed), for intakes that build
    /// their own (a supersede). The message format is in `docs/cancellation.md`.
    pub async fn publish_cancellation(&self, cancel: &Cancellation) -> Result<(), CancelError> {
        cancel.validate().map_err(CancelError::Invalid)?;
        let body = serde_json::to_vec(cancel).map_err(CancelError::Encode)?;
        self.publisher
            .publish(&cancellation_message(&self.topology, cancel, body))
            .await?;
        Ok(())
    }

    /// The task's final outcome, when the results stream holds one.
    async fn final_outcome(
        &self,
        task_id: TaskId,
        created: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<Outcome>, CancelError> {
        let options = ConsumerOptions::new(&self.topology.results_stream, 500)
            .tag("sandfleet-cancel-lookup")
            // Chunk and second resolution: a second early.
            .stream_offset(StreamOffset::Timestamp(created.timestamp() - 1));
        let mut consumer = Consumer::start(&self.amqp, options).await?;
        let give_up = tokio::time::Instant::now() + LOOKUP_BUDGET;
        let mut found = None;
        while let Ok(Some(d)) = tokio::time::timeout_at(
            give_up.min(tokio::time::Instant::now() + LOOKUP_QUIET),
            consumer.next_delivery(),
        )
        .await
        {
            let _ = d.ack().await;
            if d.message_id()
                .is_some_and(|m| !m.starts_with(&task_id.to_string()))
            {
                continue;
            }
            if let Ok(r) = serde_json::from_slice::<TaskResult>(d.body())
                && r.task_id == task_id
                && r.is_final
            {
                found = Some(r.outcome);
                break;
            }
        }
        consumer.cancel();
        Ok(found)
    }

    fn prepare(
        &self,
        task: &Task,
        options: &EnqueueOptions,
    ) -> Result<(OutgoingMessage, Receipt), EnqueueError> {
        // The intake checks (consumer-timeout budget included): a task every
        // worker would refuse is refused here, before it is published.
        task.validate_intake(&self.limits)
            .map_err(EnqueueError::Invalid)?;
        let body = serde_json::to_vec(task).map_err(EnqueueError::Encode)?;
        if body.len() > self.limits.max_message_bytes {
            return Err(EnqueueError::TooLarge {
                size: body.len(),
                limit: self.limits.max_message_bytes,
            });
        }
        let receipt = Receipt {
            task_id: task.id,
            exchange: self.topology.tasks_exchange.clone(),
            bytes: body.len(),
        };
        let message = task_message(&self.topology, task, body, options.traceparent.as_deref());
        Ok((message, receipt))
    }
}

/// The creation time a UUIDv7 task id carries; refuses ids that cannot be
/// tasks (other UUID versions, future times).
fn created_at(task_id: TaskId) -> Result<chrono::DateTime<chrono::Utc>, CancelError> {
    let unknown = |why: &str| CancelError::Unknown {
        task_id,
        why: why.to_owned(),
    };
    if task_id.get_version_num() != 7 {
        return Err(unknown("task ids are UUIDv7"));
    }
    let (secs, nanos) = task_id
        .get_timestamp()
        .ok_or_else(|| unknown("no timestamp"))?
        .to_unix();
    let t = chrono::DateTime::from_timestamp(i64::try_from(secs).unwrap_or(i64::MAX), nanos)
        .ok_or_else(|| unknown("timestamp out of range"))?;
    if t > chrono::Utc::now() + chrono::Duration::minutes(5) {
        return Err(unknown("its timestamp is in the future"));
    }
    Ok(t)
}

/// The message of a cancellation: `message_id` = the cancel's id, `type` =
/// `sandfleet.cancellation.v1`, to `<p>.cancellations`.
pub fn cancellation_message(
    topology: &Topology,
    cancel: &Cancellation,
    body: Vec<u8>,
) -> OutgoingMessage {
    OutgoingMessage::new(&topology.cancellations_exchange, "", body)
        .message_id(cancel.id.to_string())
        .kind(CANCELLATION_MESSAGE_TYPE)
        .content_type(CONTENT_TYPE)
}

/// The message for attempt 1 of `task` (already encoded as `body`): routing
/// key `task` (`task.<shard>` of its fairness key when the topology has
/// shards, `docs/fairness.md`), `message_id` = task id, `type` =
/// `sandfleet.task.v1`, `x-idempotency-key`, `x-sandfleet-attempt: 1`,
/// `traceparent`.
pub fn task_message(
    topology: &Topology,
    task: &Task,
    body: Vec<u8>,
    traceparent: Option<&str>,
) -> OutgoingMessage {
    let routing_key = topology.routing_key_for(&FairKey::of(task).key);
    OutgoingMessage::new(&topology.tasks_exchange, routing_key, body)
        .message_id(task.id.to_string())
        .kind(TASK_MESSAGE_TYPE)
        .content_type(CONTENT_TYPE)
        .correlation_id(task.replay_of.unwrap_or(task.id).to_string())
        .attempt(1)
        .idempotency_key(task.idempotency_key.clone())
        .traceparent(traceparent)
}
