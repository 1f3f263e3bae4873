//! Failure classification: what happened to an attempt, as an [`Outcome`].
//!
//! Pure functions over what the executors observe: the script's summary (both
//! executors), the child's exit status (local), and the Job's conditions plus
//! the pod's status (Kubernetes). Whether an outcome is retried is decided
//! elsewhere, once, by [`Outcome::is_retryable`].

use std::time::Duration;

use sandfleet_proto::{Outcome, Task};

use crate::script::{StepStatus, Summary};

/// The classification of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// What happened.
    pub outcome: Outcome,
    /// Exit code of the deciding step (0 on success), when known.
    pub exit_code: Option<i32>,
    /// Why, for humans, when the outcome is not `succeeded`.
    pub error: Option<String>,
}

impl Verdict {
    fn new(outcome: Outcome, exit_code: Option<i32>, error: impl Into<String>) -> Verdict {
        Verdict {
            outcome,
            exit_code,
            error: Some(error.into()),
        }
    }
}

fn step_name(task: &Task, index: usize) -> &str {
    task.steps.get(index).map_or("?", |s| s.name.as_str())
}

/// The verdict of a script that ran to its end (its summary has an `end` line
/// or a setup failure). Returns `None` when the summary does not decide.
pub fn from_summary(task: &Task, summary: &Summary) -> Option<Verdict> {
    if let Some(setup) = &summary.setup_failure {
        let what = setup
            .strip_prefix("file ")
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| task.files.get(i))
            .map_or_else(
                || format!("the workspace ({setup})"),
                |f| format!("input file {:?}", f.path),
            );
        return Some(Verdict::new(
            Outcome::Failed,
            Some(125),
            format!("could not write {what}"),
        ));
    }
    let continues = |i: usize| task.steps.get(i).is_some_and(|s| s.continue_on_error);
    if let Some(step) = summary.deciding_step(continues) {
        let name = step_name(task, step.index);
        let code = Some(step.exit_code);
        return Some(match step.status {
            StepStatus::Timeout => {
                let secs = task.steps.get(step.index).map_or(0, |s| s.timeout_secs);
                Verdict::new(
                    Outcome::TimedOut,
                    code,
                    format!("step {name:?} timed out after {secs}s"),
                )
            }
            StepStatus::Killed => Verdict::new(
                Outcome::TimedOut,
                code,
                format!("step {name:?} was killed when the task was stopped"),
            ),
            StepStatus::FileLimit => Verdict::new(
                Outcome::Failed,
                code,
                format!(
                    "step {name:?} was stopped for writing a file over the sandbox's size limit (its output or a workspace file)"
                ),
            ),
            StepStatus::Fail | StepStatus::Ok => Verdict::new(
                Outcome::Failed,
                code,
                format!("step {name:?} exited with code {}", step.exit_code),
            ),
        });
    }
    summary.exit_code.map(|_| Verdict {
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        error: None,
    })
}

/// How the local executor's script process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalEnd {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signalled(i32),
    /// The task's overall deadline passed and the executor stopped it.
    DeadlineExceeded,
    /// The run's disk usage passed its limit and the executor stopped it.
    DiskLimit {
        /// Bytes in use when it was measured.
        used: u64,
        /// The limit (`sandbox.local.max_workspace_bytes`).
        limit: u64,
    },
}

/// Classifies a local run.
pub fn local(task: &Task, summary: &Summary, end: LocalEnd) -> Verdict {
    match end {
        LocalEnd::DeadlineExceeded => deadline(task, summary),
        LocalEnd::DiskLimit { used, limit } => {
            let killed = summary
                .steps
                .iter()
                .find(|s| s.status == StepStatus::Killed);
            let during = killed
                .map(|s| format!(" during step {:?}", step_name(task, s.index)))
                .unwrap_or_default();
            Verdict::new(
                Outcome::Failed,
                killed.map(|s| s.exit_code),
                format!(
                    "the sandbox used {used} bytes of disk{during}, over its limit of {limit} bytes (sandbox.local.max_workspace_bytes)"
                ),
            )
        }
        LocalEnd::Exited(_) | LocalEnd::Signalled(_)
            if summary.exit_code.is_some() || summary.setup_failure.is_some() =>
        {
            from_summary(task, summary)
                .unwrap_or_else(|| infra("the script's summary is inconsistent"))
        }
        LocalEnd::Exited(code) => {
            infra(format!("the script ended with code {code} before its end"))
        }
        LocalEnd::Signalled(sig) => infra(format!("the script was killed by signal {sig}")),
    }
}

