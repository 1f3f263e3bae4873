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
//!   reaches `failure_rate`.
//! - **Open**: calls are refused until the cooldown has passed.
//! - **HalfOpen**: up to `half_open_probes` calls are let through; when that
//!   many have succeeded the breaker closes (with a fresh window), and the
//!   first failure re-opens it for another cooldown.
//! - Caller errors (4xx, 409) are ignored: they say nothing about the API's
//!   health. A 429 does not count either, but it sets a throttle: every call is
//!   refused until its `Retry-After` has passed (1 s when the header is
//!   missing, as API Priority & Fairness sends).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use sandfleet_settings::BreakerSettings;

/// The throttle used for a 429 without a `Retry-After` header; the API server
/// sends `Retry-After: 1` itself, so this only covers proxies that drop it.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

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
    /// Time spent open before probing.
    pub cooldown: Duration,
    /// Probes let through while half-open (at least 1); all must succeed.
    pub half_open_probes: u32,
}

impl From<&BreakerSettings> for BreakerConfig {
    fn from(s: &BreakerSettings) -> Self {
        BreakerConfig {
            consecutive_failures: s.consecutive_failures.max(1),
            failure_rate: s.failure_rate.clamp(0.0, 1.0),
            window: s.window.max(1),
            min_calls: s.min_calls.min(s.window.max(1)),
            cooldown: Duration::from_secs(s.cooldown_secs),
            half_open_probes: s.half_open_probes.max(1),
        }
    }
}

/// The breaker's externally visible state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls pass.
    Closed,
    /// A few probe calls pass; the rest are refused.
    HalfOpen,
    /// Calls are refused.
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
    /// The breaker is open (or half-open with every probe slot taken); try
    /// again after the given instant at the earliest.
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

#[derive(Debug)]
enum Inner {
    Closed {
        /// Last `window` call results, `true` = failure.
        window: VecDeque<bool>,
        consecutive: u32,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        /// Probe permits handed out and not yet answered.
        outstanding: u32,
        /// Probes that succeeded.
        succeeded: u32,
    },
}

