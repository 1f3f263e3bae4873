//! Fault injection: rules that match requests by method and path substring and make the
//! server misbehave for a limited number of matches.
//!
//! Remember that kube's default client retries 429, 503 and 504 by itself (honouring
//! `Retry-After`), so a rule with `times: Some(2)` and code 503 is usually invisible to
//! the caller; see the crate docs.

use std::sync::Mutex;
use std::time::Duration;

/// What an injected fault does to a matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    /// Answer with this HTTP status and a matching `Status` body (`500` InternalError,
    /// `503` ServiceUnavailable, `504` Timeout, `429` TooManyRequests, `409` Conflict,
    /// `410` Expired, ...). With `retry_after_secs`, the response carries a
    /// `Retry-After` header and `details.retryAfterSeconds`.
    Status {
        /// HTTP status code.
        code: u16,
        /// Seconds for `Retry-After` / `details.retryAfterSeconds`.
        retry_after_secs: Option<u64>,
    },
    /// Wait this long, then handle the request normally.
    Delay(Duration),
    /// Read the request, then close the connection without answering.
    ResetConnection,
    /// Watch requests only: answer 200 with a single `ERROR` event carrying a 410
    /// `Expired` Status, then end the stream (kube's watcher re-lists).
    WatchGone,
    /// Watch requests only: send the initial/replayed events, then end the stream
    /// without an error (kube's watcher re-watches from the last version).
    WatchEndEarly,
    /// Watch requests only: stream normally, then after this long send an `ERROR`
    /// event with a 410 `Expired` Status mid-stream and end.
    WatchGoneAfter(Duration),
}

/// A fault rule. `method: None` matches any method; `path_contains` is matched
/// against the request path (without the query string); `times: None` applies forever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// HTTP method, case-insensitive (`"GET"`, `"DELETE"`, ...); `None` matches all.
    pub method: Option<String>,
    /// Substring of the request path, e.g. `"/jobs"` or `"/pods/"`; `""` matches all.
    pub path_contains: String,
    /// What to do.
    pub action: FaultAction,
    /// How many matching requests it applies to; `None` means unlimited.
    pub times: Option<u32>,
    /// When set, requests whose query string contains this are not matched
    /// (e.g. `"dryRun"`: break real creates while dry-run probes pass).
    pub unless_query: Option<String>,
}

impl FaultRule {
    /// A rule for `method` (`"*"` for any) on paths containing `path_contains`, applying
    /// to every match until [`FaultRule::times`] limits it.
    pub fn new(method: &str, path_contains: &str, action: FaultAction) -> Self {
        Self {
            method: (method != "*").then(|| method.to_owned()),
            path_contains: path_contains.to_owned(),
            action,
            times: None,
            unless_query: None,
        }
    }

    /// Leaves requests whose query string contains `needle` alone.
    #[must_use]
    pub fn unless_query(mut self, needle: &str) -> Self {
        self.unless_query = Some(needle.to_owned());
        self
    }

    /// Limits the rule to the next `n` matching requests.
    #[must_use]
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    fn matches(&self, method: &str, path: &str, query: &str, is_watch: bool) -> bool {
        let watch_only = matches!(
            self.action,
            FaultAction::WatchGone | FaultAction::WatchEndEarly | FaultAction::WatchGoneAfter(_)
        );
        (!watch_only || is_watch)
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && path.contains(&self.path_contains)
            && self
                .unless_query
                .as_deref()
                .is_none_or(|q| !query.contains(q))
    }
}

/// The set of active fault rules of a [`crate::KubeSim`].
#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<FaultRule>>,
}

impl Faults {
    /// Adds a rule; rules are tried in the order they were added.
    pub fn inject(&self, rule: FaultRule) {
        self.lock().push(rule);
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// How many rules are still active (count-limited rules disappear when used up).
    pub fn active(&self) -> usize {
        self.lock().len()
    }

    /// Removes the rules for which `pred` is true (e.g. to lift one fault and keep
    /// the others).
    pub fn remove_where(&self, pred: impl Fn(&FaultRule) -> bool) {
        self.lock().retain(|r| !pred(r));
    }

    /// Finds the first rule matching the request, consumes one use of it, and returns
    /// its action.
    pub(crate) fn take(
        &self,
        method: &str,
        path: &str,
        query: &str,
        is_watch: bool,
    ) -> Option<FaultAction> {
        let mut rules = self.lock();
        let i = rules
            .iter()
            .position(|r| r.matches(method, path, query, is_watch))?;
        let action = rules[i].action.clone();
        if let Some(n) = rules[i].times.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                rules.remove(i);
            }
        }
        Some(action)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<FaultRule>> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_limited_rules_expire_and_watch_rules_skip_lists() {
        let f = Faults::default();
        f.inject(FaultRule::new("GET", "/jobs", FaultAction::WatchGone).times(1));
        f.inject(
            FaultRule::new(
                "*",
                "/jobs",
                FaultAction::Status {
                    code: 503,
                    retry_after_secs: None,
                },
            )
            .times(2),
        );
        // A list is not a watch: the watch rule is skipped, the 503 rule applies.
        assert!(matches!(
            f.take("GET", "/apis/batch/v1/namespaces/d/jobs", "", false),
            Some(FaultAction::Status { code: 503, .. })
        ));
        assert_eq!(
            f.take("GET", "/apis/batch/v1/namespaces/d/jobs", "", true),
            Some(FaultAction::WatchGone)
        );
        assert!(f.take("DELETE", "/x/jobs/a", "", false).is_some());
        assert_eq!(f.take("DELETE", "/x/jobs/a", "", false), None);
        assert_eq!(f.active(), 0);
    }

    #[test]
    fn a_rule_can_spare_dry_runs() {
        let f = Faults::default();
        f.inject(
            FaultRule::new(
                "POST",
                "/jobs",
                FaultAction::Status {
                    code: 403,
                    retry_after_secs: None,
                },
            )
            .unless_query("dryRun"),
        );
        let path = "/apis/batch/v1/namespaces/d/jobs";
        assert_eq!(f.take("POST", path, "dryRun=All", false), None);
        assert!(f.take("POST", path, "", false).is_some());
        f.remove_where(|r| r.path_contains == "/jobs");
        assert_eq!(f.active(), 0);
    }
}
