//! Time and duration arguments: `2s`, `90m`, `2h`, `7d`, or RFC 3339 instants.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::exit::{CliError, CliResult};

/// Parses `500ms`, `2s`, `90m`, `2h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> CliResult<Duration> {
    let s = s.trim();
    let bad = || {
        CliError::Usage(format!(
            "invalid duration {s:?} (expected e.g. 500ms, 2s, 90m, 2h, 7d)"
        ))
    };
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses an instant: RFC 3339 (`2026-11-26T20:00:00Z`), or an age before
/// `now` (`2h` means two hours ago).
pub fn parse_time(s: &str, now: DateTime<Utc>) -> CliResult<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    let age = parse_duration(s).map_err(|_| {
        CliError::Usage(format!(
            "invalid time {s:?} (expected RFC 3339 like 2026-11-26T20:00:00Z, or an age like 2h)"
        ))
    })?;
    let age = chrono::Duration::from_std(age).map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(now - age)
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
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        let now = Utc::now();
        assert_eq!(
            parse_time("2h", now).unwrap(),
            now - chrono::Duration::hours(2)
        );
        let t = parse_time("2026-11-26T20:00:00Z", now).unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-26T20:00:00+00:00");
        assert!(parse_time("yesterday", now).is_err());
    }
}
