//! Time and duration arguments: `2s`, `90m`, `2h`, `7d`, `1w 2d`, or RFC 3339
//! instants.
//!
//! Durations are parsed by jiff's span parser (its "friendly" format, and ISO
//! 8601 `PT2H`), which checks every unit's range; nothing here multiplies
//! user input, so an absurd value (`100000000d`) is a usage error (exit 2),
//! never an overflow.

use std::time::Duration;

use chrono::{DateTime, Utc};
use jiff::{Span, SpanRelativeTo};

use crate::exit::{CliError, CliResult};

const EXAMPLES: &str = "expected e.g. 500ms, 2s, 90m, 2h, 7d, 1w 2d";

/// Parses `500ms`, `2s`, `90m`, `2h`, `7d`, `1w 2d` (a bare number is
/// seconds). Days are 24 hours; months and years are refused (their length
/// varies).
pub fn parse_duration(s: &str) -> CliResult<Duration> {
    let s = s.trim();
    let bad = |why: &dyn std::fmt::Display| {
        CliError::Usage(format!("invalid duration {s:?}: {why} ({EXAMPLES})"))
    };
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| bad(&e));
    }
    let span: Span = s.parse().map_err(|e: jiff::Error| bad(&e))?;
    if span.get_years() != 0 || span.get_months() != 0 {
        return Err(bad(&"months and years have no fixed length; use days"));
    }
    let signed = span
        .to_duration(SpanRelativeTo::days_are_24_hours())
        .map_err(|e| bad(&e))?;
    Duration::try_from(signed).map_err(|_| bad(&"must not be negative"))
}

/// Parses an instant: RFC 3339 (`2026-11-26T20:00:00Z`), or an age before
/// `now` (`2h` means two hours ago). An age reaching before the calendar's
/// range is a usage error.
pub fn parse_time(s: &str, now: DateTime<Utc>) -> CliResult<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    let age = parse_duration(s).map_err(|e| {
        CliError::Usage(format!(
            "invalid time {s:?}: expected RFC 3339 like 2026-11-26T20:00:00Z, or an age like 2h ({e})"
        ))
    })?;
    let too_far = || {
        CliError::Usage(format!(
            "invalid time {s:?}: an age of {} s reaches before 1970-01-01, before any record",
            age.as_secs()
        ))
    };
    let age = chrono::Duration::from_std(age).map_err(|_| too_far())?;
    // Records carry Unix timestamps (stream offsets too): an age before the
    // epoch is a typo, not a window.
    now.checked_sub_signed(age)
        .filter(|t| t.timestamp() >= 0)
        .ok_or_else(too_far)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(
            parse_duration("1w 2d").unwrap(),
            Duration::from_secs(9 * 86400)
        );
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("-2h").is_err());
        assert!(parse_duration("").is_err());
        let now = Utc::now();
        assert_eq!(
            parse_time("2h", now).unwrap(),
            now - chrono::Duration::hours(2)
        );
        let t = parse_time("2026-11-26T20:00:00Z", now).unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-26T20:00:00+00:00");
        assert!(parse_time("yesterday", now).is_err());
    }

    #[test]
    fn huge_values_are_usage_errors_not_panics() {
        let now = Utc::now();
        for s in [
            "100000000d",
            "99999999999999999999",
            "99999999999999999999s",
            "9223372036854775807s",
            "18446744073709551615",
            "1000000w",
        ] {
            let e = parse_time(s, now).unwrap_err();
            assert!(matches!(e, CliError::Usage(_)), "{s}: {e}");
            assert!(e.to_string().contains(s), "{s}: names the value: {e}");
        }
        // Within the duration's range but before any representable instant.
        assert!(parse_duration("18446744073709551615").is_ok());
        assert!(matches!(
            parse_time("18446744073709551615", now),
            Err(CliError::Usage(_))
        ));
    }
}