fn deadline(task: &Task, summary: &Summary) -> Verdict {
    let during = summary
        .steps
        .iter()
        .find(|s| s.status == StepStatus::Killed)
        .map(|s| format!(" during step {:?}", step_name(task, s.index)))
        .unwrap_or_default();
    let code = summary
        .steps
        .iter()
        .find(|s| s.status == StepStatus::Killed)
        .map(|s| s.exit_code);
    Verdict::new(
        Outcome::TimedOut,
        code,
        format!(
            "task deadline of {}s exceeded{during}",
            task.sandbox.deadline_secs
        ),
    )
}

fn infra(msg: impl Into<String>) -> Verdict {
    Verdict::new(Outcome::InfraError, None, msg)
}

/// What the Kubernetes executor knows about a Job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobView {
    /// The `Complete` condition is true.
    pub complete: bool,
    /// The `Failed` condition is true, with its reason (`DeadlineExceeded`,
    /// `BackoffLimitExceeded`, ...).
    pub failed: Option<String>,
    /// The Job was deleted before we saw it finish.
    pub deleted: bool,
}

/// A terminated container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Terminated {
    /// Exit code.
    pub exit_code: i32,
    /// `Completed`, `Error`, `OOMKilled`, ...
    pub reason: Option<String>,
}

/// What the Kubernetes executor knows about the Job's pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodView {
    /// `Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`.
    pub phase: Option<String>,
    /// `status.reason` (`Evicted`, `NodeLost`, ...).
    pub reason: Option<String>,
    /// `status.message`.
    pub message: Option<String>,
    /// Reason of a true `DisruptionTarget` condition.
    pub disruption: Option<String>,
    /// Reason of the container's `waiting` state.
    pub waiting_reason: Option<String>,
    /// Message of the container's `waiting` state.
    pub waiting_message: Option<String>,
    /// `PodScheduled=False` with reason `Unschedulable`: its message.
    pub unschedulable: Option<String>,
    /// The container's terminated state.
    pub terminated: Option<Terminated>,
    /// The pod was deleted (node lost and garbage-collected, or by someone).
    pub deleted: bool,
}

/// Parts of the kubelet's eviction messages for a pod over its own
/// ephemeral-storage limit or an `emptyDir` over its `sizeLimit`
/// (`pkg/kubelet/eviction/helpers.go`).
const OWN_STORAGE_EVICTIONS: [&str; 3] = [
    "exceeded its local ephemeral storage limit",
    "ephemeral local storage usage exceeds the total limit",
    "Usage of EmptyDir volume",
];

const IMAGE_PULL_REASONS: [&str; 5] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "RegistryUnavailable",
];

