//! The Kubernetes executor: one Job per attempt.
//!
//! [`KubeExecutor::run`] builds the Job ([`job::build`], pure), creates it —
//! or, on 409, adopts the existing Job when its task-id annotation says it is
//! ours — then waits on the shared watcher ([`watch`]) until
//! [`classify::kubernetes`](crate::classify::kubernetes) decides, reads the
//! pod log once (`limitBytes`), and deletes the Job with Background
//! propagation. The steady-state cost is three API requests per task
//! (create, log, delete) plus the shared watch.
//!
//! Every request goes through [`KubeApi`] and so through the worker's
//! [`ApiGate`](crate::ApiGate).

mod api;
pub mod gc;
pub mod job;
mod kueue;
pub(crate) mod watch;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use sandfleet_proto::{Outcome, Task, TaskId};
use sandfleet_settings::KubernetesSettings;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

pub use api::{ApiRetry, KubeApi, REQUIRED_PERMISSIONS, tune_config};
pub use watch::Observed;

use crate::classify::{self, JobView, PodView, Terminated, Verdict};
use crate::executor::{ExecError, Execution, Executor, RunContext};
use crate::report;
use crate::script::{self, Summary};
use job::{LABEL_TASK_ID, MANAGED_SELECTOR, job_name};

/// How long past its deadline an attempt may stay silent on the watch
/// before the executor asks the API directly (a watch that stopped
/// delivering without an error).
const SILENT_WATCH_SLACK: Duration = Duration::from_secs(30);

/// How long a finished Job waits for the pod watch to show its pod's final
/// state before the executor reads the pod directly.
const POD_WATCH_LAG: Duration = Duration::from_secs(2);

/// How long a finished attempt waits for its pod log while the API (or the
/// worker's breaker, or RBAC) refuses the read, before the result says the
/// log was unreadable. It fits inside the 60 s the worker keeps free in the
/// broker's consumer timeout for what follows the sandbox.
pub const LOG_READ_PATIENCE: Duration = Duration::from_secs(45);

/// Runs attempts as Kubernetes Jobs.
#[derive(Clone)]
pub struct KubeExecutor {
    inner: Arc<Inner>,
}

struct Inner {
    api: KubeApi,
    settings: KubernetesSettings,
    hub: Arc<watch::Hub>,
    cancelled: Mutex<HashSet<String>>,
    /// Wakes the runs waiting on their Jobs when one of them is cancelled.
    cancel_wake: tokio::sync::Notify,
    keep_finished: AtomicBool,
    /// The broker's consumer timeout in seconds (0: unknown), which bounds
    /// a Kueue admission wait; see [`KubeExecutor::hold_deliveries_for`].
    hold_budget_secs: AtomicU64,
    _stop: DropGuard,
}

impl std::fmt::Debug for KubeExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeExecutor")
            .field("api", &self.inner.api)
            .finish_non_exhaustive()
    }
}

impl KubeExecutor {
    /// Starts the shared watchers (needs a tokio runtime). They stop when the
    /// last clone of the executor is dropped.
    pub fn new(api: KubeApi, settings: KubernetesSettings) -> KubeExecutor {
        let stop = CancellationToken::new();
        let hub = watch::start(&api, stop.clone());
        KubeExecutor {
            inner: Arc::new(Inner {
                api,
                settings,
                hub,
                cancelled: Mutex::default(),
                cancel_wake: tokio::sync::Notify::new(),
                keep_finished: AtomicBool::new(false),
                hold_budget_secs: AtomicU64::new(0),
                _stop: stop.drop_guard(),
            }),
        }
    }

    /// With `true`, `run` leaves the finished Job in place (its log already
    /// read) instead of deleting it, and the worker deletes it with
    /// [`Executor::cancel`] once the delivery is settled: a worker crash
    /// between publishing the result and acking then makes the redelivery
    /// adopt the finished Job and report it again, instead of running the
    /// task a second time. The Job's TTL removes it if nobody does.
    pub fn keep_finished_jobs(self, keep: bool) -> KubeExecutor {
        self.inner.keep_finished.store(keep, Ordering::Relaxed);
        self
    }

