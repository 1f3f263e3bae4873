//! Waiting for Kueue's admission: the state of one attempt's Job under
//! `sandbox.kubernetes.kueue_queue`.
//!
//! With a queue set, the Job is created suspended with the
//! `kueue.x-k8s.io/queue-name` label; Kueue *admits* it when the cluster's
//! quota has room by setting `spec.suspend: false` (the Job controller then
//! sets `Suspended=False`, a fresh `startTime`, and creates the pod), and may
//! *preempt* it later by suspending it again (the Job controller deletes its
//! pod). [`Admission`] follows that from what the shared watch keeps of the
//! Job — metadata, status and `spec.suspend` alone — and decides, as a pure
//! state machine over a clock given as an argument:
//!
//! - the pending timeout starts at admission, not at creation, and restarts
//!   at each re-admission after a preemption;
//! - time spent suspended is the *admission wait*, reported in the result;
//! - a preempted Job is waited for, not failed: its deleted pod is hidden
//!   from the classifier, and the re-admitted Job runs the script again in a
//!   fresh pod;
//! - a Job suspended for longer than `sandbox.kubernetes.admission_timeout_secs`
//!   (or than the broker's consumer timeout leaves, see [`Admission::new`])
//!   ends the attempt as `unschedulable`: the cluster had no room for it, which
//!   says nothing about the build, so it is retried as a new attempt after the
//!   retry ladder's delay, and the final result says why when attempts run out.
//!
//! Times are durations since the Job's creation ("Job time"), so an adopted
//! Job created by another worker is measured on the same scale.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::Job;
use sandfleet_proto::{CONSUMER_TIMEOUT_MARGIN, Outcome, Task};

use crate::classify::Verdict;

use super::job::LABEL_KUEUE_QUEUE;

/// Where the Job stands with Kueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not observed yet.
    Unknown,
    /// Suspended since this Job time.
    Suspended(Duration),
    /// Admitted (unsuspended) at this Job time.
    Admitted(Duration),
}

/// One attempt's admission state. For a Job Kueue does not manage (no queue
/// label, not created suspended) it is a no-op: admitted at creation, no
/// admission wait.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    managed: bool,
    queue: Option<String>,
    /// `spec.suspend` of the Job as created (or as found when adopted): the
    /// state until the Job controller writes a `Suspended` condition.
    initially_suspended: bool,
    phase: Phase,
    /// Admission wait of finished suspensions.
    waited: Duration,
    /// How long one suspension may last.
    timeout: Duration,
    /// The latest Job time by which the Job must be admitted, so that its
    /// pending timeout and deadline still fit in the broker's consumer timeout.
    latest: Option<Duration>,
    /// Pods of runs a preemption stopped: their end is not a failure, and
    /// none is the pod of the current admission.
    preempted_pods: HashSet<String>,
    preemptions: u32,
}

