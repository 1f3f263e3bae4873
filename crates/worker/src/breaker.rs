//! The circuit breaker around the Kubernetes API.
//!
//! [`CircuitBreaker`] is a plain state machine: every method takes the current
//! [`Instant`], so tests drive it with an injected clock and no sleeps. The
//! worker wraps it in [`crate::gate::BreakerGate`], which implements the
//! sandbox's `ApiGate` and records metrics.
//!
//! Semantics (design decision 3, converging with resilience4j / Polly):
//! - **Closed**: calls pass. A failure (5xx, timeout, connection error) adds to
//!   the consecutive-failure count and to a count-based sliding window. The
//!   breaker opens when `consecutive_failures` failures happen in a row, or
//!   when the window holds at least `min_calls` calls and the failure rate
//!   reaches `failure_rate`. It remembers *which* calls failed (the verbs:
//!   `create`, `get`, `list`, `delete`, `logs`).
//! - **Open**: calls of a failing verb are refused until the cooldown has
//!   passed. Calls of the other verbs still pass, so in-flight tasks keep
//!   reading their Jobs and logs while only Job creation is broken; one of
//!   them failing too joins the failing set.
//! - **HalfOpen**: up to `half_open_probes` calls of the failing verbs are
//!   let through (trials of the real call, or probes of that verb). The
//!   breaker closes only on evidence that the failing calls work again: that
//!   many successes, at least one per failing verb. A success of some other
//!   verb proves nothing (a list that works says nothing about creates). Any
//!   failure re-opens it (verbs that succeeded meanwhile leave the failing
//!   set, so a log read that recovered is not held hostage by creates that
//!   did not), for a cooldown that doubles with each failed trial
//!   (`cooldown`, `2·cooldown`, ... up to `max_cooldown`), so a persistent
//!   fault costs a trial every few minutes, not every cooldown.
//! - Caller errors (4xx, 409) are ignored: they say nothing about the API's
//!   health. A 429 does not count either, but it sets a throttle: every call is
//!   refused until its `Retry-After` has passed (1 s when the header is
//!   missing, as API Priority & Fairness sends).

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use sandfleet_settings::BreakerSettings;

/// The throttle used for a 429 without a `Retry-After` header; the API server
/// sends `Retry-After: 1` itself, so this only covers proxies that drop it.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The longest cooldown that doubling may reach, unless the configured
/// cooldown is longer still: a recovered API is noticed within this.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(300);

/// Tuning of a [`CircuitBreaker`], validated from [`BreakerSettings`].
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker (at least 1).
    pub consecutive_failures: u32,
    /// Failure rate in `0.0..=1.0` over the window that opens the breaker.
    pub failure_rate: f64,
    /// Calls in the sliding window (at least 1).
    pub window: u32,
    /// Calls the window must hold before its rate is judged.
    pub min_calls: u32,
    /// Time spent open before the first trial.
    pub cooldown: Duration,
    /// The cap of the doubling cooldown after failed trials (at least
    /// `cooldown`).
    pub max_cooldown: Duration,
    /// Trials let through while half-open (at least 1); all must succeed.
    pub half_open_probes: u32,
}

impl From<&BreakerSettings> for BreakerConfig {
    fn from(s: &BreakerSettings) -> Self {
        let cooldown = Duration::from_secs(s.cooldown_secs);
        BreakerConfig {
            consecutive_failures: s.consecutive_failures.max(1),
            failure_rate: s.failure_rate.clamp(0.0, 1.0),
            window: s.window.max(1),
            min_calls: s.min_calls.min(s.window.max(1)),
            cooldown,
            // Eight cooldowns (four failed trials), within five minutes.
            max_cooldown: (cooldown * 8).min(MAX_COOLDOWN).max(cooldown),
            half_open_probes: s.half_open_probes.max(1),
        }
    }
}

/// The breaker's externally visible state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls pass.
    Closed,
    /// A few trial calls of the failing verbs pass.
    HalfOpen,
    /// Calls of the failing verbs are refused.
    Open,
}