    /// The broker's consumer timeout: how long the worker may hold a task's
    /// delivery. Under Kueue a suspended Job is then given up early enough
    /// for the task's pending timeout and deadline to still fit in it, so
    /// the broker never takes the delivery away mid-run.
    pub fn hold_deliveries_for(self, consumer_timeout: Duration) -> KubeExecutor {
        self.inner
            .hold_budget_secs
            .store(consumer_timeout.as_secs(), Ordering::Relaxed);
        self
    }

    /// Whether finished Jobs are kept (see [`KubeExecutor::keep_finished_jobs`]).
    pub fn keeps_finished_jobs(&self) -> bool {
        self.inner.keep_finished.load(Ordering::Relaxed)
    }

    /// Resolves once the shared watchers have listed Jobs and Pods once (for
    /// a readiness check).
    pub async fn synced(&self) {
        self.inner.hub.wait_synced().await;
    }

    /// The API wrapper (for the worker's own calls and for tests).
    pub fn api(&self) -> &KubeApi {
        &self.inner.api
    }

    /// Deletes orphaned sandfleet Jobs: finished ones not in flight here once
    /// their `ttlSecondsAfterFinished` and one more `gc_interval_secs` have
    /// passed (the TTL controller should have removed them: this covers
    /// clusters where it does not run), and any older than
    /// `orphan_max_age_secs`. Returns the deleted names. The worker calls it
    /// every `gc_interval_secs`.
    ///
    /// A finished Job still present is, as a rule, one whose delivery is not
    /// settled yet (the worker deletes it right after the ack): a worker
    /// crashed between result and ack, or its result publish keeps failing.
    /// Its redelivery must find it and adopt it, however long it waits in the
    /// queue, or the attempt would run a second time; so the collector never
    /// deletes a finished Job before its TTL would.
    pub async fn collect_garbage(&self) -> Result<Vec<String>, ExecError> {
        let jobs = self.inner.api.list_jobs(MANAGED_SELECTOR).await?;
        let facts: Vec<_> = jobs.iter().filter_map(gc::JobFacts::of).collect();
        let s = &self.inner.settings;
        let ttl = u64::try_from(s.ttl_seconds_after_finished).unwrap_or(0);
        let doomed = gc::orphans(
            &facts,
            &self.inner.hub.in_flight(),
            Utc::now(),
            Duration::from_secs(ttl.saturating_add(s.gc_interval_secs)),
            Duration::from_secs(s.orphan_max_age_secs),
        );
        for name in &doomed {
            self.inner.api.delete_job(name).await?;
        }
        if !doomed.is_empty() {
            tracing::info!(count = doomed.len(), "deleted orphaned sandbox jobs");
        }
        Ok(doomed)
    }

    /// Ends a run's subscription to its Job; the last run of the attempt
    /// here also forgets its cancellation. `true` when it was the last.
    fn leave(&self, sub: watch::Subscription, name: &str) -> bool {
        let last = sub.leave();
        if last && let Ok(mut c) = self.inner.cancelled.lock() {
            c.remove(name);
        }
        last
    }

    fn is_cancelled(&self, name: &str) -> bool {
        self.inner.cancelled.lock().is_ok_and(|c| c.contains(name))
    }

