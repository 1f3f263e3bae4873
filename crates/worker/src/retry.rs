//! The retry policy: what to do after one attempt of a task ended.
//!
//! [`decide`] is a pure function of the task's attempt budget, the attempt
//! number, how the attempt ended, the retry settings and a random source (for
//! jitter). The dispatch loop only carries the decision out. Design decision 2:
//! a task's own failure is final on the first attempt; infrastructure failures
//! become a new attempt after an exponential, jittered delay spent in a delay
//! queue of the retry ladder; when the budget is spent the task is
//! dead-lettered with a final result that says why.

use std::time::Duration;

use rand::Rng;
use sandfleet_proto::Outcome;
use sandfleet_settings::{RetrySettings, TopologySettings};

/// Retry tuning, validated from [`RetrySettings`] and the ladder of
/// [`TopologySettings::retry_delays_secs`].
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Backoff before attempt 2; doubles per attempt.
    pub base_delay: Duration,
    /// Cap on the backoff.
    pub max_delay: Duration,
    /// Jitter as a fraction of the delay, in `0.0..=1.0`: the delay is drawn
    /// from `[d * (1 - jitter), d]`.
    pub jitter: f64,
    /// The delay queues, ascending. Empty means "republish at once".
    pub ladder: Vec<Duration>,
}

impl RetryConfig {
    /// Builds the config from the worker's retry and topology sections.
    pub fn new(retry: &RetrySettings, topology: &TopologySettings) -> Self {
        let mut ladder: Vec<Duration> = topology
            .retry_delays_secs
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect();
        ladder.sort();
        ladder.dedup();
        RetryConfig {
            base_delay: Duration::from_secs(retry.base_delay_secs),
            max_delay: Duration::from_secs(retry.max_delay_secs.max(retry.base_delay_secs)),
            jitter: retry.jitter.clamp(0.0, 1.0),
            ladder,
        }
    }

    /// The un-jittered backoff after attempt `attempt` failed:
    /// `base * 2^(attempt-1)`, capped at `max_delay`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(31);
        self.base_delay
            .checked_mul(1u32 << exp)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// The delay queue a message waiting `delay` goes to: the smallest tier
    /// at least as long, or the longest tier when none is (the message's own
    /// expiration is then clamped to it).
    pub fn tier_for(&self, delay: Duration) -> Duration {
        self.ladder
            .iter()
            .copied()
            .find(|t| *t >= delay)
            .or_else(|| self.ladder.last().copied())
            .unwrap_or(Duration::ZERO)
    }
}

/// How one attempt ended, as the retry policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptEnd {
    /// The sandbox ran to an outcome (any [`Outcome`], retryable or not).
    Finished(Outcome),
    /// An infrastructure error escaped the executor (API errors after the
    /// in-place retries, a lost sandbox). Worth another attempt.
    InfraError {
        /// What went wrong, for the result and the logs.
        error: String,
        /// A lower bound on the delay the API asked for (429 `Retry-After`).
        retry_after: Option<Duration>,
    },
    /// The attempt can never succeed: the sandbox spec was refused (422), or a
    /// Job with our name belongs to another task.
    Fatal {
        /// The outcome reported in the final result.
        outcome: Outcome,
        /// Why.
        error: String,
    },
    /// The attempt did not start because the Kubernetes API is guarded by an
    /// open circuit breaker. Not the task's fault and not an attempt.
    Unavailable,
}

/// What the dispatch loop does with the delivery after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Publish the attempt's result as final, then ack.
    PublishFinal,
    /// Publish a non-final result for this attempt, republish the task to the
    /// retry ladder as `next_attempt`, then ack.
    Retry {
        /// How long the message waits (its per-message expiration).
        delay: Duration,
        /// The attempt number the republished task carries.
        next_attempt: u32,
        /// The delay queue it waits in (`<prefix>.retry.<secs>s`).
        tier: Duration,
    },
    /// Publish a final result carrying `reason`, then dead-letter the delivery.
    DeadLetter {
        /// Why the task gave up, for the result and the dead-letter header.
        reason: String,
    },
    /// Publish nothing; hand the delivery back to the broker for another
    /// worker (or this one, once the API recovers).
    Release {
        /// Why, for the logs.
        reason: String,
    },
}

