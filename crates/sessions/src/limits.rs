//! What one token may ask for. Each limit is refused with its own clear 4xx.

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
    /// update and the hand-over exec): a handful in flight keeps the API
    /// server and the replica busy, and a burst's first claims are served
    /// first instead of all at the pace of the last.
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
            claims_in_flight: 8,
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
}