impl BreakerState {
    /// The value of the `sandfleet_breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }

    /// Lower-case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }
}

/// How one API call ended, as far as the breaker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallVerdict {
    /// The call succeeded.
    Success,
    /// 5xx, timeout, connection error: counts against the API.
    Failure,
    /// A caller error (4xx, 409, cancellation): not counted.
    Ignored,
    /// 429: not counted, but calls wait until the given time has passed.
    Throttled(Option<Duration>),
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The breaker is open for this verb (or half-open with every trial slot
    /// taken); try again after the given instant at the earliest.
    Open {
        /// When the cooldown ends (for half-open: now).
        until: Instant,
    },
    /// A 429 asked callers to wait until this instant.
    Throttled {
        /// When calls may resume.
        until: Instant,
    },
}

impl Refusal {
    /// When it is worth asking again.
    pub fn until(&self) -> Instant {
        match *self {
            Refusal::Open { until } | Refusal::Throttled { until } => until,
        }
    }
}

/// The verbs whose calls failed; `&'static str` labels from the executor.
type Verbs = BTreeSet<&'static str>;

#[derive(Debug)]
enum Inner {
    Closed {
        /// Last `window` calls: the verb and `true` for a failure.
        window: VecDeque<(&'static str, bool)>,
        consecutive: u32,
    },
    Open {
        until: Instant,
        failing: Verbs,
        /// Failed trials since the breaker tripped (sets the cooldown).
        reopened: u32,
    },
    HalfOpen {
        failing: Verbs,
        /// Failing verbs that have succeeded in a trial.
        proven: Verbs,
        /// Trial permits handed out and not yet answered.
        outstanding: u32,
        /// Trials that succeeded.
        succeeded: u32,
        reopened: u32,
    },
}

/// A count-based circuit breaker with an injected clock.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Inner,
    throttled_until: Option<Instant>,
    /// Times the breaker has opened, re-opens after a failed trial included.
    opened: u64,
    /// Times it went from closed to open.
    tripped: u64,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        CircuitBreaker {
            config,
            inner: closed(),
            throttled_until: None,
            opened: 0,
            tripped: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// How many times the breaker has opened since it was created, re-opens
    /// after failed trials included.
    pub fn times_opened(&self) -> u64 {
        self.opened
    }

    /// How many times it went from closed to open (each one a flap of
    /// `/readyz`).
    pub fn times_tripped(&self) -> u64 {
        self.tripped
    }

    /// The state at `now`. An open breaker whose cooldown has passed reports
    /// [`BreakerState::HalfOpen`]: the next call of a failing verb is a trial.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until, .. } if now >= until => BreakerState::HalfOpen,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// When the current cooldown ends, if the breaker is open.
    pub fn open_until(&self) -> Option<Instant> {
        match self.inner {
            Inner::Open { until, .. } => Some(until),
            _ => None,
        }
    }

    /// The verbs the breaker refuses while it is not closed (empty when it is).
    pub fn failing_verbs(&self) -> Vec<&'static str> {
        match &self.inner {
            Inner::Closed { .. } => Vec::new(),
            Inner::Open { failing, .. } | Inner::HalfOpen { failing, .. } => {
                failing.iter().copied().collect()
            }
        }
    }

    /// Asks to make a `verb` call at `now`. On `Ok` the caller must report
    /// the result with [`CircuitBreaker::on_result`].
    pub fn try_acquire(&mut self, now: Instant, verb: &'static str) -> Result<(), Refusal> {
        if let Some(until) = self.throttled_until {
            if now < until {
                return Err(Refusal::Throttled { until });
            }
            self.throttled_until = None;
        }
        if let Inner::Open {
            until,
            failing,
            reopened,
        } = &mut self.inner
        {
            if !failing.contains(verb) {
                return Ok(());
            }
            if now < *until {
                return Err(Refusal::Open { until: *until });
            }
            self.inner = Inner::HalfOpen {
                failing: std::mem::take(failing),
                proven: Verbs::new(),
                outstanding: 0,
                succeeded: 0,
                reopened: *reopened,
            };
        }
        match &mut self.inner {
            Inner::HalfOpen {
                failing,
                outstanding,
                succeeded,
                ..
            } => {
                if !failing.contains(verb) {
                    Ok(())
                } else if *outstanding + *succeeded < self.config.half_open_probes {
                    *outstanding += 1;
                    Ok(())
                } else {
                    Err(Refusal::Open { until: now })
                }
            }
            _ => Ok(()),
        }
    }

