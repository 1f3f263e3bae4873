//! Replay: which failed builds to send again, and how a replayed task looks.
//!
//! The decisions here are pure. A replayed task is a copy of the original
//! with a new UUIDv7 id, `replay_of` set to the **origin** (see [`origin`]),
//! and the idempotency key `replay:<origin id>:<batch>`. The key is what makes
//! a replay repeatable without duplicates: before sending, the command reads
//! the keys already recorded in the replay ledger (see [`crate::ledger`]) and
//! skips those, unless `--force`.
//!
//! The origin is what the operator means by "this failed build": the task the
//! CI system first sent. A replay that fails again produces a result for the
//! replay's own id; replaying that result must be recognised as the same
//! build, or the same command run twice sends everything twice. So a replay
//! of a replay points at the same origin (`replay_of` is never a replay's id)
//! and gets the same key.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sandfleet_gateway::allowlist::Allowlist;
use sandfleet_proto::{Outcome, Task, TaskId, TaskResult};
use uuid::Uuid;

/// Label set on a replayed task: the batch key.
pub const LABEL_REPLAY_BATCH: &str = "sandfleet.dev/replay-batch";

/// The build a task stands for: the task a replay chain started from. A
/// task that is not a replay is its own origin.
pub fn origin(task: &Task) -> TaskId {
    task.replay_of.unwrap_or(task.id)
}

/// The idempotency key of replaying the build `origin` in `batch`.
pub fn replay_key(origin: TaskId, batch: &str) -> String {
    format!("replay:{origin}:{batch}")
}

/// The replayed copy of `original`: new id, `replay_of` its origin, the
/// origin's key for `batch`, created now.
pub fn replayed_task(original: &Task, batch: &str, now: DateTime<Utc>) -> Task {
    let origin = origin(original);
    let mut task = original.clone();
    task.id = Uuid::now_v7();
    task.replay_of = Some(origin);
    task.idempotency_key = replay_key(origin, batch);
    task.created_at = now;
    task.labels
        .insert(LABEL_REPLAY_BATCH.to_owned(), batch.to_owned());
    task
}

/// What to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    /// Results finished at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Results finished before this instant.
    pub until: Option<DateTime<Utc>>,
    /// Repository patterns (`owner/name`, `owner/*`); empty means any.
    pub repos: Vec<String>,
    /// Final outcomes to replay; empty means every one but `succeeded`.
    pub outcomes: Vec<Outcome>,
    /// Task ids (a task, or the origin of replays); empty means any.
    pub tasks: Vec<TaskId>,
}

impl ReplayFilter {
    fn repo_ok(&self, repository: &str) -> bool {
        self.repos.is_empty() || Allowlist::new(&self.repos).allows(repository)
    }

    /// Whether a task (from the DLQ or a file) is selected. Time and outcome
    /// filters do not apply to a bare task. `--task` selects a task by its
    /// own id or by its origin's (a replay of the build asked for).
    pub fn matches_task(&self, task: &Task) -> bool {
        self.repo_ok(&task.source.repository)
            && (self.tasks.is_empty()
                || self.tasks.contains(&task.id)
                || self.tasks.contains(&origin(task)))
    }

    /// Whether a result is a failed build to replay: final, carrying its task,
    /// with a selected outcome, in the time window, of a selected repository.
    pub fn matches_result(&self, r: &TaskResult) -> bool {
        let Some(task) = r.task.as_deref() else {
            return false;
        };
        let outcome_ok = if self.outcomes.is_empty() {
            !r.outcome.is_success()
        } else {
            self.outcomes.contains(&r.outcome)
        };
        r.is_final
            && outcome_ok
            && self.since.is_none_or(|s| r.finished_at >= s)
            && self.until.is_none_or(|u| r.finished_at < u)
            && self.matches_task(task)
    }
}

/// What happened to one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemStatus {
    /// Enqueued (confirmed) and recorded.
    Sent,
    /// Would be sent (`--dry-run`).
    WouldSend,
    /// Would be refused by the producer's checks (`--dry-run`): the real run
    /// would count it as failed.
    WouldFail,
    /// Skipped: this batch already replayed it.
    AlreadyReplayed,
    /// The enqueue failed.
    Failed,
}