    /// Creates the Job, or adopts the one a previous delivery created.
    async fn create_or_adopt(&self, job: &Job, task: &Task) -> Result<(Job, bool), ExecError> {
        let name = job.metadata.name.clone().unwrap_or_default();
        match self.inner.api.create_job(job).await {
            Ok(created) => Ok((created, false)),
            Err(ExecError::Api {
                status: Some(409), ..
            }) => {
                let existing = self.inner.api.get_job(&name).await?.ok_or_else(|| ExecError::Api {
                    verb: "get",
                    status: Some(404),
                    message: format!("job {name} conflicted on create and vanished before it could be adopted"),
                    retry_after: None,
                })?;
                let owner = existing
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(LABEL_TASK_ID))
                    .cloned()
                    .unwrap_or_default();
                if owner == task.id.to_string() {
                    tracing::info!(job = %name, "adopting the existing job of this attempt");
                    Ok((existing, true))
                } else {
                    Err(ExecError::Conflict { name, other: owner })
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the pod log, waiting (bounded by `patience`, with backoff) while
    /// the read is refused for a reason that passes: an open breaker, API
    /// errors, a missing permission. The finished Job holds the log, so a
    /// short outage must not turn into a result without it.
    async fn read_log(
        &self,
        pod: &str,
        limit: i64,
        patience: Duration,
    ) -> Result<Option<Vec<u8>>, ExecError> {
        use backon::{BackoffBuilder, ExponentialBuilder};
        let give_up = Instant::now() + patience;
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times()
            .with_jitter()
            .build();
        loop {
            let err = match self.inner.api.pod_log(pod, limit).await {
                Ok(log) => return Ok(log),
                Err(e) => e,
            };
            let passing = err.is_transient()
                || matches!(
                    err,
                    ExecError::Api {
                        status: Some(401 | 403),
                        ..
                    }
                );
            let delay = backoff
                .next()
                .unwrap_or(Duration::from_secs(5))
                .max(err.retry_after().unwrap_or_default());
            if !passing || Instant::now() + delay > give_up {
                return Err(err);
            }
            tracing::debug!(pod, error = %err, ?delay, "log not readable yet; waiting");
            tokio::time::sleep(delay).await;
        }
    }

    /// Reads the Job and its pods from the API instead of the watch.
    async fn read_directly(&self, name: &str, known: &Observed) -> Result<Observed, ExecError> {
        let job = self.inner.api.get_job(name).await?;
        let selector = format!("{}={name}", job::LABEL_JOB);
        let pod = self
            .inner
            .api
            .list_pods(&selector)
            .await?
            .into_iter()
            .max_by_key(|p| p.metadata.creation_timestamp.clone());
        Ok(Observed {
            job_gone: job.is_none(),
            job: job
                .map(|j| Arc::new(watch::slim_job(j)))
                .or_else(|| known.job.clone()),
            pod_gone: pod.is_none() && known.pod.is_some(),
            pod: pod
                .map(|p| Arc::new(watch::slim_pod(p)))
                .or_else(|| known.pod.clone()),
        })
    }

    /// Waits until the attempt's fate is decided.
    async fn wait(
        &self,
        task: &Task,
        name: &str,
        sub: &mut watch::Subscription,
        created_at: DateTime<Utc>,
        admission: &mut kueue::Admission,
    ) -> Result<(Verdict, Observed), ExecError> {
        // No waiting for the watchers' first list: a broken watch (403, API
        // down) must not hang the attempt; the direct reads cover for it.
        let pending_timeout = classify::pending_deadline(task);
        // An adopted Job may be older than this process's monotonic clock:
        // keep its age as a duration instead of an Instant in the past.
        let age = (Utc::now() - created_at).to_std().unwrap_or_default();
        let start = Instant::now();
        let silent_after =
            Duration::from_secs(task.sandbox.deadline_secs) + pending_timeout + SILENT_WATCH_SLACK;
        let mut silent_at = start + silent_after.saturating_sub(age);
        let mut extra: Option<Observed> = None;
        let mut confirmed = false;
        let mut lag_until: Option<Instant> = None;
        loop {
            // Registered before the check, so a cancel between the check and
            // the select below still wakes this run.
            let woken = self.inner.cancel_wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // A snapshot shares the hub's objects: cloning it is cheap.
            let mut obs = sub.rx.borrow_and_update().clone();
            if let Some(polled) = extra.take() {
                obs = polled;
            }
            if self.is_cancelled(name) {
                let v = Verdict {
                    outcome: Outcome::Cancelled,
                    exit_code: None,
                    error: Some("the attempt was cancelled".into()),
                };
                return Ok((v, obs));
            }
            // Kueue (a no-op for Jobs it does not manage): the pending clock
            // runs from admission, and a preempted run's pod is not ours.
            let job_time = age + start.elapsed();
            let pod_name = obs.pod.as_ref().and_then(|p| p.metadata.name.clone());
            let suspended = admission.observe(
                obs.job.as_deref(),
                pod_name.as_deref(),
                created_at,
                job_time,
            );
            if pod_name.is_some_and(|p| admission.hides(&p)) {
                obs.pod = None;
                obs.pod_gone = false;
            }
            if suspended {
                // A quiet watch is expected while Kueue holds the Job; the
                // admission timer asks the API when the wait is over.
                silent_at = Instant::now() + silent_after;
            }
            let job = view_job(&obs);
            let pod = view_pod(&obs);
            let summary = summary_of(obs.pod.as_deref());
            let pending_for = admission.pending_for(job_time);
            let decided = if suspended && !job.deleted {
                admission.verdict(job_time)
            } else {
                classify::kubernetes(task, &job, pod.as_ref(), &summary, pending_for)
            };
            if let Some(v) = decided {
                let terminal = job.complete || job.failed.is_some() || job.deleted;
                // A finished Job whose pod the (lagging) pod watch has not shown
                // ended yet: the pod carries the summary and names the log.
                let pod_known = pod
                    .as_ref()
                    .is_some_and(|p| p.terminated.is_some() || p.deleted);
                if confirmed || (terminal && (pod_known || job.deleted)) {
                    return Ok((v, obs));
                }
                let now = Instant::now();
                let read_now = if terminal {
                    // The two watches are independent: give the pod's a moment
                    // to deliver its final state before asking the API.
                    let until = *lag_until.get_or_insert(now + POD_WATCH_LAG);
                    now >= until
                } else {
                    // Giving up on a pending pod is decided from the watch, which
                    // may lag (a re-list after an error): confirm it first.
                    true
                };
                if read_now {
                    // Only in these cases: the steady state stays create, log, delete.
                    extra = Some(Box::pin(self.read_directly(name, &obs)).await?);
                    confirmed = true;
                    continue;
                }
            } else {
                confirmed = false;
            }
            let pending_at = admission
                .next_deadline(pending_timeout)
                .map(|t| start + t.saturating_sub(age));
            let pending_timer = pending_at.is_some_and(|t| t > Instant::now());
            tokio::select! {
                () = &mut woken => {}
                changed = sub.rx.changed() => {
                    if changed.is_err() {
                        return Err(ExecError::Config("the kubernetes watcher stopped".into()));
                    }
                }
                () = tokio::time::sleep_until(pending_at.unwrap_or(silent_at)), if pending_timer => {}
                () = tokio::time::sleep_until(lag_until.unwrap_or(silent_at)), if lag_until.is_some() => {}
                () = tokio::time::sleep_until(silent_at) => {
                    // The watch said nothing for too long: ask directly.
                    tracing::warn!(job = %name, "no watch event past the deadline; reading the job directly");
                    extra = Some(Box::pin(self.read_directly(name, &obs)).await?);
                    silent_at = Instant::now() + SILENT_WATCH_SLACK;
                }
            }
        }
    }
}

/// jiff → chrono.
pub(crate) fn to_chrono(t: &k8s_openapi::jiff::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(
        t.as_second(),
        u32::try_from(t.subsec_nanosecond()).unwrap_or(0),
    )
}

fn view_job(obs: &Observed) -> JobView {
    let conditions = obs
        .job
        .as_ref()
        .and_then(|j| j.status.as_ref())
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let is_true = |t: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == t && c.status == "True")
    };
    JobView {
        complete: is_true("Complete").is_some(),
        failed: is_true("Failed").map(|c| c.reason.clone().unwrap_or_else(|| "Failed".into())),
        deleted: obs.job_gone,
    }
}

fn view_pod(obs: &Observed) -> Option<PodView> {
    let pod = obs.pod.as_ref()?;
    let status = pod.status.as_ref();
    let conditions = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let container = status
        .and_then(|s| s.container_statuses.as_deref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref());
    let waiting = container.and_then(|s| s.waiting.as_ref());
    let terminated = container.and_then(|s| s.terminated.as_ref());
    Some(PodView {
        phase: status.and_then(|s| s.phase.clone()),
        reason: status.and_then(|s| s.reason.clone()),
        message: status.and_then(|s| s.message.clone()),
        disruption: conditions
            .iter()
            .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
            .map(|c| {
                c.reason
                    .clone()
                    .unwrap_or_else(|| "DisruptionTarget".into())
            }),
        waiting_reason: waiting.and_then(|w| w.reason.clone()),
        waiting_message: waiting.and_then(|w| w.message.clone()),
        unschedulable: conditions
            .iter()
            .find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
            .map(|c| c.message.clone().unwrap_or_else(|| "unschedulable".into())),
        terminated: terminated.map(|t| Terminated {
            exit_code: t.exit_code,
            reason: t.reason.clone(),
        }),
        deleted: obs.pod_gone,
    })
}

/// The script's summary, from the container's termination message.
fn summary_of(pod: Option<&Pod>) -> Summary {
    let message = pod
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.container_statuses.as_deref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .and_then(|t| t.message.as_deref())
        .unwrap_or_default();
    script::parse_summary(message)
}

fn started_at(obs: &Observed) -> Option<DateTime<Utc>> {
    let pod_start = obs
        .pod
        .as_ref()
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.start_time.as_ref())
        .and_then(|t| to_chrono(&t.0));
    pod_start.or_else(|| {
        obs.job
            .as_ref()
            .and_then(|j| j.status.as_ref())
            .and_then(|s| s.start_time.as_ref())
            .and_then(|t| to_chrono(&t.0))
    })
}