    /// Records how a `verb` call ended at `now`, and returns the state
    /// afterwards.
    pub fn on_result(
        &mut self,
        now: Instant,
        verb: &'static str,
        verdict: CallVerdict,
    ) -> BreakerState {
        match verdict {
            CallVerdict::Throttled(retry_after) => {
                let until = now + retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
                self.throttled_until = Some(self.throttled_until.map_or(until, |t| t.max(until)));
                self.release_trial(verb);
            }
            CallVerdict::Ignored => self.release_trial(verb),
            CallVerdict::Success => self.on_success(now, verb),
            CallVerdict::Failure => self.on_failure(now, verb),
        }
        self.state(now)
    }

    /// When calls are throttled by a 429, until when.
    pub fn throttled_until(&self, now: Instant) -> Option<Instant> {
        self.throttled_until.filter(|&t| now < t)
    }

    fn release_trial(&mut self, verb: &'static str) {
        if let Inner::HalfOpen {
            failing,
            outstanding,
            ..
        } = &mut self.inner
            && failing.contains(verb)
        {
            *outstanding = outstanding.saturating_sub(1);
        }
    }

    fn on_success(&mut self, now: Instant, verb: &'static str) {
        let probes = self.config.half_open_probes;
        match &mut self.inner {
            Inner::Closed {
                window,
                consecutive,
            } => {
                *consecutive = 0;
                push(window, self.config.window, verb, false);
                // A success can make the window judgeable (min_calls).
                if let Some(failing) = rate_tripped(window, &self.config) {
                    self.tripped += 1;
                    self.open(now, failing, 0);
                }
            }
            // A verb the outage does not concern: no evidence either way. A
            // failing verb that answers (a trial whose round already failed
            // on another verb): it works again, so stop refusing it; the
            // last failing verb stays until a trial closes the breaker.
            Inner::Open { failing, .. } => {
                if failing.len() > 1 {
                    failing.remove(verb);
                }
            }
            Inner::HalfOpen {
                failing,
                proven,
                outstanding,
                succeeded,
                ..
            } => {
                if !failing.contains(verb) {
                    return;
                }
                *outstanding = outstanding.saturating_sub(1);
                *succeeded += 1;
                proven.insert(verb);
                if *succeeded >= probes && proven.is_superset(failing) {
                    self.inner = closed();
                }
            }
        }
    }

    fn on_failure(&mut self, now: Instant, verb: &'static str) {
        let cfg = &self.config;
        match &mut self.inner {
            Inner::Closed {
                window,
                consecutive,
            } => {
                push(window, cfg.window, verb, true);
                *consecutive += 1;
                let tripped = if *consecutive >= cfg.consecutive_failures {
                    Some(failed_verbs(window))
                } else {
                    rate_tripped(window, cfg)
                };
                if let Some(failing) = tripped {
                    self.tripped += 1;
                    self.open(now, failing, 0);
                }
            }
            // A verb that was let through fails too: refuse it from now on.
            // The cooldown is not extended by late answers.
            Inner::Open { failing, .. } => {
                failing.insert(verb);
            }
            Inner::HalfOpen {
                failing,
                proven,
                reopened,
                ..
            } => {
                // Verbs that succeeded in this round are no longer refused.
                let mut failing: Verbs = failing.difference(proven).copied().collect();
                failing.insert(verb);
                let reopened = *reopened + 1;
                self.open(now, failing, reopened);
            }
        }
    }