impl ItemStatus {
    /// Short name for output.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemStatus::Sent => "sent",
            ItemStatus::WouldSend => "would_send",
            ItemStatus::WouldFail => "would_fail",
            ItemStatus::AlreadyReplayed => "already_replayed",
            ItemStatus::Failed => "failed",
        }
    }
}

/// Counts for the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// Candidates read from the source.
    pub read: usize,
    /// Candidates the filter selected.
    pub matched: usize,
    /// Tasks enqueued.
    pub sent: usize,
    /// Tasks a dry run would enqueue.
    pub would_send: usize,
    /// Tasks a dry run found the real run would fail to enqueue (invalid).
    pub would_fail: usize,
    /// Skipped because already replayed in this batch.
    pub already_replayed: usize,
    /// Enqueues that failed.
    pub failed: usize,
}

impl Summary {
    /// Counts one item.
    pub fn count(&mut self, s: ItemStatus) {
        match s {
            ItemStatus::Sent => self.sent += 1,
            ItemStatus::WouldSend => self.would_send += 1,
            ItemStatus::WouldFail => self.would_fail += 1,
            ItemStatus::AlreadyReplayed => self.already_replayed += 1,
            ItemStatus::Failed => self.failed += 1,
        }
    }
}

/// Keeps the first candidate of each origin: the results stream holds one
/// final result per task (delivered at least once), and a build that was
/// replayed before has a failed result for each replay too. One run replays
/// each build once.
#[derive(Debug, Default)]
pub struct SeenOriginals(HashSet<TaskId>);

impl SeenOriginals {
    /// True the first time `task`'s origin is seen.
    pub fn first(&mut self, task: &Task) -> bool {
        self.0.insert(origin(task))
    }
}

/// Reads a JSON-lines file of tasks, or of results carrying their task.
/// Blank lines and lines starting with `#` are skipped.
pub fn parse_jsonl(text: &str) -> Result<Vec<Candidate>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("line {}: not JSON: {e}", i + 1))?;
        if value.get("task_id").is_some() {
            let r: TaskResult = serde_json::from_value(value)
                .map_err(|e| format!("line {}: not a result: {e}", i + 1))?;
            out.push(Candidate::Result(Box::new(r)));
        } else {
            let t: Task = serde_json::from_value(value)
                .map_err(|e| format!("line {}: not a task: {e}", i + 1))?;
            out.push(Candidate::Task(Box::new(t)));
        }
    }
    Ok(out)
}

/// One thing that may be replayed.
#[derive(Debug, Clone)]
pub enum Candidate {
    /// A task (from the DLQ or a file).
    Task(Box<Task>),
    /// A result carrying its task (from the stream or a file).
    Result(Box<TaskResult>),
}

