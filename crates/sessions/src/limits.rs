//! What one token may ask for. Each limit is refused with its own clear 4xx.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::error::ApiError;

/// The service's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Sessions one token may hold at once (429 beyond).
    pub sessions_per_token: usize,
    /// Longest max lifetime a session may ask for (422 beyond).
    pub max_lifetime: Duration,
    /// Longest idle timeout a session may ask for (422 beyond).
    pub max_idle_timeout: Duration,
    /// Largest file a request may write or read (413 beyond).
    pub max_file_bytes: usize,
    /// Longest command timeout (422 beyond).
    pub max_command_timeout: Duration,
    /// Largest output kept per stream of a command.
    pub max_output_bytes: usize,
    /// Warm-pool claims one replica has under way at once; more wait their
    /// turn, in arrival order. Each claim is two API calls (the conditional
    /// update and the hand-over, an attach): a handful in flight keeps the
    /// API server and the replica busy, and a burst's first claims are
    /// served first instead of all at the pace of the last. 4: a claim no
    /// longer waits for an exec (a process started in the sandbox), so four
    /// keep as many claims a second going as eight did with the exec, and
    /// where the replica, the API server and the sandboxes share CPU, fewer
    /// at once finish sooner (measured in docs/sessions.md).
    pub claims_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            sessions_per_token: 10,
            max_lifetime: Duration::from_secs(4 * 3600),
            max_idle_timeout: Duration::from_secs(3600),
            max_file_bytes: 16 << 20,
            max_command_timeout: Duration::from_secs(1800),
            max_output_bytes: 1 << 20,
            claims_in_flight: 4,
        }
    }
}