/// Decides what follows attempt `attempt` of a task allowed `max_attempts`.
///
/// `rng` only draws the jitter; pass a seeded generator in tests.
pub fn decide(
    max_attempts: u32,
    attempt: u32,
    end: &AttemptEnd,
    config: &RetryConfig,
    rng: &mut impl Rng,
) -> Decision {
    let (what, retry_after) = match end {
        AttemptEnd::Finished(outcome) if !outcome.is_retryable() => return Decision::PublishFinal,
        AttemptEnd::Finished(outcome) => (format!("attempt ended {outcome}"), None),
        AttemptEnd::InfraError { error, retry_after } => (error.clone(), *retry_after),
        AttemptEnd::Fatal { error, .. } => {
            return Decision::DeadLetter {
                reason: error.clone(),
            };
        }
        AttemptEnd::Unavailable => {
            return Decision::Release {
                reason: "the Kubernetes API circuit breaker is open".to_owned(),
            };
        }
    };
    if attempt >= max_attempts.max(1) {
        return Decision::DeadLetter {
            reason: format!(
                "gave up after {attempt} attempt{} (max_attempts {max_attempts}); last: {what}",
                if attempt == 1 { "" } else { "s" }
            ),
        };
    }
    let mut delay = jittered(config.backoff(attempt), config.jitter, rng);
    if let Some(floor) = retry_after {
        delay = delay.max(floor);
    }
    let tier = config.tier_for(delay);
    if !config.ladder.is_empty() {
        delay = delay.min(tier);
    }
    Decision::Retry {
        delay,
        next_attempt: attempt + 1,
        tier,
    }
}

