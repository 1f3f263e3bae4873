//! The consumer-timeout budget: whether a task fits the time a worker may hold
//! its delivery.
//!
//! A worker keeps a task's delivery unacked while its sandbox runs, and
//! RabbitMQ closes a channel whose delivery stays unacked past its
//! `consumer_timeout`. So a task may ask for at most that timeout, less
//! [`CONSUMER_TIMEOUT_MARGIN`] for what follows the sandbox, for its pending
//! time and its deadline together. The broker's value is the one setting
//! `limits.broker_consumer_timeout_secs`; the worker refuses a task that does
//! not fit ([`check_consumer_timeout`]), and every intake (gateway, `sandfleet
//! enqueue`, the producer library) refuses it up front with the same reason,
//! through [`crate::validate_intake`].

use std::fmt;
use std::time::Duration;

use crate::Task;

/// Reason code of a task whose deadline does not fit in the broker's
/// consumer timeout: the worker's dead-letter code, and the rule name of the
/// intake's validation error.
pub const DEADLINE_TOO_LONG_CODE: &str = "deadline_exceeds_consumer_timeout";

/// Time kept free inside the broker's consumer timeout for what follows the
/// sandbox: reading logs, publishing the result, acking.
pub const CONSUMER_TIMEOUT_MARGIN: Duration = Duration::from_secs(60);

/// A task asks for more time than a worker may hold its delivery. `Display`
/// is the reason the worker and the intakes give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DeadlineTooLong {
    /// The task's `sandbox.deadline_secs`.
    pub deadline_secs: u64,
    /// The task's `sandbox.pending_timeout_secs`.
    pub pending_timeout_secs: u64,
    /// The broker's consumer timeout the check used, in seconds.
    pub consumer_timeout_secs: u64,
}

impl DeadlineTooLong {
    /// The most `deadline_secs + pending_timeout_secs` may be.
    pub fn budget_secs(&self) -> u64 {
        self.consumer_timeout_secs
            .saturating_sub(CONSUMER_TIMEOUT_MARGIN.as_secs())
    }
}

impl fmt::Display for DeadlineTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "deadline_secs {} + pending_timeout_secs {} exceed the broker consumer timeout \
             ({} s, minus a {} s margin); the broker would take the delivery away mid-run. \
             Shorten the task or raise limits.broker_consumer_timeout_secs together with \
             RabbitMQ's consumer_timeout",
            self.deadline_secs,
            self.pending_timeout_secs,
            self.consumer_timeout_secs,
            CONSUMER_TIMEOUT_MARGIN.as_secs()
        )
    }
}

/// Checks that `task`'s deadline and pending timeout together fit in
/// `consumer_timeout` less [`CONSUMER_TIMEOUT_MARGIN`].
pub fn check_consumer_timeout(
    task: &Task,
    consumer_timeout: Duration,
) -> Result<(), DeadlineTooLong> {
    let needed = Duration::from_secs(
        task.sandbox
            .deadline_secs
            .saturating_add(task.sandbox.pending_timeout_secs),
    );
    let budget = consumer_timeout.saturating_sub(CONSUMER_TIMEOUT_MARGIN);
    if needed > budget {
        Err(DeadlineTooLong {
            deadline_secs: task.sandbox.deadline_secs,
            pending_timeout_secs: task.sandbox.pending_timeout_secs,
            consumer_timeout_secs: consumer_timeout.as_secs(),
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::{Provider, SandboxSpec, Source};

    fn task(deadline_secs: u64, pending_timeout_secs: u64) -> Task {
        Task::fix_attempt(
            Source::new(
                Provider::Api,
                "acme/widgets",
                "4f2a9c1e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a39",
            ),
            SandboxSpec {
                pending_timeout_secs,
                ..SandboxSpec::new("alpine:3.20", deadline_secs)
            },
        )
    }

    #[test]
    fn a_task_fits_up_to_the_timeout_less_the_margin() {
        let timeout = Duration::from_secs(1800);
        check_consumer_timeout(&task(1440, 300), timeout).unwrap();
        let err = check_consumer_timeout(&task(1441, 300), timeout).unwrap_err();
        assert_eq!(err.budget_secs(), 1740);
        let reason = err.to_string();
        assert!(
            reason.starts_with("deadline_secs 1441 + pending_timeout_secs 300 exceed the broker consumer timeout (1800 s, minus a 60 s margin)"),
            "{reason}"
        );
        assert!(
            reason.contains("limits.broker_consumer_timeout_secs"),
            "{reason}"
        );
    }

    #[test]
    fn huge_values_do_not_overflow() {
        let err =
            check_consumer_timeout(&task(u64::MAX, u64::MAX), Duration::from_secs(30)).unwrap_err();
        assert_eq!(err.budget_secs(), 0);
    }
}