/// A count-based circuit breaker with an injected clock.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Inner,
    throttled_until: Option<Instant>,
    /// Times the breaker has opened (for logs and tests).
    opened: u64,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        CircuitBreaker {
            config,
            inner: Inner::Closed {
                window: VecDeque::new(),
                consecutive: 0,
            },
            throttled_until: None,
            opened: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// How many times the breaker has opened since it was created.
    pub fn times_opened(&self) -> u64 {
        self.opened
    }

    /// The state at `now`. An open breaker whose cooldown has passed reports
    /// [`BreakerState::HalfOpen`]: the next call is a probe.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if now >= until => BreakerState::HalfOpen,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// When the current cooldown ends, if the breaker is open.
    pub fn open_until(&self) -> Option<Instant> {
        match self.inner {
            Inner::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Asks to make a call at `now`. On `Ok` the caller must report the result
    /// with [`CircuitBreaker::on_result`].
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Refusal> {
        if let Some(until) = self.throttled_until {
            if now < until {
                return Err(Refusal::Throttled { until });
            }
            self.throttled_until = None;
        }
        if let Inner::Open { until } = self.inner {
            if now < until {
                return Err(Refusal::Open { until });
            }
            self.inner = Inner::HalfOpen {
                outstanding: 0,
                succeeded: 0,
            };
        }
        match &mut self.inner {
            Inner::Closed { .. } => Ok(()),
            Inner::HalfOpen {
                outstanding,
                succeeded,
            } => {
                if *outstanding + *succeeded < self.config.half_open_probes {
                    *outstanding += 1;
                    Ok(())
                } else {
                    Err(Refusal::Open { until: now })
                }
            }
            Inner::Open { .. } => unreachable_open(now),
        }
    }

    /// Records how a call ended at `now`, and returns the state afterwards.
    pub fn on_result(&mut self, now: Instant, verdict: CallVerdict) -> BreakerState {
        match verdict {
            CallVerdict::Throttled(retry_after) => {
                let until = now + retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
                self.throttled_until = Some(self.throttled_until.map_or(until, |t| t.max(until)));
                self.release_probe();
            }
            CallVerdict::Ignored => self.release_probe(),
            CallVerdict::Success => self.on_outcome(now, false),
            CallVerdict::Failure => self.on_outcome(now, true),
        }
        self.state(now)
    }

    /// When calls are throttled by a 429, until when.
    pub fn throttled_until(&self, now: Instant) -> Option<Instant> {
        self.throttled_until.filter(|&t| now < t)
    }

    fn release_probe(&mut self) {
        if let Inner::HalfOpen { outstanding, .. } = &mut self.inner {
            *outstanding = outstanding.saturating_sub(1);
        }
    }

    fn on_outcome(&mut self, now: Instant, failed: bool) {
        let cfg = &self.config;
        let open = match &mut self.inner {
            Inner::Closed {
                window,
                consecutive,
            } => {
                window.push_back(failed);
                while window.len() > cfg.window as usize {
                    window.pop_front();
                }
                *consecutive = if failed { *consecutive + 1 } else { 0 };
                let failures = window.iter().filter(|f| **f).count();
                let rate_tripped = window.len() >= cfg.min_calls.max(1) as usize
                    && failures as f64 >= cfg.failure_rate * window.len() as f64
                    && failures > 0;
                *consecutive >= cfg.consecutive_failures || rate_tripped
            }
            // A late answer to a call made before the breaker opened changes nothing.
            Inner::Open { .. } => false,
            Inner::HalfOpen {
                outstanding,
                succeeded,
            } => {
                if failed {
                    true
                } else {
                    *outstanding = outstanding.saturating_sub(1);
                    *succeeded += 1;
                    if *succeeded >= cfg.half_open_probes {
                        self.inner = Inner::Closed {
                            window: VecDeque::new(),
                            consecutive: 0,
                        };
                    }
                    false
                }
            }
        };
        if open {
            self.opened += 1;
            self.inner = Inner::Open {
                until: now + self.config.cooldown,
            };
        }
    }
}

// `try_acquire` replaces `Open` before matching; this keeps the match total
// without a panic path.
fn unreachable_open(now: Instant) -> Result<(), Refusal> {
    Err(Refusal::Open { until: now })
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
            half_open_probes: 4,
        }
    }

    fn call(b: &mut CircuitBreaker, now: Instant, v: CallVerdict) -> BreakerState {
        b.try_acquire(now).expect("permitted");
        b.on_result(now, v)
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
            b.try_acquire(clock.now()),
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
        assert!(b.try_acquire(clock.now()).is_err());
        clock.advance_secs(1);
        assert_eq!(b.state(clock.now()), BreakerState::HalfOpen);
        for _ in 0..4 {
            b.try_acquire(clock.now()).expect("probe permitted");
        }
        assert!(b.try_acquire(clock.now()).is_err(), "5th probe refused");
        // An ignored probe gives its slot back.
        b.on_result(clock.now(), CallVerdict::Ignored);
        b.try_acquire(clock.now())
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
    fn a_failed_probe_reopens_for_a_full_cooldown() {
        let mut clock = Clock(Instant::now());
        let mut b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 1,
            ..config()
        });
        call(&mut b, clock.now(), CallVerdict::Failure);
        clock.advance_secs(60);
        call(&mut b, clock.now(), CallVerdict::Success);
        assert_eq!(
            call(&mut b, clock.now(), CallVerdict::Failure),
            BreakerState::Open
        );
        assert_eq!(b.times_opened(), 2);
        clock.advance_secs(59);
        assert!(b.try_acquire(clock.now()).is_err());
        clock.advance_secs(1);
        assert!(b.try_acquire(clock.now()).is_ok());
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
        let refusal = b.try_acquire(clock.now()).unwrap_err();
        assert!(matches!(refusal, Refusal::Throttled { .. }));
        assert_eq!(refusal.until(), clock.now() + Duration::from_secs(1));
        clock.advance_secs(1);
        assert!(b.try_acquire(clock.now()).is_ok());
        // Without a header the throttle is one second.
        b.on_result(clock.now(), CallVerdict::Throttled(None));
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
        b.try_acquire(clock.now()).unwrap();
        b.try_acquire(clock.now()).unwrap();
        b.on_result(clock.now(), CallVerdict::Failure);
        b.on_result(clock.now(), CallVerdict::Success);
        assert_eq!(b.state(clock.now()), BreakerState::Open);
        clock.advance_secs(30);
        b.on_result(clock.now(), CallVerdict::Failure);
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
    }
}