/// Whether the pod's container ran, so that it has a log worth reading.
fn container_ran(obs: &Observed) -> bool {
    obs.pod
        .as_ref()
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.container_statuses.as_deref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.terminated.is_some() || s.running.is_some())
}

#[async_trait]
impl Executor for KubeExecutor {
    async fn run(
        &self,
        task: &Task,
        attempt: u32,
        ctx: &RunContext,
    ) -> Result<Execution, ExecError> {
        let settings = &self.inner.settings;
        let manifest = job::build(task, attempt, ctx, settings).map_err(|e| match e {
            job::BuildError::Script(s) => ExecError::from(s),
            e @ job::BuildError::Quantity { .. } => ExecError::Rejected(e.to_string()),
            other => ExecError::Config(other.to_string()),
        })?;
        let name = job_name(task.id, attempt);
        // Subscribe before creating, so no event about the new Job is missed.
        let mut sub = self.inner.hub.subscribe(&name);
        // Cancelled between the subscription and here (the worker's cancel
        // marks only attempts it sees subscribed): create nothing.
        if self.is_cancelled(&name) {
            self.leave(sub, &name);
            return Err(ExecError::Cancelled);
        }
        // Boxed, with the manifest: a Job held inline across the create would
        // be part of this future, which lives for the whole run.
        let manifest = Box::new(manifest);
        let (created, adopted) = Box::pin(self.create_or_adopt(&manifest, task)).await?;
        // The manifest (with the script) is not needed past here, and a run
        // waits for minutes; the API's copy is slim and goes after the
        // admission has read it.
        drop(manifest);
        let before_create = Utc::now();
        // Our own clock for a Job we created (API timestamps have whole seconds,
        // and in-place retries of the create must not eat the pending allowance);
        // the Job's for one we adopted, whose pending time began earlier.
        let created_at = if adopted {
            created
                .metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| to_chrono(&t.0))
                .unwrap_or(before_create)
        } else {
            before_create
        };
        let hold = self.inner.hold_budget_secs.load(Ordering::Relaxed);
        let mut admission = kueue::Admission::new(
            &created,
            task,
            Duration::from_secs(settings.admission_timeout_secs),
            (hold > 0).then(|| Duration::from_secs(hold)),
        );
        drop(created);
        tracing::debug!(job = %name, adopted, "waiting for sandbox job");