impl Admission {
    /// The admission state of `job` as the create (or the adoption's get)
    /// returned it. `admission_timeout` bounds each suspension; with
    /// `hold_budget` (the broker's consumer timeout), a Job must also be
    /// admitted early enough for the task's pending timeout and deadline to
    /// fit in it, less [`CONSUMER_TIMEOUT_MARGIN`], counted from creation.
    pub(crate) fn new(
        job: &Job,
        task: &Task,
        admission_timeout: Duration,
        hold_budget: Option<Duration>,
    ) -> Admission {
        let initially_suspended = job.spec.as_ref().and_then(|s| s.suspend) == Some(true);
        let queue = job
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_KUEUE_QUEUE))
            .cloned();
        let needed = Duration::from_secs(
            task.sandbox
                .deadline_secs
                .saturating_add(task.sandbox.pending_timeout_secs),
        );
        Admission {
            managed: initially_suspended || queue.is_some(),
            queue,
            initially_suspended,
            phase: Phase::Unknown,
            waited: Duration::ZERO,
            timeout: admission_timeout,
            latest: hold_budget.map(|b| b.saturating_sub(CONSUMER_TIMEOUT_MARGIN + needed)),
            preempted_pods: HashSet::new(),
            preemptions: 0,
        }
    }

    /// Updates the state from the watch's view of the Job at Job time `now`
    /// (`created_at` is the Job's creation, to place status timestamps);
    /// `pod` is the name of the newest pod seen. Returns true while the Job
    /// waits for admission.
    pub(crate) fn observe(
        &mut self,
        job: Option<&Job>,
        pod: Option<&str>,
        created_at: DateTime<Utc>,
        now: Duration,
    ) -> bool {
        if !self.managed {
            self.phase = Phase::Admitted(Duration::ZERO);
            return false;
        }
        let live_pod = pod.filter(|p| !self.preempted_pods.contains(*p));
        let suspended = match job.and_then(|j| j.spec.as_ref()).and_then(|s| s.suspend) {
            // Kueue's decision itself, kept by the watch: admission and
            // preemption flip it, and it arrives in order with the rest of
            // the Job's events.
            Some(s) => s,
            // A Job without it (a view that dropped the spec): the Job
            // controller's `Suspended` condition, which may lag the spec.
            None => match job.and_then(suspended_condition) {
                Some(s) => s,
                // No condition yet: the Job controller has not synced it
                // since creation. A start time or a pod says it was admitted.
                None => {
                    let started = job
                        .and_then(|j| j.status.as_ref())
                        .is_some_and(|s| s.start_time.is_some());
                    self.initially_suspended && !started && live_pod.is_none()
                }
            },
        };
        match (self.phase, suspended) {
            (Phase::Unknown, true) => {
                // An adopted Job may have waited since before this worker saw it.
                self.phase = Phase::Suspended(if self.initially_suspended {
                    Duration::ZERO
                } else {
                    now
                });
            }
            (Phase::Unknown, false) => {
                let at = job
                    .and_then(admitted_at)
                    .and_then(|t| (t - created_at).to_std().ok())
                    .map_or(now, |d| d.min(now));
                if self.initially_suspended {
                    self.waited += at;
                }
                self.phase = Phase::Admitted(at);
            }
            (Phase::Suspended(since), false) => {
                self.waited += now.saturating_sub(since);
                self.phase = Phase::Admitted(now);
            }
            (Phase::Admitted(_), true) => {
                // The run in flight is being stopped: its pod's end is not
                // the attempt's.
                if let Some(p) = pod {
                    self.preempted_pods.insert(p.to_owned());
                }
                self.preemptions += 1;
                tracing::info!(queue = ?self.queue, "the sandbox job was preempted by Kueue; waiting for re-admission");
                self.phase = Phase::Suspended(now);
            }
            (Phase::Suspended(_), true) | (Phase::Admitted(_), false) => {}
        }
        suspended
    }

    /// Whether `pod` belongs to a run that a preemption stopped (the
    /// classifier must not take its deletion for a lost sandbox).
    pub(crate) fn hides(&self, pod: &str) -> bool {
        self.preempted_pods.contains(pod)
    }

    /// How long the admitted Job has waited for its pod to start: the
    /// pending timeout's clock, from the latest admission.
    pub(crate) fn pending_for(&self, now: Duration) -> Duration {
        match self.phase {
            Phase::Admitted(at) => now.saturating_sub(at),
            Phase::Unknown | Phase::Suspended(_) => Duration::ZERO,
        }
    }

    /// The Job time at which the current suspension is given up.
    fn give_up_at(&self, since: Duration) -> Duration {
        let own = since.saturating_add(self.timeout);
        self.latest.map_or(own, |l| own.min(l))
    }

    /// The next Job time at which something is decided without an event: the
    /// end of the admission wait while suspended, the pending timeout once
    /// admitted.
    pub(crate) fn next_deadline(&self, pending_timeout: Duration) -> Option<Duration> {
        match self.phase {
            Phase::Suspended(since) => Some(self.give_up_at(since)),
            Phase::Admitted(at) => Some(at.saturating_add(pending_timeout)),
            Phase::Unknown => None,
        }
    }

    /// The verdict on a Job still suspended at Job time `now`: `unschedulable`
    /// once its wait is over, `None` while it may still be admitted.
    pub(crate) fn verdict(&self, now: Duration) -> Option<Verdict> {
        let Phase::Suspended(since) = self.phase else {
            return None;
        };
        let until = self.give_up_at(since);
        if now < until {
            return None;
        }
        let queue = self.queue.as_deref().unwrap_or("(no queue label)");
        let why = if until < since.saturating_add(self.timeout) {
            format!(
                "the wait left no room for the task's pending timeout and deadline inside the broker's \
                 consumer timeout (limits.broker_consumer_timeout_secs, less {} s)",
                CONSUMER_TIMEOUT_MARGIN.as_secs()
            )
        } else {
            format!(
                "sandbox.kubernetes.admission_timeout_secs is {} s",
                self.timeout.as_secs()
            )
        };
        let preempted = if self.preemptions > 0 {
            format!(
                " (after {} preemption{})",
                self.preemptions,
                if self.preemptions == 1 { "" } else { "s" }
            )
        } else {
            String::new()
        };
        Some(Verdict {
            outcome: Outcome::Unschedulable,
            exit_code: None,
            error: Some(format!(
                "Kueue did not admit the sandbox job from queue {queue:?} within {} s{preempted}: {why}",
                now.saturating_sub(since).as_secs()
            )),
        })
    }

    /// The time the Job spent waiting for admission up to Job time `now`;
    /// `None` for a Job Kueue does not manage.
    pub(crate) fn waited(&self, now: Duration) -> Option<Duration> {
        if !self.managed {
            return None;
        }
        Some(match self.phase {
            Phase::Suspended(since) => self.waited + now.saturating_sub(since),
            Phase::Unknown | Phase::Admitted(_) => self.waited,
        })
    }
}