/// Draws a delay from `[d * (1 - jitter), d]`, whole milliseconds.
pub fn jittered(d: Duration, jitter: f64, rng: &mut impl Rng) -> Duration {
    let ms = d.as_millis().min(u128::from(u64::MAX)) as u64;
    let spread = (ms as f64 * jitter.clamp(0.0, 1.0)) as u64;
    if spread == 0 {
        return Duration::from_millis(ms);
    }
    Duration::from_millis(ms - rng.random_range(0..=spread))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn config(jitter: f64) -> RetryConfig {
        RetryConfig::new(
            &RetrySettings {
                base_delay_secs: 10,
                max_delay_secs: 1800,
                jitter,
                ..RetrySettings::default()
            },
            &TopologySettings {
                retry_delays_secs: vec![300, 10, 60, 1800],
                ..TopologySettings::default()
            },
        )
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn a_task_failure_is_final_on_the_first_attempt() {
        for outcome in [
            Outcome::Succeeded,
            Outcome::Failed,
            Outcome::TimedOut,
            Outcome::OomKilled,
        ] {
            let d = decide(
                3,
                1,
                &AttemptEnd::Finished(outcome),
                &config(0.2),
                &mut rng(),
            );
            assert_eq!(d, Decision::PublishFinal, "{outcome}");
        }
    }

    #[test]
    fn infrastructure_failures_back_off_exponentially_through_the_ladder() {
        let c = config(0.0);
        let end = AttemptEnd::Finished(Outcome::Evicted);
        let d1 = decide(5, 1, &end, &c, &mut rng());
        assert_eq!(
            d1,
            Decision::Retry {
                delay: Duration::from_secs(10),
                next_attempt: 2,
                tier: Duration::from_secs(10)
            }
        );
        let d2 = decide(5, 2, &end, &c, &mut rng());
        assert_eq!(
            d2,
            Decision::Retry {
                delay: Duration::from_secs(20),
                next_attempt: 3,
                tier: Duration::from_secs(60)
            }
        );
        let d4 = decide(5, 4, &end, &c, &mut rng());
        assert_eq!(
            d4,
            Decision::Retry {
                delay: Duration::from_secs(80),
                next_attempt: 5,
                tier: Duration::from_secs(300)
            }
        );
    }

    #[test]
    fn jitter_stays_inside_its_band_and_the_tier_still_covers_it() {
        let c = config(0.5);
        let mut r = rng();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let Decision::Retry { delay, tier, .. } =
                decide(3, 2, &AttemptEnd::Finished(Outcome::InfraError), &c, &mut r)
            else {
                panic!("expected a retry");
            };
            assert!(delay >= Duration::from_secs(10) && delay <= Duration::from_secs(20));
            assert!(tier >= delay);
            seen.insert(delay);
        }
        assert!(seen.len() > 50, "jitter spreads the delays");
    }

    #[test]
    fn the_budget_ends_in_a_dead_letter_that_says_why() {
        let d = decide(
            3,
            3,
            &AttemptEnd::InfraError {
                error: "pod evicted: node drained".into(),
                retry_after: None,
            },
            &config(0.2),
            &mut rng(),
        );
        let Decision::DeadLetter { reason } = d else {
            panic!("expected a dead letter, got {d:?}");
        };
        assert!(reason.contains("3 attempts"), "{reason}");
        assert!(reason.contains("node drained"), "{reason}");
        // max_attempts 1 never retries.
        assert!(matches!(
            decide(
                1,
                1,
                &AttemptEnd::Finished(Outcome::Evicted),
                &config(0.2),
                &mut rng()
            ),
            Decision::DeadLetter { .. }
        ));
    }

    #[test]
    fn retry_after_is_a_floor_and_delays_are_clamped_to_the_longest_tier() {
        let c = config(0.0);
        let d = decide(
            3,
            1,
            &AttemptEnd::InfraError {
                error: "429".into(),
                retry_after: Some(Duration::from_secs(45)),
            },
            &c,
            &mut rng(),
        );
        assert!(matches!(d, Decision::Retry { delay, tier, .. }
            if delay == Duration::from_secs(45) && tier == Duration::from_secs(60)));
        let d = decide(
            40,
            30,
            &AttemptEnd::Finished(Outcome::Evicted),
            &c,
            &mut rng(),
        );
        assert!(matches!(d, Decision::Retry { delay, tier, .. }
            if delay == Duration::from_secs(1800) && tier == Duration::from_secs(1800)));
        let mut short = c.clone();
        short.ladder = vec![Duration::from_secs(5)];
        let d = decide(
            3,
            2,
            &AttemptEnd::Finished(Outcome::Evicted),
            &short,
            &mut rng(),
        );
        assert!(matches!(d, Decision::Retry { delay, tier, .. }
            if delay == Duration::from_secs(5) && tier == Duration::from_secs(5)));
    }

    #[test]
    fn fatal_errors_dead_letter_and_an_open_breaker_releases() {
        let d = decide(
            3,
            1,
            &AttemptEnd::Fatal {
                outcome: Outcome::Rejected,
                error: "Job spec invalid: 422".into(),
            },
            &config(0.2),
            &mut rng(),
        );
        assert_eq!(
            d,
            Decision::DeadLetter {
                reason: "Job spec invalid: 422".into()
            }
        );
        assert!(matches!(
            decide(3, 3, &AttemptEnd::Unavailable, &config(0.2), &mut rng()),
            Decision::Release { .. }
        ));
    }

    #[test]
    fn backoff_caps_and_never_overflows() {
        let c = config(0.0);
        assert_eq!(c.backoff(1), Duration::from_secs(10));
        assert_eq!(c.backoff(8), Duration::from_secs(1280));
        assert_eq!(c.backoff(9), Duration::from_secs(1800));
        assert_eq!(c.backoff(u32::MAX), Duration::from_secs(1800));
    }
}