        let waited = self
            .wait(task, &name, &mut sub, created_at, &mut admission)
            .await;
        let admission_wait =
            admission.waited((Utc::now() - created_at).to_std().unwrap_or_default());
        let (verdict, obs) = match waited {
            Ok(v) => v,
            Err(e) => {
                self.leave(sub, &name);
                return Err(e);
            }
        };

        // One log read, before the delete (which takes the pod with it).
        let limit = settings.log_limit_bytes.max(1024);
        let pod_name = obs.pod.as_ref().and_then(|p| p.metadata.name.clone());
        let (log, log_note) = match pod_name.filter(|_| container_ran(&obs)) {
            Some(pod) => match self.read_log(&pod, limit, LOG_READ_PATIENCE).await {
                Ok(Some(bytes)) => (bytes, None),
                Ok(None) => (
                    Vec::new(),
                    Some("the pod's log was gone before it could be read".to_owned()),
                ),
                Err(e) => {
                    tracing::warn!(job = %name, error = %e, "could not read the sandbox log");
                    (
                        Vec::new(),
                        Some(format!(
                            "the pod's log could not be read within {} s: {e}",
                            LOG_READ_PATIENCE.as_secs()
                        )),
                    )
                }
            },
            None => (Vec::new(), None),
        };
        // A kept Job is deleted by `cancel` once the worker settled the
        // delivery; one that never ran to its end (pending timeout, lost) is
        // deleted now whatever the mode, so it stops waiting for a node.
        let ran_to_end = matches!(
            verdict.outcome,
            Outcome::Succeeded | Outcome::Failed | Outcome::TimedOut | Outcome::OomKilled
        ) && !obs.job_gone;
        // Two runs of one attempt here (a redelivery reaching the worker that
        // still runs the first delivery) share the Job: only the last one to
        // finish deletes it, so the other's log read never finds it gone.
        let last = self.leave(sub, &name);
        if last
            && (!self.keeps_finished_jobs() || !ran_to_end)
            && let Err(e) = self.inner.api.delete_job(&name).await
        {
            // The garbage collector (and the Job's TTL) will get it.
            tracing::warn!(job = %name, error = %e, "could not delete the sandbox job");
        }