/// The status of the Job's `Suspended` condition, if the Job controller has
/// written one: `True` while suspended, `False` once resumed.
fn suspended_condition(job: &Job) -> Option<bool> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Suspended")
        .map(|c| c.status == "True")
}

/// When the Job was last resumed, from its status: `Suspended=False`'s
/// transition, or else `startTime` (reset at each resume).
fn admitted_at(job: &Job) -> Option<DateTime<Utc>> {
    let status = job.status.as_ref()?;
    let resumed = status
        .conditions
        .as_ref()
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.type_ == "Suspended" && c.status == "False")
        })
        .and_then(|c| c.last_transition_time.as_ref());
    resumed
        .or(status.start_time.as_ref())
        .and_then(|t| super::to_chrono(&t.0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobSpec, JobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use sandfleet_proto::{Provider, SandboxSpec, Source};

    fn task() -> Task {
        Task::fix_attempt(
            Source {
                provider: Provider::Api,
                repository: "acme/widgets".into(),
                commit: "c".repeat(40),
                git_ref: None,
                ci_run_id: None,
                pull_request: None,
                url: None,
            },
            SandboxSpec {
                image: "alpine:3.20".into(),
                resources: Default::default(),
                env: Default::default(),
                deadline_secs: 600,
                pending_timeout_secs: 120,
            },
        )
        .with_step("build", "make", 100)
    }

    fn created(suspended: bool) -> Job {
        let mut labels = std::collections::BTreeMap::new();
        if suspended {
            labels.insert(LABEL_KUEUE_QUEUE.to_owned(), "team".to_owned());
        }
        Job {
            metadata: ObjectMeta {
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            spec: Some(JobSpec {
                suspend: suspended.then_some(true),
                ..JobSpec::default()
            }),
            status: None,
        }
    }

    /// The Job as the watch keeps it (no spec) with a `Suspended` condition.
    fn seen(suspended: Option<bool>) -> Job {
        Job {
            metadata: ObjectMeta::default(),
            spec: None,
            status: Some(JobStatus {
                conditions: suspended.map(|s| {
                    vec![JobCondition {
                        type_: "Suspended".into(),
                        status: if s { "True" } else { "False" }.into(),
                        ..JobCondition::default()
                    }]
                }),
                ..JobStatus::default()
            }),
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn an_unmanaged_job_is_admitted_at_creation_and_reports_no_wait() {
        let mut a = Admission::new(&created(false), &task(), HOUR, None);
        assert!(!a.observe(Some(&seen(None)), None, Utc::now(), secs(5)));
        assert_eq!(a.pending_for(secs(5)), secs(5));
        assert_eq!(a.waited(secs(5)), None);
    }

    #[test]
    fn the_pending_clock_starts_at_admission_and_the_wait_is_counted_apart() {
        let mut a = Admission::new(&created(true), &task(), HOUR, None);
        // Created: no condition yet, suspended as created.
        assert!(a.observe(Some(&seen(None)), None, Utc::now(), secs(0)));
        assert!(a.observe(Some(&seen(Some(true))), None, Utc::now(), secs(1)));
        // Far past the pending timeout while suspended: no pending verdict,
        // and no admission verdict either.
        assert_eq!(a.pending_for(secs(500)), Duration::ZERO);
        assert!(a.verdict(secs(500)).is_none());
        assert_eq!(a.next_deadline(secs(120)), Some(HOUR));
        // Admitted at 500 s: the pending clock starts there.
        assert!(!a.observe(Some(&seen(Some(false))), None, Utc::now(), secs(500)));
        assert_eq!(a.pending_for(secs(530)), secs(30));
        assert_eq!(a.next_deadline(secs(120)), Some(secs(620)));
        assert_eq!(a.waited(secs(900)), Some(secs(500)));
    }

    #[test]
    fn admission_before_the_first_sync_is_seen_from_the_pod_or_start_time() {
        let mut a = Admission::new(&created(true), &task(), HOUR, None);
        assert!(a.observe(Some(&seen(None)), None, Utc::now(), secs(0)));
        // Kueue admitted it before the Job controller ever wrote `Suspended`.
        assert!(!a.observe(Some(&seen(None)), Some("pod-1"), Utc::now(), secs(2)));
        assert_eq!(a.waited(secs(10)), Some(secs(2)));
    }

    /// The Job as the watch keeps it, with `spec.suspend`.
    fn with_spec(suspend: bool, condition: Option<bool>) -> Job {
        let mut j = seen(condition);
        j.spec = Some(JobSpec {
            suspend: Some(suspend),
            ..JobSpec::default()
        });
        j
    }

    #[test]
    fn spec_suspend_decides_before_the_lagging_condition() {
        let mut a = Admission::new(&created(true), &task(), HOUR, None);
        assert!(a.observe(Some(&with_spec(true, None)), None, Utc::now(), secs(0)));
        // Kueue admitted it; the Job controller has not resumed it yet, and
        // its pod already shows.
        assert!(!a.observe(
            Some(&with_spec(false, Some(true))),
            Some("pod-1"),
            Utc::now(),
            secs(5)
        ));
        assert!(
            !a.hides("pod-1"),
            "an admission lagging in status is no preemption"
        );
        assert!(!a.observe(
            Some(&with_spec(false, Some(false))),
            Some("pod-1"),
            Utc::now(),
            secs(6)
        ));
        assert_eq!(a.pending_for(secs(7)), secs(2), "one admission, at 5 s");
        // Preempted: spec.suspend flips back while the condition still says resumed.
        assert!(a.observe(
            Some(&with_spec(true, Some(false))),
            Some("pod-1"),
            Utc::now(),
            secs(9)
        ));
        assert!(a.hides("pod-1"));
        assert_eq!(a.waited(secs(10)), Some(secs(5 + 1)));
    }

    #[test]
    fn a_preempted_job_hides_its_old_pod_and_waits_for_readmission() {
        let mut a = Admission::new(&created(true), &task(), HOUR, None);
        a.observe(Some(&seen(Some(true))), None, Utc::now(), secs(0));
        a.observe(
            Some(&seen(Some(false))),
            Some("pod-1"),
            Utc::now(),
            secs(10),
        );
        assert!(!a.hides("pod-1"));
        // Preempted at 100 s: the running pod is being deleted by it.
        assert!(a.observe(
            Some(&seen(Some(true))),
            Some("pod-1"),
            Utc::now(),
            secs(100)
        ));
        assert!(a.hides("pod-1"));
        assert!(a.verdict(secs(200)).is_none(), "waits, not a failure");
        // Re-admitted at 300 s: the pending clock restarts; the old pod stays hidden.
        assert!(!a.observe(
            Some(&seen(Some(false))),
            Some("pod-1"),
            Utc::now(),
            secs(300)
        ));
        assert!(a.hides("pod-1") && !a.hides("pod-2"));
        assert_eq!(a.pending_for(secs(310)), secs(10));
        assert_eq!(a.waited(secs(400)), Some(secs(10 + 200)));
    }

    #[test]
    fn a_wait_past_the_admission_timeout_is_unschedulable_and_retryable() {
        let mut a = Admission::new(&created(true), &task(), secs(60), None);
        a.observe(Some(&seen(Some(true))), None, Utc::now(), secs(0));
        assert!(a.verdict(secs(59)).is_none());
        let v = a.verdict(secs(60)).unwrap();
        assert_eq!(v.outcome, Outcome::Unschedulable);
        assert!(v.outcome.is_retryable());
        let e = v.error.unwrap();
        assert!(
            e.contains("\"team\"") && e.contains("admission_timeout_secs"),
            "{e}"
        );
    }

    #[test]
    fn the_wait_is_kept_inside_the_consumer_timeout() {
        // 1800 s consumer timeout - 60 s margin - 600 s deadline - 120 s pending.
        let a = Admission::new(&created(true), &task(), HOUR, Some(secs(1800)));
        let mut a2 = a.clone();
        a2.observe(Some(&seen(Some(true))), None, Utc::now(), secs(0));
        assert_eq!(a2.next_deadline(secs(120)), Some(secs(1020)));
        let e = a2.verdict(secs(1020)).unwrap().error.unwrap();
        assert!(e.contains("broker_consumer_timeout_secs"), "{e}");
    }

    #[test]
    fn an_adopted_admitted_job_counts_its_wait_from_its_status() {
        let created_at = Utc::now() - chrono::Duration::seconds(100);
        let mut job = seen(Some(false));
        let resumed = created_at + chrono::Duration::seconds(40);
        job.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].last_transition_time =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                resumed.to_rfc3339().parse().unwrap(),
            ));
        let mut a = Admission::new(&created(true), &task(), HOUR, None);
        assert!(!a.observe(Some(&job), None, created_at, secs(100)));
        assert_eq!(a.waited(secs(100)), Some(secs(40)));
        assert_eq!(a.pending_for(secs(100)), secs(60));
    }
}