impl Candidate {
    /// The task to replay when the filter selects this candidate.
    pub fn selected<'a>(&'a self, filter: &ReplayFilter) -> Option<&'a Task> {
        match self {
            Candidate::Task(t) => filter.matches_task(t).then_some(&**t),
            Candidate::Result(r) => {
                if filter.matches_result(r) {
                    r.task.as_deref()
                } else {
                    None
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use sandfleet_proto::{Provider, SandboxSpec, Source};

    fn task(repo: &str) -> Task {
        Task::fix_attempt(
            Source {
                provider: Provider::Api,
                repository: repo.to_owned(),
                commit: "3484a3fb816e0859fd6e1cea078d76385ff50625".to_owned(),
                git_ref: None,
                ci_run_id: None,
                pull_request: None,
                url: None,
            },
            SandboxSpec {
                image: "alpine:3.20".to_owned(),
                resources: Default::default(),
                env: Default::default(),
                deadline_secs: 60,
                pending_timeout_secs: 60,
            },
        )
        .with_step("test", "make test", 60)
    }

    fn result(
        t: &Task,
        outcome: Outcome,
        is_final: bool,
        finished_at: DateTime<Utc>,
    ) -> TaskResult {
        let mut v = serde_json::json!({
            "schema_version": 1, "task_id": t.id, "attempt": 1, "outcome": outcome,
            "final": is_final, "finished_at": finished_at, "worker": "w",
        });
        v["task"] = serde_json::to_value(t).unwrap();
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_replayed_task_is_new_and_points_at_its_original() {
        let orig = task("octo-org/octo-repo");
        let now = Utc::now();
        let r = replayed_task(&orig, "incident-42", now);
        assert_ne!(r.id, orig.id);
        assert_eq!(r.id.get_version_num(), 7);
        assert_eq!(r.replay_of, Some(orig.id));
        assert_eq!(r.idempotency_key, format!("replay:{}:incident-42", orig.id));
        assert_eq!(r.steps, orig.steps);
        assert_eq!(r.labels[LABEL_REPLAY_BATCH], "incident-42");
        // Same original, same batch: same key, so the ledger catches a rerun.
        assert_eq!(
            replayed_task(&orig, "incident-42", now).idempotency_key,
            r.idempotency_key
        );
        assert_ne!(
            replayed_task(&orig, "other", now).idempotency_key,
            r.idempotency_key
        );
    }

    #[test]
    fn a_replay_of_a_replay_stands_for_the_same_build() {
        let orig = task("octo-org/octo-repo");
        let now = Utc::now();
        let first = replayed_task(&orig, "b", now);
        let second = replayed_task(&first, "b", now);
        let third = replayed_task(&second, "other", now);
        assert_eq!(origin(&orig), orig.id);
        for r in [&first, &second, &third] {
            assert_eq!(r.replay_of, Some(orig.id), "points at the origin");
            assert_eq!(origin(r), orig.id);
        }
        // The same batch: the same key, so the ledger recognises it.
        assert_eq!(second.idempotency_key, first.idempotency_key);
        assert_eq!(third.idempotency_key, replay_key(orig.id, "other"));
        // One run replays a build once, whichever of its tasks comes first.
        let mut seen = SeenOriginals::default();
        assert!(seen.first(&first));
        assert!(!seen.first(&orig));
        assert!(!seen.first(&second));
        // --task with the origin's id selects its replays.
        let by_origin = ReplayFilter {
            tasks: vec![orig.id],
            ..Default::default()
        };
        assert!(by_origin.matches_task(&second));
        let by_replay = ReplayFilter {
            tasks: vec![second.id],
            ..Default::default()
        };
        assert!(by_replay.matches_task(&second) && !by_replay.matches_task(&first));
    }

    #[test]
    fn the_result_filter_selects_final_failures_in_the_window_and_repos() {
        let now = Utc::now();
        let hour = chrono::Duration::hours(1);
        let a = task("octo-org/octo-repo");
        let b = task("someone/else");
        let filter = ReplayFilter {
            since: Some(now - hour * 2),
            until: Some(now),
            repos: vec!["octo-org/*".to_owned()],
            ..Default::default()
        };
        assert!(filter.matches_result(&result(&a, Outcome::Failed, true, now - hour)));
        assert!(filter.matches_result(&result(&a, Outcome::TimedOut, true, now - hour)));
        assert!(
            !filter.matches_result(&result(&a, Outcome::Succeeded, true, now - hour)),
            "successes are not replayed"
        );
        assert!(
            !filter.matches_result(&result(&a, Outcome::InfraError, false, now - hour)),
            "retrying is not final"
        );
        assert!(
            !filter.matches_result(&result(&a, Outcome::Failed, true, now - hour * 3)),
            "before --since"
        );
        assert!(
            !filter.matches_result(&result(&a, Outcome::Failed, true, now)),
            "--until is exclusive"
        );
        assert!(
            !filter.matches_result(&result(&b, Outcome::Failed, true, now - hour)),
            "other repository"
        );
        let only_timeouts = ReplayFilter {
            outcomes: vec![Outcome::TimedOut],
            ..Default::default()
        };
        assert!(!only_timeouts.matches_result(&result(&a, Outcome::Failed, true, now)));
        assert!(only_timeouts.matches_result(&result(&a, Outcome::TimedOut, true, now)));
    }

    #[test]
    fn jsonl_reads_tasks_and_results() {
        let t = task("octo-org/octo-repo");
        let r = result(&t, Outcome::Failed, true, Utc::now());
        let text = format!(
            "# failed builds\n{}\n\n{}\n",
            serde_json::to_string(&t).unwrap(),
            serde_json::to_string(&r).unwrap()
        );
        let c = parse_jsonl(&text).unwrap();
        assert_eq!(c.len(), 2);
        let f = ReplayFilter::default();
        assert_eq!(c[0].selected(&f).unwrap().id, t.id);
        assert_eq!(c[1].selected(&f).unwrap().id, t.id);
        let err = parse_jsonl("{\"id\": 1}\n").unwrap_err();
        assert!(err.starts_with("line 1"), "{err}");
    }
}