        let log_cut = log.len() as u64 >= u64::try_from(limit).unwrap_or(u64::MAX);
        let summary = summary_of(obs.pod.as_deref());
        let parsed = script::parse_log(&log);
        let mut report = report::assemble(task, &summary, &parsed, log_cut || log_note.is_some());
        if let Some(note) = log_note {
            report.log_tail = format!("[sandfleet: {note}]\n{}", report.log_tail);
        } else if log_cut {
            report
                .log_tail
                .push_str(&format!("\n[sandfleet: log truncated at {limit} bytes]\n"));
        }
        Ok(Execution {
            outcome: verdict.outcome,
            exit_code: verdict.exit_code,
            steps: report.steps,
            log_tail: report.log_tail,
            log_truncated: report.log_truncated,
            artifacts: report.artifacts,
            started_at: started_at(&obs),
            finished_at: Utc::now(),
            sandbox: name,
            error: verdict.error,
            adopted,
            admission_wait,
        })
    }

    async fn cancel(&self, task_id: TaskId, attempt: u32) -> Result<(), ExecError> {
        let name = job_name(task_id, attempt);
        let in_flight = self.inner.hub.in_flight().contains(&name);
        if in_flight {
            // The run in flight reads the pod's log so far, then deletes the
            // Job (Background propagation): the cancelled result keeps the
            // partial output. One log read stands between cancel and delete.
            if let Ok(mut c) = self.inner.cancelled.lock() {
                c.insert(name.clone());
            }
            self.inner.cancel_wake.notify_waiters();
            return Ok(());
        }
        self.inner.api.delete_job(&name).await
    }
}