/// Classifies a Job from its conditions, its pod and the script summary
/// (the container's termination message). `pending_for` is how long the
/// attempt has waited for its pod to start. `None`: not decided yet.
pub fn kubernetes(
    task: &Task,
    job: &JobView,
    pod: Option<&PodView>,
    summary: &Summary,
    pending_for: Duration,
) -> Option<Verdict> {
    let pending_timeout = Duration::from_secs(task.sandbox.pending_timeout_secs);
    if job.complete {
        return Some(from_summary(task, summary).unwrap_or(Verdict {
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            error: None,
        }));
    }
    if let Some(pod) = pod {
        if let Some(t) = &pod.terminated
            && t.reason.as_deref() == Some("OOMKilled")
        {
            return Some(Verdict::new(
                Outcome::OomKilled,
                Some(t.exit_code),
                format!(
                    "the sandbox exceeded its memory limit ({})",
                    task.sandbox
                        .resources
                        .memory_limit
                        .as_deref()
                        .unwrap_or("unset")
                ),
            ));
        }
        let lost = pod.reason.as_deref() == Some("NodeLost")
            || pod.disruption.as_deref() == Some("DeletionByPodGC");
        if lost {
            return Some(infra(format!(
                "the sandbox's node was lost{}",
                pod.message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )));
        }
        // The kubelet evicts a pod over its own storage limits with these
        // messages: the task wrote too much, a new attempt would too.
        // (Node-pressure evictions, "The node was low on resource", stay
        // retryable below.)
        if pod.reason.as_deref() == Some("Evicted")
            && let Some(msg) = pod.message.as_deref()
            && OWN_STORAGE_EVICTIONS.iter().any(|m| msg.contains(m))
        {
            return Some(Verdict::new(
                Outcome::Failed,
                None,
                format!(
                    "the sandbox wrote more than it may and was evicted: {} \
                     (sandbox.kubernetes.default_resources.ephemeral_storage_limit, \
                     sandbox.kubernetes.workspace_size_limit)",
                    msg.trim()
                ),
            ));
        }
        if pod.disruption.is_some() || pod.reason.as_deref() == Some("Evicted") {
            let why = pod
                .message
                .clone()
                .or_else(|| pod.disruption.clone())
                .unwrap_or_else(|| "evicted".into());
            return Some(Verdict::new(
                Outcome::Evicted,
                None,
                format!("the sandbox pod was disrupted: {why}"),
            ));
        }
    }
    if let Some(reason) = &job.failed {
        if reason == "DeadlineExceeded" {
            return Some(deadline(task, summary));
        }
        if let Some(v) = from_summary(task, summary) {
            return Some(v);
        }
        return Some(match pod.and_then(|p| p.terminated.as_ref()) {
            Some(t) => infra(format!(
                "the sandbox container ended with code {} ({}) before the script finished",
                t.exit_code,
                t.reason.as_deref().unwrap_or("no reason")
            )),
            None => infra(format!("the Job failed ({reason}) and its pod was lost")),
        });
    }
    if job.deleted {
        return Some(infra("the Job was deleted before it finished"));
    }
    let Some(pod) = pod else {
        return (pending_for >= pending_timeout).then(|| {
            infra(format!(
                "no pod was created for the Job within {}s",
                pending_timeout.as_secs()
            ))
        });
    };
    if pod.deleted && pod.terminated.is_none() {
        // The Job controller would replace it; with backoffLimit 0 the Job fails next.
        return None;
    }
    if pod.phase.as_deref() == Some("Pending") && pending_for >= pending_timeout {
        if let Some(w) = pod
            .waiting_reason
            .as_deref()
            .filter(|w| IMAGE_PULL_REASONS.contains(w))
        {
            return Some(Verdict::new(
                Outcome::ImagePullFailed,
                None,
                format!(
                    "image {:?} could not be pulled within {}s ({w}{})",
                    task.sandbox.image,
                    pending_timeout.as_secs(),
                    pod.waiting_message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ),
            ));
        }
        if let Some(msg) = &pod.unschedulable {
            return Some(Verdict::new(
                Outcome::Unschedulable,
                None,
                format!(
                    "no node could take the sandbox within {}s: {msg}",
                    pending_timeout.as_secs()
                ),
            ));
        }
        return Some(infra(format!(
            "the sandbox stayed pending for {}s ({})",
            pending_timeout.as_secs(),
            pod.waiting_reason.as_deref().unwrap_or("no reason given")
        )));
    }
    None
}