    fn open(&mut self, now: Instant, failing: Verbs, reopened: u32) {
        let cfg = &self.config;
        let cooldown = cfg
            .cooldown
            .saturating_mul(1u32.checked_shl(reopened.min(31)).unwrap_or(u32::MAX))
            .min(cfg.max_cooldown.max(cfg.cooldown));
        self.opened += 1;
        self.inner = Inner::Open {
            until: now + cooldown,
            failing,
            reopened,
        };
    }
}

fn closed() -> Inner {
    Inner::Closed {
        window: VecDeque::new(),
        consecutive: 0,
    }
}

/// The failing verbs, when the window's failure rate trips the breaker.
fn rate_tripped(window: &VecDeque<(&'static str, bool)>, cfg: &BreakerConfig) -> Option<Verbs> {
    let failures = window.iter().filter(|(_, f)| *f).count();
    (window.len() >= cfg.min_calls.max(1) as usize
        && failures > 0
        && failures as f64 >= cfg.failure_rate * window.len() as f64)
        .then(|| failed_verbs(window))
}

fn failed_verbs(window: &VecDeque<(&'static str, bool)>) -> Verbs {
    window.iter().filter(|(_, f)| *f).map(|(v, _)| *v).collect()
}

fn push(window: &mut VecDeque<(&'static str, bool)>, len: u32, verb: &'static str, failed: bool) {
    window.push_back((verb, failed));
    while window.len() > len as usize {
        window.pop_front();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! Modelled on resilience4j's `CircuitBreakerStateMachineTest`: a mock
    //! clock advanced by hand, exact transitions asserted.

    use super::*;

    struct Clock(Instant);
    impl Clock {
        fn now(&self) -> Instant {
            self.0
        }
        fn advance_secs(&mut self, s: u64) {
            self.0 += Duration::from_secs(s);
        }
    }

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 100,
            failure_rate: 0.5,
            window: 5,
            min_calls: 5,
            cooldown: Duration::from_secs(60),
            max_cooldown: Duration::from_secs(240),
            half_open_probes: 4,
        }
    }

    fn call(b: &mut CircuitBreaker, now: Instant, v: CallVerdict) -> BreakerState {
        b.try_acquire(now, "create").expect("permitted");
        b.on_result(now, "create", v)
    }

    #[test]
    fn opens_on_failure_rate_once_min_calls_reached() {
        let clock = Clock(Instant::now());
        let mut b = CircuitBreaker::new(config());
        // 3 failures of 4 calls: over 50 %, but fewer than min_calls.
        for v in [
            CallVerdict::Failure,
            CallVerdict::Success,
            CallVerdict::Failure,
            CallVerdict::Failure,
        ] {
            assert_eq!(call(&mut b, clock.now(), v), BreakerState::Closed);
        }
        // The 5th call (a success) makes the window judgeable: 3/5 = 60 %.
        assert_eq!(
            call(&mut b, clock.now(), CallVerdict::Success),
            BreakerState::Open
        );
        assert!(matches!(
            b.try_acquire(clock.now(), "create"),
            Err(Refusal::Open { .. })
        ));
        assert_eq!(b.times_opened(), 1);
    }

    #[test]
    fn stays_closed_below_the_rate() {
        let clock = Clock(Instant::now());
        let mut b = CircuitBreaker::new(config());
        for v in [
            CallVerdict::Failure,
            CallVerdict::Success,
            CallVerdict::Success,
            CallVerdict::Failure,
            CallVerdict::Success,
            CallVerdict::Success,
            CallVerdict::Success,
        ] {
            assert_eq!(call(&mut b, clock.now(), v), BreakerState::Closed);
        }
    }

    #[test]
    fn opens_on_consecutive_failures_before_min_calls() {
        let clock = Clock(Instant::now());
        let mut b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 3,
            min_calls: 100,
            window: 100,
            ..config()
        });
        call(&mut b, clock.now(), CallVerdict::Failure);
        call(&mut b, clock.now(), CallVerdict::Success);
        call(&mut b, clock.now(), CallVerdict::Failure);
        call(&mut b, clock.now(), CallVerdict::Failure);
        assert_eq!(
            call(&mut b, clock.now(), CallVerdict::Failure),
            BreakerState::Open
        );
    }

    #[test]
    fn ignored_calls_are_not_counted() {
        let clock = Clock(Instant::now());
        let mut b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 2,
            ..config()
        });
        call(&mut b, clock.now(), CallVerdict::Failure);
        for _ in 0..10 {
            assert_eq!(
                call(&mut b, clock.now(), CallVerdict::Ignored),
                BreakerState::Closed
            );
        }
        // The ignored 409s did not break the run of failures either way.
        assert_eq!(
            call(&mut b, clock.now(), CallVerdict::Failure),
            BreakerState::Open
        );
    }

    #[test]
    fn half_open_after_cooldown_and_the_fifth_probe_is_refused() {
        let mut clock = Clock(Instant::now());
        let mut b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 1,
            ..config()
        });
        call(&mut b, clock.now(), CallVerdict::Failure);
        clock.advance_secs(59);
        assert_eq!(b.state(clock.now()), BreakerState::Open);
        assert!(b.try_acquire(clock.now(), "create").is_err());
        clock.advance_secs(1);
        assert_eq!(b.state(clock.now()), BreakerState::HalfOpen);
        for _ in 0..4 {
            b.try_acquire(clock.now(), "create")
                .expect("probe permitted");
        }
        assert!(
            b.try_acquire(clock.now(), "create").is_err(),
            "5th probe refused"
        );
        // An ignored probe gives its slot back.
        b.on_result(clock.now(), "create", CallVerdict::Ignored);
        b.try_acquire(clock.now(), "create")
            .expect("slot released by ignored call");
    }

    #[test]
    fn half_open_closes_after_all_probes_succeed() {
        let mut clock = Clock(Instant::now());
        let mut b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 1,
            ..config()
        });
        call(&mut b, clock.now(), CallVerdict::Failure);
        clock.advance_secs(60);
        for i in 0..4 {
            let s = call(&mut b, clock.now(), CallVerdict::Success);
            let want = if i < 3 {
                BreakerState::HalfOpen
            } else {
                BreakerState::Closed
            };
            assert_eq!(s, want, "after probe {i}");
        }
        // Closing starts a fresh window: check with a rate-based breaker.
        let mut b2 = CircuitBreaker::new(config());
        for _ in 0..5 {
            call(&mut b2, clock.now(), CallVerdict::Failure);
        }
        assert_eq!(b2.state(clock.now()), BreakerState::Open);
        clock.advance_secs(60);
        for _ in 0..4 {
            call(&mut b2, clock.now(), CallVerdict::Success);
        }
        assert_eq!(b2.state(clock.now()), BreakerState::Closed);
        // The old failures are forgotten: 2 failures of 5 stays closed.
        for v in [
            CallVerdict::Failure,
            CallVerdict::Success,
            CallVerdict::Failure,
            CallVerdict::Success,
            CallVerdict::Success,
        ] {
            assert_eq!(call(&mut b2, clock.now(), v), BreakerState::Closed);
        }
    }

    #[test]
    fn failed_trials_reopen_for_doubling_cooldowns_up_to_the_cap() {
        let mut clock = Clock(Instant::now());
        let mut b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 1,
            ..config()
        });
        call(&mut b, clock.now(), CallVerdict::Failure);
        assert_eq!(b.times_tripped(), 1);
        // Cooldowns 60, 120, 240, then the 240 s cap.
        for (i, cooldown) in [60, 120, 240, 240, 240].into_iter().enumerate() {
            clock.advance_secs(cooldown - 1);
            assert!(
                b.try_acquire(clock.now(), "create").is_err(),
                "trial {i} too early"
            );
            clock.advance_secs(1);
            if i > 0 {
                call(&mut b, clock.now(), CallVerdict::Success);
            }
            assert_eq!(
                call(&mut b, clock.now(), CallVerdict::Failure),
                BreakerState::Open
            );
        }
        assert_eq!(b.times_opened(), 6);
        assert_eq!(b.times_tripped(), 1, "never closed in between");
        // The API recovers: the next trials close it, and a later trip starts
        // again from the configured cooldown.
        clock.advance_secs(240);
        for _ in 0..4 {
            call(&mut b, clock.now(), CallVerdict::Success);
        }
        assert_eq!(b.state(clock.now()), BreakerState::Closed);
        call(&mut b, clock.now(), CallVerdict::Failure);
        clock.advance_secs(60);
        assert!(b.try_acquire(clock.now(), "create").is_ok());
    }

    #[test]
    fn only_the_failing_verb_is_refused_and_only_its_success_closes() {
        let mut clock = Clock(Instant::now());
        let mut b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 3,
            half_open_probes: 2,
            ..config()
        });
        for _ in 0..3 {
            b.try_acquire(clock.now(), "create").unwrap();
            b.on_result(clock.now(), "create", CallVerdict::Failure);
        }
        assert_eq!(b.state(clock.now()), BreakerState::Open);
        assert_eq!(b.failing_verbs(), ["create"]);
        // Reads of in-flight Jobs and their logs still pass.
        for verb in ["get", "logs", "list"] {
            b.try_acquire(clock.now(), verb).expect("not failing");
            b.on_result(clock.now(), verb, CallVerdict::Success);
        }
        assert!(b.try_acquire(clock.now(), "create").is_err());
        // Half-open: lists keep succeeding, which proves nothing about
        // creates; the breaker stays half-open however many there are.
        clock.advance_secs(60);
        for _ in 0..10 {
            b.try_acquire(clock.now(), "list").unwrap();
            assert_eq!(
                b.on_result(clock.now(), "list", CallVerdict::Success),
                BreakerState::HalfOpen
            );
        }
        // A failed create trial re-opens it.
        b.try_acquire(clock.now(), "create").unwrap();
        b.on_result(clock.now(), "create", CallVerdict::Failure);
        assert_eq!(b.state(clock.now()), BreakerState::Open);
        // Once creates work again, two create trials close it.
        clock.advance_secs(120);
        for _ in 0..2 {
            b.try_acquire(clock.now(), "create").unwrap();
            b.on_result(clock.now(), "create", CallVerdict::Success);
        }
        assert_eq!(b.state(clock.now()), BreakerState::Closed);
        assert_eq!(b.times_tripped(), 1);
    }

    #[test]
    fn a_verb_that_fails_while_open_joins_the_failing_set() {
        let mut clock = Clock(Instant::now());
        let mut b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 1,
            half_open_probes: 1,
            ..config()
        });
        b.try_acquire(clock.now(), "create").unwrap();
        b.on_result(clock.now(), "create", CallVerdict::Failure);
        b.try_acquire(clock.now(), "logs").unwrap();
        b.on_result(clock.now(), "logs", CallVerdict::Failure);
        assert_eq!(b.failing_verbs(), ["create", "logs"]);
        assert!(b.try_acquire(clock.now(), "logs").is_err());
        // Closing needs a success of each failing verb.
        clock.advance_secs(60);
        b.try_acquire(clock.now(), "create").unwrap();
        assert_eq!(
            b.on_result(clock.now(), "create", CallVerdict::Success),
            BreakerState::HalfOpen
        );
        b.try_acquire(clock.now(), "logs").unwrap_err();
    }

    #[test]
    fn a_verb_that_recovers_is_no_longer_refused_while_another_still_fails() {
        let mut clock = Clock(Instant::now());
        let mut b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 2,
            half_open_probes: 2,
            ..config()
        });
        for verb in ["create", "logs"] {
            b.try_acquire(clock.now(), verb).unwrap();
            b.on_result(clock.now(), verb, CallVerdict::Failure);
        }
        assert_eq!(b.failing_verbs(), ["create", "logs"]);
        // One round of trials, both in flight: the create trial fails (the
        // breaker re-opens), the log trial then succeeds.
        clock.advance_secs(60);
        b.try_acquire(clock.now(), "create").unwrap();
        b.try_acquire(clock.now(), "logs").unwrap();
        b.on_result(clock.now(), "create", CallVerdict::Failure);
        b.on_result(clock.now(), "logs", CallVerdict::Success);
        assert_eq!(b.state(clock.now()), BreakerState::Open);
        assert_eq!(b.failing_verbs(), ["create"], "logs work again");
        b.try_acquire(clock.now(), "logs").expect("log reads pass");
        assert!(b.try_acquire(clock.now(), "create").is_err());
        // The other order: the log trial succeeds first, then the create
        // trial fails; the new round refuses creates only.
        let mut b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 2,
            half_open_probes: 2,
            ..config()
        });
        for verb in ["create", "logs"] {
            b.try_acquire(clock.now(), verb).unwrap();
            b.on_result(clock.now(), verb, CallVerdict::Failure);
        }
        clock.advance_secs(60);
        b.try_acquire(clock.now(), "create").unwrap();
        b.try_acquire(clock.now(), "logs").unwrap();
        b.on_result(clock.now(), "logs", CallVerdict::Success);
        b.on_result(clock.now(), "create", CallVerdict::Failure);
        assert_eq!(b.failing_verbs(), ["create"]);
    }

    #[test]
    fn throttled_429_refuses_until_retry_after_without_tripping() {
        let mut clock = Clock(Instant::now());
        let mut b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 1,
            ..config()
        });
        for _ in 0..10 {
            clock.advance_secs(3);
            let s = call(
                &mut b,
                clock.now(),
                CallVerdict::Throttled(Some(Duration::from_secs(3))),
            );
            assert_eq!(s, BreakerState::Closed);
        }
        clock.advance_secs(2);
        let refusal = b.try_acquire(clock.now(), "create").unwrap_err();
        assert!(matches!(refusal, Refusal::Throttled { .. }));
        assert_eq!(refusal.until(), clock.now() + Duration::from_secs(1));
        clock.advance_secs(1);
        assert!(b.try_acquire(clock.now(), "create").is_ok());
        // Without a header the throttle is one second.
        b.on_result(clock.now(), "create", CallVerdict::Throttled(None));
        assert_eq!(
            b.throttled_until(clock.now()),
            Some(clock.now() + DEFAULT_RETRY_AFTER)
        );
    }

    #[test]
    fn late_results_while_open_change_nothing() {
        let mut clock = Clock(Instant::now());
        let mut b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 1,
            ..config()
        });
        b.try_acquire(clock.now(), "create").unwrap();
        b.try_acquire(clock.now(), "create").unwrap();
        b.on_result(clock.now(), "create", CallVerdict::Failure);
        b.on_result(clock.now(), "create", CallVerdict::Success);
        assert_eq!(b.state(clock.now()), BreakerState::Open);
        clock.advance_secs(30);
        b.on_result(clock.now(), "create", CallVerdict::Failure);
        clock.advance_secs(30);
        // The cooldown was not extended by the late failure.
        assert_eq!(b.state(clock.now()), BreakerState::HalfOpen);
    }

    #[test]
    fn settings_are_clamped_into_a_working_config() {
        let c = BreakerConfig::from(&BreakerSettings {
            consecutive_failures: 0,
            failure_rate: 3.0,
            window: 0,
            min_calls: 50,
            cooldown_secs: 7,
            half_open_probes: 0,
        });
        assert_eq!(c.consecutive_failures, 1);
        assert_eq!(c.failure_rate, 1.0);
        assert_eq!(c.window, 1);
        assert_eq!(c.min_calls, 1);
        assert_eq!(c.half_open_probes, 1);
        assert_eq!(c.cooldown, Duration::from_secs(7));
        assert_eq!(c.max_cooldown, Duration::from_secs(56));
    }
}
