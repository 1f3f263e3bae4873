//! Component tests of the dispatch loop: the in-memory broker, a scripted
//! executor (test-only) that models Jobs with deterministic names and
//! adoption, and paused tokio time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use sandfleet_proto::{Limits, Outcome, Provider, SandboxSpec, Source, Task, TaskId, TaskResult};
use sandfleet_sandbox::{ExecError, Execution, Executor, RunContext};
use sandfleet_settings::{RetrySettings, TopologySettings};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::memory::{InMemoryBroker, StoredMessage};
use crate::sink::{MemoryResults, SinkError};

// ---------------------------------------------------------------- executor

/// What one attempt of a scripted task does.
#[derive(Clone, Copy, Debug)]
enum Act {
    /// The sandbox runs `secs` and ends with the outcome.
    Finish(u64, Outcome),
    /// The API fails with this status after `secs`.
    ApiError(u64, u16),
    /// The breaker is open: nothing was sent.
    Unavailable,
}

#[derive(Debug, Clone)]
struct Job {
    ends: Instant,
    act: Act,
    /// Cancelled when the sandbox is deleted (`Executor::cancel`).
    deleted: CancellationToken,
}

/// A scripted executor with Job semantics: attempt `(task, n)` has one
/// sandbox; running it again adopts the existing one (it ends when the
/// first one would), exactly like the Kubernetes executor's create-or-adopt.
#[derive(Default)]
struct Scripted {
    scripts: Mutex<HashMap<TaskId, Vec<Act>>>,
    jobs: Mutex<HashMap<(TaskId, u32), Job>>,
    /// Every run: (task, attempt, adopted).
    runs: Mutex<Vec<(TaskId, u32, bool)>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    cancels: AtomicUsize,
    contexts: Mutex<Vec<RunContext>>,
    /// A deleted Job's run ends `failed` with exit code 137 (its pod was
    /// killed), as a run that watches a Job another worker deletes sees it;
    /// by default it ends `cancelled`, as the deleting worker's own run does.
    deleted_pods_fail: std::sync::atomic::AtomicBool,
}

impl Scripted {
    fn script(&self, id: TaskId, acts: Vec<Act>) {
        self.scripts.lock().unwrap().insert(id, acts);
    }
    fn creates(&self, id: TaskId, attempt: u32) -> usize {
        self.runs
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, a, adopted)| *t == id && *a == attempt && !adopted)
            .count()
    }
    fn runs(&self) -> Vec<(TaskId, u32, bool)> {
        self.runs.lock().unwrap().clone()
    }
}

#[async_trait]
impl Executor for Scripted {
    async fn run(
        &self,
        task: &Task,
        attempt: u32,
        ctx: &RunContext,
    ) -> Result<Execution, ExecError> {
        self.contexts.lock().unwrap().push(ctx.clone());
        let act = {
            let scripts = self.scripts.lock().unwrap();
            let acts = scripts.get(&task.id).cloned().unwrap_or_default();
            acts.get(attempt as usize - 1)
                .or(acts.last())
                .copied()
                .unwrap_or(Act::Finish(1, Outcome::Succeeded))
        };
        if let Act::Unavailable = act {
            return Err(ExecError::Unavailable);
        }
        let (job, adopted) = {
            let mut jobs = self.jobs.lock().unwrap();
            match jobs.get(&(task.id, attempt)) {
                Some(j) => (j.clone(), true),
                None => {
                    let secs = match act {
                        Act::Finish(s, _) | Act::ApiError(s, _) => s,
                        Act::Unavailable => 0,
                    };
                    let j = Job {
                        ends: Instant::now() + Duration::from_secs(secs),
                        act,
                        deleted: CancellationToken::new(),
                    };
                    jobs.insert((task.id, attempt), j.clone());
                    (j, false)
                }
            }
        };
        self.runs.lock().unwrap().push((task.id, attempt, adopted));
        let now_running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now_running, Ordering::SeqCst);
        // Decrement even when the future is dropped (lost delivery, drain).
        struct Running<'a>(&'a AtomicUsize);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _running = Running(&self.running);
        tokio::select! {
            () = tokio::time::sleep_until(job.ends) => {}
            // Deleted under the run, as a cancel does: it ends at once, with
            // the output so far.
            () = job.deleted.cancelled() => {
                if self.deleted_pods_fail.load(Ordering::SeqCst) {
                    return Ok(Execution {
                        outcome: Outcome::Failed,
                        exit_code: Some(137),
                        steps: Vec::new(),
                        log_tail: format!("attempt {attempt} partial\n"),
                        log_truncated: false,
                        artifacts: Vec::new(),
                        started_at: Some(Utc::now()),
                        finished_at: Utc::now(),
                        sandbox: format!("sf-{}-a{attempt}", task.id.simple()),
                        error: Some("step `build` killed (exit 137)".into()),
                        adopted,
                        admission_wait: None,
                    });
                }
                return Ok(Execution {
                    outcome: Outcome::Cancelled,
                    exit_code: None,
                    steps: Vec::new(),
                    log_tail: format!("attempt {attempt} partial\n"),
                    log_truncated: false,
                    artifacts: Vec::new(),
                    started_at: Some(Utc::now()),
                    finished_at: Utc::now(),
                    sandbox: format!("sf-{}-a{attempt}", task.id.simple()),
                    error: Some("the attempt was cancelled".into()),
                    adopted,
                    admission_wait: None,
                });
            }
        }
        match job.act {
            Act::Finish(_, outcome) => Ok(Execution {
                outcome,
                exit_code: Some(if outcome == Outcome::Succeeded { 0 } else { 1 }),
                steps: Vec::new(),
                log_tail: format!("attempt {attempt}\n"),
                log_truncated: false,
                artifacts: Vec::new(),
                started_at: Some(Utc::now()),
                finished_at: Utc::now(),
                sandbox: format!("sf-{}-a{attempt}", task.id.simple()),
                error: (!outcome.is_success()).then(|| outcome.to_string()),
                adopted,
                admission_wait: None,
            }),
            Act::ApiError(_, status) => Err(ExecError::Api {
                verb: "create",
                status: Some(status),
                message: format!("HTTP {status}"),
                retry_after: None,
            }),
            Act::Unavailable => Err(ExecError::Unavailable),
        }
    }

    async fn cancel(&self, task_id: TaskId, attempt: u32) -> Result<(), ExecError> {
        self.cancels.fetch_add(1, Ordering::SeqCst);
        if let Some(job) = self.jobs.lock().unwrap().remove(&(task_id, attempt)) {
            job.deleted.cancel();
        }
        Ok(())
    }
}