/// When the attempt must be given up as pending (image pull, unschedulable),
/// if the pod is still pending: the executor sets a timer on it.
pub fn pending_deadline(task: &Task) -> Duration {
    Duration::from_secs(task.sandbox.pending_timeout_secs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::script::parse_summary;
    use sandfleet_proto::{Provider, SandboxSpec, Source};

    fn task() -> Task {
        let mut t = Task::fix_attempt(
            Source::new(Provider::Api, "acme/widgets", "c".repeat(40)),
            SandboxSpec {
                pending_timeout_secs: 60,
                ..SandboxSpec::new("alpine:3.20", 600)
            },
        )
        .with_step("build", "make", 100)
        .with_step("lint", "make lint", 100)
        .with_step("test", "make test", 100);
        t.steps[1].continue_on_error = true;
        t
    }

    #[test]
    fn summary_decides_success_failure_and_step_timeouts() {
        let t = task();
        let ok = parse_summary("sf1\n0 0 1 ok\n1 2 1 fail\n2 0 1 ok\nend 0\n");
        assert_eq!(from_summary(&t, &ok).unwrap().outcome, Outcome::Succeeded);
        let failed = parse_summary("sf1\n0 0 1 ok\n1 0 1 ok\n2 3 1 fail\nend 3\n");
        let v = from_summary(&t, &failed).unwrap();
        assert_eq!((v.outcome, v.exit_code), (Outcome::Failed, Some(3)));
        assert!(v.error.unwrap().contains("\"test\""));
        let timeout = parse_summary("sf1\n0 143 100000 timeout\nend 143\n");
        assert_eq!(
            from_summary(&t, &timeout).unwrap().outcome,
            Outcome::TimedOut
        );
        assert_eq!(from_summary(&t, &parse_summary("sf1\n0 0 1 ok\n")), None);
    }

    #[test]
    fn local_deadline_and_crashes() {
        let t = task();
        let s = parse_summary("sf1\n0 143 5 killed\nend 143\n");
        let v = local(&t, &s, LocalEnd::DeadlineExceeded);
        assert_eq!(v.outcome, Outcome::TimedOut);
        assert!(v.error.unwrap().contains("during step \"build\""));
        let v = local(&t, &parse_summary("sf1\n"), LocalEnd::Signalled(9));
        assert_eq!(v.outcome, Outcome::InfraError);
    }

    fn pending(waiting: Option<&str>, unschedulable: Option<&str>) -> PodView {
        PodView {
            phase: Some("Pending".into()),
            waiting_reason: waiting.map(Into::into),
            unschedulable: unschedulable.map(Into::into),
            ..PodView::default()
        }
    }

    #[test]
    fn pending_pods_wait_for_the_pending_timeout() {
        let t = task();
        let job = JobView::default();
        let s = Summary::default();
        let pull = pending(Some("ImagePullBackOff"), None);
        assert_eq!(
            kubernetes(&t, &job, Some(&pull), &s, Duration::from_secs(59)),
            None
        );
        let v = kubernetes(&t, &job, Some(&pull), &s, Duration::from_secs(60)).unwrap();
        assert_eq!(v.outcome, Outcome::ImagePullFailed);
        let unsched = pending(None, Some("0/3 nodes are available"));
        let v = kubernetes(&t, &job, Some(&unsched), &s, Duration::from_secs(61)).unwrap();
        assert_eq!(v.outcome, Outcome::Unschedulable);
        assert!(v.outcome.is_retryable());
    }

    #[test]
    fn job_failures_map_to_their_classes() {
        let t = task();
        let s = Summary::default();
        let failed = |r: &str| JobView {
            failed: Some(r.into()),
            ..JobView::default()
        };
        let oom = PodView {
            phase: Some("Failed".into()),
            terminated: Some(Terminated {
                exit_code: 137,
                reason: Some("OOMKilled".into()),
            }),
            ..PodView::default()
        };
        let v = kubernetes(
            &t,
            &failed("BackoffLimitExceeded"),
            Some(&oom),
            &s,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!((v.outcome, v.exit_code), (Outcome::OomKilled, Some(137)));
        let v = kubernetes(&t, &failed("DeadlineExceeded"), None, &s, Duration::ZERO).unwrap();
        assert_eq!(v.outcome, Outcome::TimedOut);
        let evicted = PodView {
            phase: Some("Failed".into()),
            disruption: Some("EvictionByEvictionAPI".into()),
            ..PodView::default()
        };
        let v = kubernetes(
            &t,
            &failed("BackoffLimitExceeded"),
            Some(&evicted),
            &s,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(v.outcome, Outcome::Evicted);
        // Over its own storage limits: the task's doing, final.
        for msg in [
            "Container sandbox exceeded its local ephemeral storage limit \"12Gi\". ",
            "Pod ephemeral local storage usage exceeds the total limit of containers 12Gi. ",
            "Usage of EmptyDir volume \"workspace\" exceeds the limit \"10Gi\". ",
        ] {
            let over = PodView {
                phase: Some("Failed".into()),
                reason: Some("Evicted".into()),
                message: Some(msg.into()),
                ..PodView::default()
            };
            let v = kubernetes(
                &t,
                &failed("BackoffLimitExceeded"),
                Some(&over),
                &s,
                Duration::ZERO,
            )
            .unwrap();
            assert_eq!(v.outcome, Outcome::Failed, "{msg}");
            assert!(!v.outcome.is_retryable());
            let e = v.error.unwrap();
            assert!(
                e.contains(msg.trim()) && e.contains("ephemeral_storage_limit"),
                "{e}"
            );
        }
        // Short of space on the node: not the task's doing, retried.
        let pressure = PodView {
            phase: Some("Failed".into()),
            reason: Some("Evicted".into()),
            message: Some("The node was low on resource: ephemeral-storage. ".into()),
            ..PodView::default()
        };
        let v = kubernetes(
            &t,
            &failed("BackoffLimitExceeded"),
            Some(&pressure),
            &s,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(v.outcome, Outcome::Evicted);
        let lost = PodView {
            reason: Some("NodeLost".into()),
            ..PodView::default()
        };
        let v = kubernetes(
            &t,
            &failed("BackoffLimitExceeded"),
            Some(&lost),
            &s,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(v.outcome, Outcome::InfraError);
        let steps = parse_summary("sf1\n0 2 10 fail\nend 2\n");
        let exited = PodView {
            terminated: Some(Terminated {
                exit_code: 2,
                reason: Some("Error".into()),
            }),
            ..PodView::default()
        };
        let v = kubernetes(
            &t,
            &failed("BackoffLimitExceeded"),
            Some(&exited),
            &steps,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!((v.outcome, v.exit_code), (Outcome::Failed, Some(2)));
        let v = kubernetes(
            &t,
            &failed("BackoffLimitExceeded"),
            None,
            &s,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(v.outcome, Outcome::InfraError);
        let complete = JobView {
            complete: true,
            ..JobView::default()
        };
        let v = kubernetes(&t, &complete, None, &s, Duration::ZERO).unwrap();
        assert_eq!(v.outcome, Outcome::Succeeded);
    }
}
