//! The outcome taxonomy: what happened to one attempt of a task, and whether
//! that is final or an infrastructure failure worth another attempt.
//!
//! This is the one place that decides retryability. A task's own failure (a
//! step exiting non-zero, a step or the whole task running out of time, the
//! sandbox running out of memory) is *data*: the user's build failed, and
//! running it again would fail the same way. Infrastructure failures (the pod
//! was evicted, the node vanished, the image could not be pulled, nothing could
//! schedule it, the API failed) say nothing about the build, so they are
//! retried as a new attempt.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What happened to one attempt of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every step that had to pass exited 0.
    Succeeded,
    /// A step exited non-zero (and did not continue on error).
    Failed,
    /// A step's timeout or the task's overall deadline ran out.
    TimedOut,
    /// The sandbox was killed for exceeding its memory limit.
    OomKilled,
    /// The sandbox image could not be pulled before the pending timeout.
    ImagePullFailed,
    /// No node could take the sandbox before the pending timeout.
    Unschedulable,
    /// The sandbox was evicted or disrupted (preemption, node drain, node loss).
    Evicted,
    /// The platform failed: Kubernetes API errors, a lost sandbox, a worker fault.
    InfraError,
    /// The message was invalid and never ran (bad JSON, unknown version, failed validation).
    Rejected,
    /// The task was cancelled before it finished.
    Cancelled,
}

impl Outcome {
    /// Every outcome, in declaration order.
    pub const ALL: [Outcome; 10] = [
        Outcome::Succeeded,
        Outcome::Failed,
        Outcome::TimedOut,
        Outcome::OomKilled,
        Outcome::ImagePullFailed,
        Outcome::Unschedulable,
        Outcome::Evicted,
        Outcome::InfraError,
        Outcome::Rejected,
        Outcome::Cancelled,
    ];

    /// True for infrastructure failures that deserve a new attempt (subject to
    /// the task's `max_attempts`). False for outcomes that are final whatever
    /// the attempt count: a build that failed fails again.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Outcome::ImagePullFailed
                | Outcome::Unschedulable
                | Outcome::Evicted
                | Outcome::InfraError
        )
    }

    /// True only for [`Outcome::Succeeded`].
    pub fn is_success(self) -> bool {
        self == Outcome::Succeeded
    }

    /// The snake_case name used on the wire and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::OomKilled => "oom_killed",
            Outcome::ImagePullFailed => "image_pull_failed",
            Outcome::Unschedulable => "unschedulable",
            Outcome::Evicted => "evicted",
            Outcome::InfraError => "infra_error",
            Outcome::Rejected => "rejected",
            Outcome::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Outcome {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
                format!(
                    "unknown outcome {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_infrastructure_failures_are_retryable() {
        let retryable: Vec<_> = Outcome::ALL
            .into_iter()
            .filter(|o| o.is_retryable())
            .collect();
        assert_eq!(
            retryable,
            [
                Outcome::ImagePullFailed,
                Outcome::Unschedulable,
                Outcome::Evicted,
                Outcome::InfraError
            ]
        );
    }

    #[test]
    fn names_round_trip_through_serde_and_from_str() {
        for o in Outcome::ALL {
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(json, format!("\"{}\"", o.as_str()));
            assert_eq!(o.as_str().parse::<Outcome>().unwrap(), o);
        }
        assert!(
            "exploded"
                .parse::<Outcome>()
                .unwrap_err()
                .contains("succeeded")
        );
    }
}