impl Limits {
    /// Refuses a session that would exceed the lifetime or idle limits.
    pub fn check_spec(&self, idle: Duration, lifetime: Duration) -> Result<(), ApiError> {
        if lifetime > self.max_lifetime {
            return Err(ApiError::limit(
                422,
                "lifetime_limit",
                format!(
                    "max_lifetime {}s exceeds this service's limit of {}s",
                    lifetime.as_secs(),
                    self.max_lifetime.as_secs()
                ),
            ));
        }
        if idle > self.max_idle_timeout {
            return Err(ApiError::limit(
                422,
                "idle_limit",
                format!(
                    "idle_timeout {}s exceeds this service's limit of {}s",
                    idle.as_secs(),
                    self.max_idle_timeout.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a new session beyond the per-token count.
    pub fn check_count(&self, held: usize) -> Result<(), ApiError> {
        if held >= self.sessions_per_token {
            return Err(ApiError::limit(
                429,
                "session_limit",
                format!(
                    "this token holds {held} sessions, the limit is {}; delete one first",
                    self.sessions_per_token
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a file larger than the limit.
    pub fn check_file(&self, bytes: usize) -> Result<(), ApiError> {
        if bytes > self.max_file_bytes {
            return Err(ApiError::limit(
                413,
                "file_limit",
                format!(
                    "{bytes} bytes exceed this service's file limit of {} bytes",
                    self.max_file_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a command timeout beyond the limit (and a zero one).
    pub fn check_timeout(&self, timeout: Duration) -> Result<(), ApiError> {
        if timeout.is_zero() || timeout > self.max_command_timeout {
            return Err(ApiError::limit(
                422,
                "timeout_limit",
                format!(
                    "timeout_secs must be between 1 and {}",
                    self.max_command_timeout.as_secs()
                ),
            ));
        }
        Ok(())
    }
}

/// The per-token count on one replica: the sessions that exist and the
/// starts under way.
///
/// A start (a warm-pool claim or a cold start) takes from milliseconds to a
/// minute; until it returns, the session it makes is in no count. Counting
/// only what exists, a burst of concurrent creates by one token all read the
/// same count and all passed the check. Here a create reserves its start
/// when it passes the check, and the start is released only once the session
/// is counted where the check reads it ([`Starts::started`]), so every check
/// sees each session exactly once: as a start under way or as a session.
///
/// Replicas do not share their starts: two replicas creating sessions for one
/// token at the same instant can each pass (docs/sessions.md, "Limits").
#[derive(Debug, Default)]
pub(crate) struct Starts {
    /// Held while a check reads the count and reserves a start, and while a
    /// finished start is counted as a session and released: one at a time,
    /// so no check reads the count between the two.
    turn: tokio::sync::Mutex<()>,
    under_way: Arc<Mutex<HashMap<String, usize>>>,
}

/// A start under way, reserved by [`Starts::reserve`]; dropped without
/// [`Starts::started`] (the start failed), it stops counting at once.
#[derive(Debug)]
pub(crate) struct Start {
    under_way: Arc<Mutex<HashMap<String, usize>>>,
    owner: String,
}

impl Drop for Start {
    fn drop(&mut self) {
        let mut under_way = self
            .under_way
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = under_way.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 {
                under_way.remove(&self.owner);
            }
        }
    }
}

impl Starts {
    /// Checks `owner`'s sessions (`held`, counted while no other check or
    /// release runs) plus its starts under way against the limit, and
    /// reserves a start when there is room.
    pub(crate) async fn reserve<F, Fut>(
        &self,
        limits: &Limits,
        owner: &str,
        held: F,
    ) -> Result<Start, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<usize, ApiError>>,
    {
        let _turn = self.turn.lock().await;
        let held = held().await?;
        let mut under_way = self
            .under_way
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let starting = under_way.get(owner).copied().unwrap_or(0);
        limits.check_count(held + starting)?;
        *under_way.entry(owner.to_owned()).or_default() += 1;
        Ok(Start {
            under_way: self.under_way.clone(),
            owner: owner.to_owned(),
        })
    }

    /// `start` made its session: `count` makes it part of what the next
    /// checks read as held, and the start is released in the same turn.
    pub(crate) async fn started(&self, start: Start, count: impl FnOnce()) {
        let _turn = self.turn.lock().await;
        count();
        drop(start);
    }

    /// Starts under way for `owner`.
    #[cfg(test)]
    fn under_way(&self, owner: &str) -> usize {
        let under_way = self
            .under_way
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        under_way.get(owner).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_has_its_own_status_and_code() {
        let l = Limits {
            sessions_per_token: 1,
            ..Limits::default()
        };
        assert_eq!(l.check_count(1).unwrap_err().status, 429);
        assert!(l.check_count(0).is_ok());
        assert_eq!(l.check_file(l.max_file_bytes + 1).unwrap_err().status, 413);
        assert_eq!(
            l.check_timeout(Duration::from_secs(100_000))
                .unwrap_err()
                .code,
            "timeout_limit"
        );
        assert_eq!(
            l.check_spec(Duration::from_secs(1), Duration::from_secs(1 << 30))
                .unwrap_err()
                .code,
            "lifetime_limit"
        );
    }

    #[tokio::test]
    async fn a_check_counts_the_starts_under_way_until_they_are_counted_as_sessions() {
        let limits = Limits {
            sessions_per_token: 2,
            ..Limits::default()
        };
        let starts = Starts::default();
        let held = std::sync::atomic::AtomicUsize::new(0);
        let count = || async { Ok(held.load(std::sync::atomic::Ordering::SeqCst)) };
        let a = starts.reserve(&limits, "t", count).await.unwrap();
        let b = starts.reserve(&limits, "t", count).await.unwrap();
        // Two under way, none held yet: a third is refused.
        let refused = starts.reserve(&limits, "t", count).await.unwrap_err();
        assert_eq!(refused.code, "session_limit");
        // Another token has its own count.
        drop(starts.reserve(&limits, "u", count).await.unwrap());
        assert_eq!(starts.under_way("u"), 0);

        // One start fails: its place is free at once.
        drop(a);
        let c = starts.reserve(&limits, "t", count).await.unwrap();
        // One succeeds: it moves from under way to held, never both or neither.
        starts
            .started(b, || {
                held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
            .await;
        assert_eq!(starts.under_way("t"), 1);
        assert!(starts.reserve(&limits, "t", count).await.is_err());
        drop(c);
        assert_eq!(starts.under_way("t"), 0);
        drop(starts.reserve(&limits, "t", count).await.unwrap());
    }
}
