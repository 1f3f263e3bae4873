//! One replay batch: sends each selected build once, skips the builds the
//! batch already replayed (read from the [`ReplayLedger`] when it starts),
//! and records what it sent. The CLI's `replay` and the console's replay
//! form both send through it, so they are idempotent in the same way.

use std::collections::HashSet;

use chrono::Utc;
use sandfleet_gateway::TaskSink;
use sandfleet_producer::Producer;
use sandfleet_proto::Task;

use crate::OpsError;
use crate::ledger::ReplayLedger;
use crate::replay::{ItemStatus, SeenOriginals, origin, replay_key, replayed_task};

/// What happened to one candidate.
#[derive(Debug, Clone)]
pub struct Replayed {
    /// Sent, skipped, would be sent, failed.
    pub status: ItemStatus,
    /// The replayed task (its id is only real when `status` is `Sent`).
    pub task: Task,
    /// Why the enqueue failed, or why a dry run says it would fail.
    pub error: Option<String>,
    /// The task was enqueued but its ledger record could not be written: a
    /// rerun of the batch may send it again.
    pub unrecorded: Option<String>,
}

/// A replay batch in progress.
#[derive(Debug)]
pub struct ReplayBatch<'a> {
    ledger: &'a ReplayLedger,
    batch: String,
    done: HashSet<String>,
    seen: SeenOriginals,
}

impl<'a> ReplayBatch<'a> {
    /// Starts batch `batch`: reads the keys already recorded, unless `force`
    /// (then every selected build is sent again).
    pub async fn start(
        ledger: &'a ReplayLedger,
        batch: &str,
        force: bool,
    ) -> Result<ReplayBatch<'a>, OpsError> {
        let done = if force {
            HashSet::new()
        } else {
            ledger.keys().await?
        };
        Ok(ReplayBatch {
            ledger,
            batch: batch.to_owned(),
            done,
            seen: SeenOriginals::default(),
        })
    }

    /// The batch key.
    pub fn batch(&self) -> &str {
        &self.batch
    }

    /// True the first time this run sees `task`'s build: one run replays a
    /// build once, whichever of its tasks (origin or replays) comes first.
    pub fn first_of_build(&mut self, task: &Task) -> bool {
        self.seen.first(task)
    }

    /// Whether this batch already replayed `original`'s build (it would be
    /// skipped).
    pub fn already_replayed(&self, original: &Task) -> bool {
        self.done
            .contains(&replay_key(origin(original), &self.batch))
    }

    /// Replays one selected original. With `dry_run`, makes the producer's
    /// checks instead of sending.
    pub async fn one(
        &mut self,
        original: &Task,
        sink: &dyn TaskSink,
        dry_run: Option<&Producer>,
    ) -> Replayed {
        let task = replayed_task(original, &self.batch, Utc::now());
        let mut error = None;
        let mut unrecorded = None;
        let status = if self.done.contains(&task.idempotency_key) {
            ItemStatus::AlreadyReplayed
        } else if let Some(checker) = dry_run {
            // The same checks the real run's enqueue makes, so a dry run
            // reports the tasks it would fail as failing.
            match checker.check(&task) {
                Ok(()) => ItemStatus::WouldSend,
                Err(e) => {
                    error = Some(e.to_string());
                    ItemStatus::WouldFail
                }
            }
        } else {
            match sink.enqueue(&task).await {
                Ok(()) => {
                    if let Err(e) = self.ledger.record(&task, &self.batch).await {
                        unrecorded = Some(e.to_string());
                    }
                    self.done.insert(task.idempotency_key.clone());
                    ItemStatus::Sent
                }
                Err(e) => {
                    error = Some(e.to_string());
                    ItemStatus::Failed
                }
            }
        };
        Replayed {
            status,
            task,
            error,
            unrecorded,
        }
    }
}