// -------------------------------------------------------------------- sink

/// The in-memory results log, with the next `fail` publishes refused, and
/// the next `crash_after` publishes followed by the channel closing (a
/// worker that dies between the result's confirm and the ack).
#[derive(Default, Clone)]
struct FlakySink {
    inner: MemoryResults,
    fail: Arc<AtomicU32>,
    crash_after: Arc<AtomicU32>,
    broker: Option<InMemoryBroker>,
}

#[async_trait]
impl ResultSink for FlakySink {
    async fn publish(
        &self,
        result: &TaskResult,
        traceparent: Option<&str>,
    ) -> Result<(), SinkError> {
        if self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SinkError::new("nack"));
        }
        self.inner.publish(result, traceparent).await?;
        if self
            .crash_after
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
            && let Some(b) = &self.broker
        {
            b.close_channel();
        }
        Ok(())
    }
}

// ----------------------------------------------------------------- harness

fn task() -> Task {
    let mut t = Task::fix_attempt(
        Source {
            provider: Provider::Api,
            repository: "acme/widgets".into(),
            commit: "1c9e7a5b3d2f4e6a8c0b1d3f5e7a9c2b4d6f8e0a".into(),
            git_ref: None,
            ci_run_id: None,
            pull_request: None,
            url: None,
        },
        SandboxSpec {
            image: "docker.io/library/alpine:3.20".into(),
            resources: Default::default(),
            env: BTreeMap::new(),
            deadline_secs: 600,
            pending_timeout_secs: 60,
        },
    )
    .with_step("test", "true", 300);
    t.retry.max_attempts = 3;
    t
}

fn config(concurrency: usize) -> DispatchConfig {
    DispatchConfig {
        concurrency,
        limits: Limits::default(),
        consumer_timeout: Duration::from_secs(1800),
        drain_timeout: Duration::from_secs(30),
        worker: "test-worker".into(),
        retry: RetryConfig::new(
            &RetrySettings {
                base_delay_secs: 10,
                max_delay_secs: 600,
                jitter: 0.0,
                ..RetrySettings::default()
            },
            &TopologySettings {
                retry_delays_secs: vec![10, 60, 300],
                ..TopologySettings::default()
            },
        ),
    }
}

struct Harness {
    broker: InMemoryBroker,
    exec: Arc<Scripted>,
    sink: FlakySink,
    metrics: Arc<Metrics>,
    cancels: Arc<Cancels>,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<DrainReport, DispatchError>>,
}

impl Harness {
    fn start(config: DispatchConfig, broker: InMemoryBroker) -> Harness {
        Harness::start_with(config, broker, false)
    }

    fn start_with(config: DispatchConfig, broker: InMemoryBroker, delete_after: bool) -> Harness {
        let exec = Arc::new(Scripted::default());
        let sink = FlakySink {
            broker: Some(broker.clone()),
            ..FlakySink::default()
        };
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new());
        let shutdown = CancellationToken::new();
        let cancels = Cancels::new();
        let d = Dispatcher::new(
            Arc::new(broker.clone()),
            exec.clone(),
            sink.clone(),
            config,
            metrics.clone(),
            health,
        )
        .delete_sandboxes_after_settle(delete_after)
        .with_cancels(cancels.clone());
        let handle = tokio::spawn(d.run(shutdown.clone()));
        Harness {
            broker,
            exec,
            sink,
            metrics,
            cancels,
            shutdown,
            handle,
        }
    }

    fn results(&self) -> Vec<TaskResult> {
        self.sink.inner.results()
    }

    fn finals(&self, id: TaskId) -> Vec<TaskResult> {
        self.results()
            .into_iter()
            .filter(|r| r.task_id == id && r.is_final)
            .collect()
    }

    /// Waits (in virtual time) until `cond` holds; fails after an hour.
    async fn until(&self, what: &str, cond: impl Fn(&Harness) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(3600);
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) -> DrainReport {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap()
    }
}

fn publish(b: &InMemoryBroker, t: &Task) {
    b.publish_task(t).unwrap();
}

// ------------------------------------------------------------------- tests

#[tokio::test(start_paused = true)]
async fn success_publishes_a_final_result_then_acks() {
    let h = Harness::start(config(2), InMemoryBroker::default());
    let t = task();
    h.exec
        .script(t.id, vec![Act::Finish(5, Outcome::Succeeded)]);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    h.broker.publish(StoredMessage {
        traceparent: Some(tp.into()),
        ..StoredMessage::new(serde_json::to_vec(&t).unwrap())
    });
    h.until("ack", |h| h.broker.acked_count() == 1).await;
    let finals = h.finals(t.id);
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0].outcome, Outcome::Succeeded);
    assert_eq!(finals[0].attempt, 1);
    assert_eq!(finals[0].worker, "test-worker");
    assert!(finals[0].sandbox.as_deref().unwrap().starts_with("sf-"));
    // The trace context reached the sandbox and the result.
    assert_eq!(
        h.exec.contexts.lock().unwrap()[0].traceparent.as_deref(),
        Some(tp)
    );
    assert_eq!(h.sink.inner.all()[0].traceparent.as_deref(), Some(tp));
    assert!(
        h.metrics
            .encode()
            .contains("sandfleet_tasks_total{outcome=\"succeeded\"} 1")
    );
    assert!(h.broker.is_idle());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_step_is_final_on_the_first_attempt() {
    let h = Harness::start(config(2), InMemoryBroker::default());
    let t = task();
    h.exec.script(t.id, vec![Act::Finish(2, Outcome::Failed)]);
    publish(&h.broker, &t);
    h.until("ack", |h| h.broker.acked_count() == 1).await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(h.exec.runs().len(), 1, "no retry of a task failure");
    let finals = h.finals(t.id);
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0].outcome, Outcome::Failed);
    assert!(h.broker.dead_letters().is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn eviction_retries_with_backoff_then_dead_letters_with_a_final_result() {
    let h = Harness::start(config(2), InMemoryBroker::default());
    let t = task(); // max_attempts 3
    h.exec.script(t.id, vec![Act::Finish(1, Outcome::Evicted)]);
    let start = Instant::now();
    publish(&h.broker, &t);
    h.until("dead letter", |h| !h.broker.dead_letters().is_empty())
        .await;
    let elapsed = start.elapsed();
    // 3 runs of 1 s, backoffs 10 s then 20 s (jitter 0).
    assert!(
        elapsed >= Duration::from_secs(33),
        "retries waited their delays: {elapsed:?}"
    );
    let runs = h.exec.runs();
    assert_eq!(
        runs.iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "one new attempt per retry"
    );
    let results = h.results();
    assert_eq!(results.len(), 3);
    assert!(!results[0].is_final && !results[1].is_final);
    assert_eq!(results[0].outcome, Outcome::Evicted);
    let last = &results[2];
    assert!(last.is_final);
    assert_eq!(last.attempt, 3);
    assert!(
        last.error
            .as_deref()
            .unwrap()
            .contains("gave up after 3 attempts"),
        "{:?}",
        last.error
    );
    let dead = h.broker.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].code, MAX_ATTEMPTS_CODE);
    let text = h.metrics.encode();
    assert!(text.contains("sandfleet_task_retries_total 2"), "{text}");
    assert!(text.contains("sandfleet_tasks_dead_lettered_total 1"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_api_error_that_escapes_is_a_new_attempt_and_a_recovery_is_final() {
    let h = Harness::start(config(2), InMemoryBroker::default());
    let t = task();
    h.exec.script(
        t.id,
        vec![Act::ApiError(0, 503), Act::Finish(1, Outcome::Succeeded)],
    );
    publish(&h.broker, &t);
    h.until("final", |h| !h.finals(t.id).is_empty()).await;
    let r = h.results();
    assert_eq!(r.len(), 2);
    assert_eq!(
        (r[0].attempt, r[0].outcome, r[0].is_final),
        (1, Outcome::InfraError, false)
    );
    assert_eq!(
        (r[1].attempt, r[1].outcome, r[1].is_final),
        (2, Outcome::Succeeded, true)
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn bad_messages_are_dead_lettered_with_reasons_and_the_worker_keeps_going() {
    let h = Harness::start(config(2), InMemoryBroker::default());
    let id: TaskId = "0193a6d2-9c44-7e11-b8d0-51f2a3b4c5d6".parse().unwrap();
    let mut unknown = serde_json::to_value(task()).unwrap();
    unknown["schema_version"] = 2.into();
    unknown["id"] = id.to_string().into();
    let mut invalid = task();
    invalid.steps[0].timeout_secs = 0;
    invalid.sandbox.image = String::new();
    let oversize = vec![b' '; Limits::default().max_message_bytes + 1];
    for body in [
        b"{not json".to_vec(),
        serde_json::to_vec(&unknown).unwrap(),
        oversize,
        serde_json::to_vec(&invalid).unwrap(),
    ] {
        h.broker.publish(StoredMessage::new(body));
    }
    let good = task();
    publish(&h.broker, &good);
    h.until("good task acked", |h| h.broker.acked_count() == 1)
        .await;
    h.until("4 dead letters", |h| h.broker.dead_letters().len() == 4)
        .await;
    let mut codes: Vec<String> = h
        .broker
        .dead_letters()
        .iter()
        .map(|d| d.code.clone())
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            "invalid",
            "malformed_json",
            "oversize",
            "unknown_schema_version"
        ]
    );
    assert!(h.broker.dead_letters().iter().all(|d| !d.reason.is_empty()));
    // `rejected` results for the two whose id was readable.
    let rejected: Vec<TaskId> = h
        .results()
        .iter()
        .filter(|r| r.outcome == Outcome::Rejected)
        .map(|r| r.task_id)
        .collect();
    assert_eq!(rejected.len(), 2);
    assert!(rejected.contains(&id) && rejected.contains(&invalid.id));
    assert_eq!(h.exec.runs().len(), 1, "only the good task ran");
    assert!(
        h.metrics
            .encode()
            .contains("sandfleet_tasks_rejected_total{reason=\"oversize\"} 1")
    );
    assert!(
        h.metrics
            .encode()
            .contains("sandfleet_tasks_total{outcome=\"rejected\"} 2")
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_deadline_longer_than_the_consumer_timeout_is_refused() {
    let mut c = config(1);
    c.consumer_timeout = Duration::from_secs(600);
    let h = Harness::start(c, InMemoryBroker::default());
    let t = task(); // 600 s deadline + 60 s pending > 600 - 60
    publish(&h.broker, &t);
    h.until("dead letter", |h| h.broker.dead_letters().len() == 1)
        .await;
    let dead = &h.broker.dead_letters()[0];
    assert_eq!(dead.code, DEADLINE_TOO_LONG_CODE);
    assert!(dead.reason.contains("consumer timeout"), "{}", dead.reason);
    let finals = h.finals(t.id);
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0].outcome, Outcome::Rejected);
    assert!(h.exec.runs().is_empty(), "never ran");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_result_publish_releases_and_the_redelivery_adopts_the_job() {
    let h = Harness::start(config(1), InMemoryBroker::default());
    h.sink.fail.store(1, Ordering::SeqCst);
    let t = task();
    h.exec
        .script(t.id, vec![Act::Finish(5, Outcome::Succeeded)]);
    publish(&h.broker, &t);
    h.until("ack", |h| h.broker.acked_count() == 1).await;
    let runs = h.exec.runs();
    assert_eq!(runs, vec![(t.id, 1, false), (t.id, 1, true)]);
    assert_eq!(h.exec.creates(t.id, 1), 1, "one Job for the attempt");
    assert_eq!(h.finals(t.id).len(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_closed_channel_forgets_deliveries_and_redeliveries_adopt_their_jobs() {
    let h = Harness::start(config(4), InMemoryBroker::default());
    let tasks: Vec<Task> = (0..3).map(|_| task()).collect();
    for t in &tasks {
        h.exec
            .script(t.id, vec![Act::Finish(20, Outcome::Succeeded)]);
        publish(&h.broker, t);
    }
    h.until("3 running", |h| h.exec.running.load(Ordering::SeqCst) == 3)
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    h.broker.close_channel();
    h.until("3 acks", |h| h.broker.acked_count() == 3).await;
    for t in &tasks {
        assert_eq!(h.exec.creates(t.id, 1), 1, "no duplicate Job");
        assert_eq!(h.finals(t.id).len(), 1, "one final result");
    }
    assert_eq!(h.exec.cancels.load(Ordering::SeqCst), 0, "no Job deleted");
    // The adopted runs ended when the original Jobs did.
    assert!(h.broker.is_idle());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn concurrency_is_capped() {
    let h = Harness::start(config(3), InMemoryBroker::default());
    for _ in 0..10 {
        let t = task();
        h.exec
            .script(t.id, vec![Act::Finish(3, Outcome::Succeeded)]);
        publish(&h.broker, &t);
    }
    h.until("10 acks", |h| h.broker.acked_count() == 10).await;
    assert_eq!(h.exec.max_running.load(Ordering::SeqCst), 3);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_then_releases_what_outlives_the_deadline() {
    let mut c = config(4);
    c.drain_timeout = Duration::from_secs(30);
    let h = Harness::start(c, InMemoryBroker::default());
    let short = task();
    let long = task();
    h.exec
        .script(short.id, vec![Act::Finish(10, Outcome::Succeeded)]);
    h.exec
        .script(long.id, vec![Act::Finish(300, Outcome::Succeeded)]);
    publish(&h.broker, &short);
    publish(&h.broker, &long);
    h.until("2 running", |h| h.exec.running.load(Ordering::SeqCst) == 2)
        .await;
    let queued = task();
    let start = Instant::now();
    h.shutdown.cancel();
    publish(&h.broker, &queued);
    let broker = h.broker.clone();
    let exec = h.exec.clone();
    let sink = h.sink.inner.clone();
    let report = h.handle.await.unwrap().unwrap();
    assert!(start.elapsed() >= Duration::from_secs(30));
    assert!(start.elapsed() < Duration::from_secs(40));
    assert_eq!(report.released, 1);
    // The short task finished within the drain; the long one was handed back
    // with its Job left running; the queued one was never taken.
    assert_eq!(
        sink.results()
            .iter()
            .filter(|r| r.task_id == short.id)
            .count(),
        1
    );
    assert!(sink.results().iter().all(|r| r.task_id != long.id));
    assert_eq!(exec.cancels.load(Ordering::SeqCst), 0);
    assert!(exec.runs().iter().all(|r| r.0 != queued.id));
    assert_eq!(broker.ready_len(), 2);
    assert_eq!(broker.unacked_len(), 0);
    // Another worker picks the long task up and adopts its running Job.
    let h2 = Harness::start(config(4), broker.clone());
    *h2.exec.jobs.lock().unwrap() = exec.jobs.lock().unwrap().clone();
    h2.exec
        .scripts
        .lock()
        .unwrap()
        .extend(exec.scripts.lock().unwrap().clone());
    h2.until("all acked", |h| h.broker.acked_count() == 3).await;
    assert!(h2.exec.runs().contains(&(long.id, 1, true)), "adopted");
    assert_eq!(h2.finals(long.id).len(), 1);
    h2.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_releases_the_task_without_spending_an_attempt() {
    let h = Harness::start(config(1), InMemoryBroker::default());
    let t = task();
    h.exec.script(t.id, vec![Act::Unavailable]);
    publish(&h.broker, &t);
    h.until("released", |h| h.exec.contexts.lock().unwrap().len() >= 2)
        .await;
    assert!(
        h.results().is_empty(),
        "no result for an attempt that never ran"
    );
    assert!(h.broker.dead_letters().is_empty());
    // The breaker closes: the same attempt 1 runs.
    h.exec
        .script(t.id, vec![Act::Finish(1, Outcome::Succeeded)]);
    h.until("final", |h| !h.finals(t.id).is_empty()).await;
    assert_eq!(h.finals(t.id)[0].attempt, 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn releases_past_the_delivery_limit_dead_letter_nothing() {
    // Far more "try again later" than the queue's limit allows returns.
    let h = Harness::start(config(1), InMemoryBroker::new(Some(2)));
    let t = task();
    h.exec.script(t.id, vec![Act::Unavailable; 12]);
    publish(&h.broker, &t);
    h.until("released a dozen times", |h| {
        h.exec.contexts.lock().unwrap().len() >= 12
    })
    .await;
    assert!(h.broker.dead_letters().is_empty());
    h.exec
        .script(t.id, vec![Act::Finish(1, Outcome::Succeeded)]);
    h.until("final", |h| !h.finals(t.id).is_empty()).await;
    assert_eq!(h.finals(t.id)[0].attempt, 1);
    assert!(
        h.metrics
            .encode()
            .contains("sandfleet_task_releases_total 12")
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_last_delivery_the_limit_allows_ends_with_a_result_instead_of_a_run() {
    let broker = InMemoryBroker::new(Some(2));
    let t = task();
    publish(&broker, &t);
    // Two workers died holding it.
    for _ in 0..2 {
        let _held = broker.next_delivery().await.unwrap();
        broker.close_channel();
    }
    let h = Harness::start(config(1), broker);
    h.until("dead-lettered", |h| !h.broker.dead_letters().is_empty())
        .await;
    let dead = h.broker.dead_letters();
    assert_eq!(dead[0].code, DELIVERY_LIMIT_CODE);
    assert!(
        dead[0].reason.contains("delivered 3 times"),
        "{}",
        dead[0].reason
    );
    let f = h.finals(t.id);
    assert_eq!((f.len(), f[0].outcome), (1, Outcome::InfraError));
    assert!(h.exec.runs().is_empty(), "not run a third time");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn two_deliveries_of_one_attempt_run_one_after_the_other_and_adopt() {
    let h = Harness::start(config(4), InMemoryBroker::default());
    let t = task();
    h.exec
        .script(t.id, vec![Act::Finish(10, Outcome::Succeeded)]);
    // A producer retry published it twice (or a redelivery raced the
    // worker noticing its channel died).
    publish(&h.broker, &t);
    publish(&h.broker, &t);
    h.until("2 acks", |h| h.broker.acked_count() == 2).await;
    assert_eq!(h.exec.runs(), vec![(t.id, 1, false), (t.id, 1, true)]);
    assert_eq!(
        h.exec.max_running.load(Ordering::SeqCst),
        1,
        "never two handlers on one attempt at once"
    );
    let finals = h.finals(t.id);
    assert_eq!(finals.len(), 2, "a duplicate of the same final result");
    assert!(
        finals
            .iter()
            .all(|r| r.attempt == 1 && r.outcome == Outcome::Succeeded)
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_between_result_and_ack_adopts_the_kept_sandbox_instead_of_rerunning() {
    let h = Harness::start_with(config(2), InMemoryBroker::default(), true);
    h.sink.crash_after.store(1, Ordering::SeqCst);
    let t = task();
    h.exec.script(t.id, vec![Act::Finish(30, Outcome::Failed)]);
    publish(&h.broker, &t);
    h.until("ack", |h| h.broker.acked_count() == 1).await;
    // The first run published its result, then its channel died before the
    // ack. The redelivery found the finished sandbox and adopted it.
    assert_eq!(h.exec.runs(), vec![(t.id, 1, false), (t.id, 1, true)]);
    assert_eq!(h.exec.creates(t.id, 1), 1, "not run a second time");
    let finals = h.finals(t.id);
    assert_eq!(finals.len(), 2);
    assert!(
        finals
            .iter()
            .all(|r| r.attempt == 1 && r.outcome == Outcome::Failed)
    );
    // Deleted once, after the ack.
    h.until("the delete", |h| h.exec.cancels.load(Ordering::SeqCst) >= 1)
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.exec.cancels.load(Ordering::SeqCst), 1);
    assert!(h.exec.jobs.lock().unwrap().is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_waiting_duplicate_keeps_the_sandbox_until_it_has_adopted_it() {
    let h = Harness::start_with(config(4), InMemoryBroker::default(), true);
    let t = task();
    h.exec
        .script(t.id, vec![Act::Finish(10, Outcome::Succeeded)]);
    publish(&h.broker, &t);
    publish(&h.broker, &t);
    h.until("2 acks", |h| h.broker.acked_count() == 2).await;
    h.until("the delete", |h| h.exec.cancels.load(Ordering::SeqCst) >= 1)
        .await;
    assert_eq!(h.exec.runs(), vec![(t.id, 1, false), (t.id, 1, true)]);
    assert_eq!(h.exec.creates(t.id, 1), 1);
    assert_eq!(
        h.exec.cancels.load(Ordering::SeqCst),
        1,
        "deleted once, by the last"
    );
    h.stop().await;
}

// ------------------------------------------------------------ cancellation

#[tokio::test(start_paused = true)]
async fn a_task_cancelled_while_queued_never_runs_and_ends_cancelled_once() {
    let h = Harness::start(config(2), InMemoryBroker::default());
    let t = task();
    h.cancels.apply(sandfleet_proto::Cancellation::task(
        t.id,
        "ops",
        "runaway batch",
    ));
    publish(&h.broker, &t);
    h.until("ack", |h| h.broker.acked_count() == 1).await;
    assert!(h.exec.runs().is_empty(), "a cancelled task started");
    let finals = h.finals(t.id);
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0].outcome, Outcome::Cancelled);
    assert_eq!(
        finals[0].error.as_deref(),
        Some("cancelled by ops: runaway batch")
    );
    assert_eq!(finals[0].cancellation.as_ref().unwrap().by, "ops");
    assert!(
        h.metrics
            .encode()
            .contains("sandfleet_tasks_cancelled_total{stage=\"before_start\"} 1")
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_cancel_stops_the_running_sandbox_and_the_result_keeps_its_output() {
    let h = Harness::start(config(2), InMemoryBroker::default());
    let t = task();
    h.exec
        .script(t.id, vec![Act::Finish(3600, Outcome::Succeeded)]);
    publish(&h.broker, &t);
    h.until("running", |h| h.exec.running.load(Ordering::SeqCst) == 1)
        .await;
    let asked = Instant::now();
    h.cancels.apply(sandfleet_proto::Cancellation::task(
        t.id,
        "alice",
        "wrong commit",
    ));
    h.until("ack", |h| h.broker.acked_count() == 1).await;
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    assert!(
        h.exec.cancels.load(Ordering::SeqCst) >= 1,
        "sandbox not deleted"
    );
    let finals = h.finals(t.id);
    assert_eq!(finals.len(), 1, "{finals:#?}");
    assert_eq!(finals[0].outcome, Outcome::Cancelled);
    assert_eq!(finals[0].log_tail, "attempt 1 partial\n");
    assert!(h.results().iter().all(|r| r.task_id != t.id || r.is_final));
    assert!(
        h.metrics
            .encode()
            .contains("sandfleet_tasks_cancelled_total{stage=\"running\"} 1")
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_task_cancelled_in_the_retry_delay_ends_cancelled_when_it_comes_back() {
    let h = Harness::start(config(2), InMemoryBroker::default());
    let t = task();
    h.exec.script(
        t.id,
        vec![Act::ApiError(1, 500), Act::Finish(1, Outcome::Succeeded)],
    );
    publish(&h.broker, &t);
    h.until("retry", |h| {
        h.results().iter().any(|r| r.task_id == t.id && !r.is_final)
    })
    .await;
    h.cancels
        .apply(sandfleet_proto::Cancellation::task(t.id, "ops", "moot"));
    h.until("final", |h| !h.finals(t.id).is_empty()).await;
    h.until("ack", |h| h.broker.acked_count() == 2).await;
    let finals = h.finals(t.id);
    assert_eq!(finals.len(), 1);
    assert_eq!(
        (finals[0].outcome, finals[0].attempt),
        (Outcome::Cancelled, 2)
    );
    assert_eq!(
        h.exec.creates(t.id, 2),
        0,
        "attempt 2 started after the cancel"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_newer_task_with_the_same_supersede_key_cancels_the_older_running_one() {
    let h = Harness::start(config(2), InMemoryBroker::default());
    let mut older = task();
    older.supersede_key = Some("github:acme/widgets:ref:main".into());
    older.created_at -= chrono::Duration::seconds(30);
    let mut newer = task();
    newer.supersede_key = older.supersede_key.clone();
    for t in [&older, &newer] {
        h.exec
            .script(t.id, vec![Act::Finish(60, Outcome::Succeeded)]);
    }
    publish(&h.broker, &older);
    h.until("older running", |h| {
        h.exec.running.load(Ordering::SeqCst) == 1
    })
    .await;
    publish(&h.broker, &newer);
    h.cancels
        .apply(sandfleet_proto::Cancellation::supersede_by(&newer).unwrap());
    h.until("both final", |h| {
        h.finals(older.id).len() == 1 && h.finals(newer.id).len() == 1
    })
    .await;
    let old = &h.finals(older.id)[0];
    assert_eq!(old.outcome, Outcome::Cancelled);
    assert_eq!(
        old.cancellation.as_ref().unwrap().superseded_by,
        Some(newer.id)
    );
    assert_eq!(h.finals(newer.id)[0].outcome, Outcome::Succeeded);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_task_that_finished_before_its_cancel_keeps_its_own_result() {
    let h = Harness::start(config(1), InMemoryBroker::default());
    let t = task();
    h.exec.script(t.id, vec![Act::Finish(1, Outcome::Failed)]);
    publish(&h.broker, &t);
    h.until("ack", |h| h.broker.acked_count() == 1).await;
    h.cancels
        .apply(sandfleet_proto::Cancellation::task(t.id, "ops", "late"));
    let finals = h.finals(t.id);
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0].outcome, Outcome::Failed);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_redelivery_whose_job_another_worker_deleted_for_a_cancel_ends_cancelled_not_failed() {
    let h = Harness::start(config(2), InMemoryBroker::default());
    let t = task();
    h.exec
        .script(t.id, vec![Act::Finish(600, Outcome::Succeeded)]);
    h.exec.deleted_pods_fail.store(true, Ordering::SeqCst);
    publish(&h.broker, &t);
    h.until("running", |h| h.exec.running.load(Ordering::SeqCst) == 1)
        .await;
    // The first holder's channel dies; the redelivery adopts its Job.
    h.broker.close_channel();
    h.until("adopted", |h| {
        h.exec.runs().iter().any(|(_, _, adopted)| *adopted)
            && h.exec.running.load(Ordering::SeqCst) == 1
    })
    .await;
    // The first holder, not yet aware that it lost the delivery, reads the
    // cancel and deletes the Job: this worker sees the pod killed (137) in
    // the same instant as the cancel, and the run's end is polled first.
    h.exec.cancel(t.id, 1).await.unwrap();
    h.cancels
        .apply(sandfleet_proto::Cancellation::task(t.id, "ops", "moot"));
    h.until("ack", |h| h.broker.acked_count() == 1).await;
    let finals = h.finals(t.id);
    assert_eq!(finals.len(), 1, "one final result: {finals:?}");
    assert_eq!(finals[0].outcome, Outcome::Cancelled);
    assert_eq!(finals[0].exit_code, None);
    assert_eq!(finals[0].error.as_deref(), Some("cancelled by ops: moot"));
    assert_eq!(
        finals[0].log_tail, "attempt 1 partial\n",
        "partial log kept"
    );
    assert!(
        h.results().iter().all(|r| r.outcome != Outcome::Failed),
        "no failed result published"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_cancel_known_when_the_attempt_succeeds_loses() {
    let h = Harness::start(config(1), InMemoryBroker::default());
    let t = task();
    h.exec
        .script(t.id, vec![Act::Finish(5, Outcome::Succeeded)]);
    publish(&h.broker, &t);
    h.until("running", |h| h.exec.running.load(Ordering::SeqCst) == 1)
        .await;
    // The run ends at 5 s and the cancel is applied in the same instant:
    // whether the dispatch loop sees it just before or just after the
    // run's end, the success stands.
    tokio::time::sleep_until(Instant::now() + Duration::from_secs(5)).await;
    h.cancels
        .apply(sandfleet_proto::Cancellation::task(t.id, "ops", "late"));
    h.until("ack", |h| h.broker.acked_count() == 1).await;
    let finals = h.finals(t.id);
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0].outcome, Outcome::Succeeded);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn no_task_is_taken_until_the_cancellations_stream_is_read_to_its_tail() {
    let broker = InMemoryBroker::default();
    let exec = Arc::new(Scripted::default());
    let sink = FlakySink {
        broker: Some(broker.clone()),
        ..FlakySink::default()
    };
    let health = Arc::new(Health::new());
    health.set_broker_connected(true);
    let cancels = Cancels::fed_from_stream();
    let shutdown = CancellationToken::new();
    let d = Dispatcher::new(
        Arc::new(broker.clone()),
        exec.clone(),
        sink.clone(),
        config(2),
        Arc::new(Metrics::new()),
        health.clone(),
    )
    .with_cancels(cancels.clone());
    let handle = tokio::spawn(d.run(shutdown.clone()));
    let t = task();
    exec.script(t.id, vec![Act::Finish(5, Outcome::Succeeded)]);
    publish(&broker, &t);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        exec.runs().is_empty(),
        "a task ran before the index caught up"
    );
    assert_eq!(broker.acked_count(), 0);
    assert_eq!(
        health.readiness(),
        Err(vec![
            "cancellations stream not read up to its tail yet".to_owned()
        ])
    );
    // A cancel read during the catch-up is honoured once tasks are taken.
    cancels.apply(sandfleet_proto::Cancellation::task(t.id, "ops", "stale"));
    cancels.caught_up_without_stream();
    let deadline = Instant::now() + Duration::from_secs(3600);
    while broker.acked_count() == 0 {
        assert!(Instant::now() < deadline, "the task was never taken");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(exec.runs().is_empty(), "a cancelled task started");
    assert_eq!(health.readiness(), Ok(()));
    let finals: Vec<_> = sink
        .inner
        .results()
        .into_iter()
        .filter(|r| r.is_final)
        .collect();
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0].outcome, Outcome::Cancelled);
    shutdown.cancel();
    handle.await.unwrap().unwrap();
}

/// An executor whose attempts take 2.5 ms (building the Job) before their
/// create request goes through the worker's gate, then retry it once.
struct GatedCreate {
    gate: crate::gate::BreakerGate,
}

#[async_trait]
impl Executor for GatedCreate {
    async fn run(
        &self,
        task: &Task,
        attempt: u32,
        _ctx: &RunContext,
    ) -> Result<Execution, ExecError> {
        use sandfleet_sandbox::ApiGate;
        tokio::time::sleep(Duration::from_micros(2500)).await;
        self.gate.permit("create").unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.gate.permit("create").unwrap();
        self.gate.permit("delete").unwrap();
        Ok(succeeded(task, attempt))
    }

    async fn cancel(&self, _: TaskId, _: u32) -> Result<(), ExecError> {
        Ok(())
    }
}

/// A dispatcher with `exec` over an in-memory broker and results, 4 tasks
/// at once, the cancellations of `cancels` (none: the dispatcher's own).
struct Plain {
    broker: InMemoryBroker,
    sink: MemoryResults,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<DrainReport, DispatchError>>,
}

impl Plain {
    fn start<E: Executor>(
        exec: Arc<E>,
        metrics: Arc<Metrics>,
        cancels: Option<Arc<Cancels>>,
    ) -> Plain {
        let broker = InMemoryBroker::default();
        let sink = MemoryResults::default();
        let shutdown = CancellationToken::new();
        let mut d = Dispatcher::new(
            Arc::new(broker.clone()),
            exec,
            sink.clone(),
            config(4),
            metrics,
            Arc::new(Health::new()),
        );
        if let Some(cancels) = cancels {
            d = d.with_cancels(cancels);
        }
        let handle = tokio::spawn(d.run(shutdown.clone()));
        Plain {
            broker,
            sink,
            shutdown,
            handle,
        }
    }

    /// Waits (in virtual time) until `n` deliveries were acked.
    async fn acked(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.broker.acked_count() < n {
            assert!(Instant::now() < deadline, "tasks not acked");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn the_time_from_delivery_to_the_sandbox_create_is_measured_once_per_attempt() {
    let metrics = Arc::new(Metrics::new());
    let gate = crate::gate::BreakerGate::new(
        crate::breaker::BreakerConfig::from(&sandfleet_settings::BreakerSettings::default()),
        metrics.clone(),
    );
    let p = Plain::start(Arc::new(GatedCreate { gate }), metrics.clone(), None);
    for _ in 0..2 {
        publish(&p.broker, &task());
    }
    p.acked(2).await;
    let text = metrics.encode();
    for needle in [
        "sandfleet_dispatch_duration_seconds_count 2",
        "sandfleet_dispatch_duration_seconds_bucket{le=\"0.002\"} 0",
        "sandfleet_dispatch_duration_seconds_bucket{le=\"0.003\"} 2",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    p.stop().await;
}

/// A run that succeeded at once, with no steps.
fn succeeded(task: &Task, attempt: u32) -> Execution {
    let now = Utc::now();
    Execution {
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        steps: Vec::new(),
        log_tail: String::new(),
        log_truncated: false,
        artifacts: Vec::new(),
        started_at: Some(now),
        finished_at: now,
        sandbox: format!("sf-{}-{attempt}", task.id),
        error: None,
        adopted: false,
        admission_wait: None,
    }
}

/// An executor that readies its sandbox while the clearance is pending, as
/// the local executor does, and records what became of each.
#[derive(Default)]
struct Readying {
    events: Mutex<Vec<(TaskId, &'static str)>>,
}

impl Readying {
    fn of(&self, id: TaskId) -> Vec<&'static str> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter(|(t, _)| *t == id)
            .map(|(_, e)| *e)
            .collect()
    }

    fn record(&self, id: TaskId, what: &'static str) {
        self.events.lock().unwrap().push((id, what));
    }
}

#[async_trait]
impl Executor for Readying {
    async fn run(
        &self,
        task: &Task,
        attempt: u32,
        _ctx: &RunContext,
    ) -> Result<Execution, ExecError> {
        self.record(task.id, "ran");
        Ok(succeeded(task, attempt))
    }

    async fn run_when_cleared(
        &self,
        task: &Task,
        attempt: u32,
        clearance: sandfleet_sandbox::Clearance<'_>,
    ) -> Option<Result<Execution, ExecError>> {
        self.record(task.id, "readied");
        let Some(ctx) = clearance.await else {
            self.record(task.id, "refused");
            return None;
        };
        Some(self.run(task, attempt, &ctx).await)
    }

    async fn cancel(&self, _: TaskId, _: u32) -> Result<(), ExecError> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_sandbox_readied_during_the_barrier_is_refused_its_start_when_a_cancel_was_read() {
    let exec = Arc::new(Readying::default());
    let metrics = Arc::new(Metrics::new());
    let cancels = Cancels::new();
    let p = Plain::start(exec.clone(), metrics.clone(), Some(cancels.clone()));
    let (cancelled, kept) = (task(), task());
    cancels.apply(sandfleet_proto::Cancellation::task(
        cancelled.id,
        "ops",
        "wrong commit",
    ));
    publish(&p.broker, &cancelled);
    publish(&p.broker, &kept);
    p.acked(2).await;
    assert_eq!(exec.of(cancelled.id), ["readied", "refused"]);
    assert_eq!(exec.of(kept.id), ["readied", "ran"]);
    let finals: Vec<_> = p
        .sink
        .results()
        .into_iter()
        .filter(|r| r.is_final)
        .collect();
    let outcome = |id| finals.iter().find(|r| r.task_id == id).map(|r| r.outcome);
    assert_eq!(outcome(cancelled.id), Some(Outcome::Cancelled));
    assert_eq!(outcome(kept.id), Some(Outcome::Succeeded));
    assert!(
        metrics
            .encode()
            .contains("sandfleet_tasks_cancelled_total{stage=\"before_start\"} 1")
    );
    p.stop().await;
}
