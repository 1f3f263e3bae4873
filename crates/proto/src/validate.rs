//! Validation of a [`Task`] against the fleet's [`Limits`].
//!
//! [`validate`] checks every rule and reports every violation, each naming
//! the field path (`steps[2].timeout_secs`) and the rule
//! (`timeout_within_deadline`), so a producer fixes its message in one round.
//! It is a pure function: producers call it before publishing, workers again
//! after decoding, the gateway before accepting a request.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::Serialize;

use crate::image::ImageRef;
use crate::quantity::Quantity;
use crate::{Limits, SCHEMA_VERSION, Task};

/// Prefix of the environment variables sandfleet itself sets in a sandbox.
///
/// Not every such name is reserved: producers may pass event values under it
/// (`SANDFLEET_REPOSITORY`, `SANDFLEET_COMMIT`, ... as the gateway does). Only
/// the names the generated script depends on are refused; see
/// [`is_reserved_env`].
pub const RESERVED_ENV_PREFIX: &str = "SANDFLEET_";

/// Names the executors set for the script and a task must not override.
pub const RESERVED_ENV_NAMES: &[&str] = &[
    "SANDFLEET_WORKSPACE",
    "SANDFLEET_TERMINATION_LOG",
    "SANDFLEET_STATE_DIR",
    "SANDFLEET_SCRIPT",
    "SANDFLEET_TASK_ID",
    "SANDFLEET_ATTEMPT",
];

/// Prefixes the generated script uses for its own variables: the values it
/// is handed (files, steps, artifacts) and its shell variables (`sf_*`,
/// which it assigns as it runs: a task's `sf_t` would reach the steps with
/// the script's clock in it). A task must not set names under them.
pub const RESERVED_ENV_PREFIXES: &[&str] = &[
    "SANDFLEET_FILE_",
    "SANDFLEET_STEP_",
    "SANDFLEET_ARTIFACT_",
    "sf_",
];

/// True for an environment variable name a task may not set, because the
/// executors or the generated script own it.
pub fn is_reserved_env(name: &str) -> bool {
    RESERVED_ENV_NAMES.contains(&name) || RESERVED_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// One violated rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Path of the offending field: `steps[2].timeout_secs`,
    /// `sandbox.env.FOO`, `labels["team/x"]`.
    pub path: String,
    /// Short machine name of the rule (`max_len`, `env_name`, `relative_path`).
    pub rule: &'static str,
    /// What is wrong, for humans.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.path, self.message, self.rule)
    }
}

/// Every rule a task violates (never empty when returned as an error).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(transparent)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    /// The violations, in the order the fields appear in the task.
    pub fn errors(&self) -> &[FieldError] {
        &self.0
    }

    /// The field paths of the violations (with duplicates when one field
    /// breaks several rules).
    pub fn paths(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.path.as_str()).collect()
    }

    /// True when some violation is at `path`.
    pub fn has(&self, path: &str) -> bool {
        self.0.iter().any(|e| e.path == path)
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} invalid field{}: ", if n == 1 { "" } else { "s" })?;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Checks `task` against `limits` and returns every violation.
pub fn validate(task: &Task, limits: &Limits) -> Result<(), ValidationErrors> {
    let mut v = Validator { errors: Vec::new() };
    v.task(task, limits);
    if v.errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(v.errors))
    }
}

/// What every intake checks before it publishes: [`validate`], and that the
/// task fits the broker's consumer timeout
/// (`limits.broker_consumer_timeout_secs`, see [`crate::budget`]), which a
/// worker would otherwise refuse after the task was accepted. The budget
/// violation is reported at `sandbox.deadline_secs` with the rule
/// [`crate::DEADLINE_TOO_LONG_CODE`] and the worker's own reason.
pub fn validate_intake(task: &Task, limits: &Limits) -> Result<(), ValidationErrors> {
    let mut errors = match validate(task, limits) {
        Ok(()) => Vec::new(),
        Err(ValidationErrors(errors)) => errors,
    };
    let timeout = std::time::Duration::from_secs(limits.broker_consumer_timeout_secs);
    if let Err(e) = crate::check_consumer_timeout(task, timeout) {
        errors.push(FieldError {
            path: "sandbox.deadline_secs".to_owned(),
            rule: crate::DEADLINE_TOO_LONG_CODE,
            message: e.to_string(),
        });
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(errors))
    }
}

impl Task {
    /// Shorthand for [`validate_intake`]`(self, limits)`: what a producer
    /// checks before publishing.
    pub fn validate_intake(&self, limits: &Limits) -> Result<(), ValidationErrors> {
        validate_intake(self, limits)
    }

    /// Shorthand for [`validate`]`(self, limits)`.
    pub fn validate(&self, limits: &Limits) -> Result<(), ValidationErrors> {
        validate(self, limits)
    }
}

struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    fn fail(&mut self, path: impl Into<String>, rule: &'static str, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            rule,
            message: message.into(),
        });
    }

    fn max_len(&mut self, path: &str, value: &str, max: usize) {
        if value.len() > max {
            self.fail(
                path,
                "max_len",
                format!("is {} bytes; at most {max} allowed", value.len()),
            );
        }
    }

    fn no_control_chars(&mut self, path: &str, value: &str) {
        if value.chars().any(char::is_control) {
            self.fail(
                path,
                "no_control_chars",
                "must not contain control characters",
            );
        }
    }

    fn task(&mut self, t: &Task, l: &Limits) {
        if t.schema_version != SCHEMA_VERSION {
            self.fail(
                "schema_version",
                "schema_version",
                format!(
                    "is {}; this worker understands version {SCHEMA_VERSION}",
                    t.schema_version
                ),
            );
        }
        if t.id.is_nil() {
            self.fail("id", "not_nil", "must not be the nil UUID");
        }
        if t.idempotency_key.is_empty() {
            self.fail("idempotency_key", "not_empty", "must not be empty");
        }
        self.max_len(
            "idempotency_key",
            &t.idempotency_key,
            l.max_idempotency_key_bytes,
        );
        self.no_control_chars("idempotency_key", &t.idempotency_key);
        if let Some(key) = &t.supersede_key {
            if key.is_empty() {
                self.fail(
                    "supersede_key",
                    "not_empty",
                    "must not be empty when present",
                );
            }
            self.max_len("supersede_key", key, crate::cancel::MAX_CANCEL_TEXT);
            self.no_control_chars("supersede_key", key);
        }
        if let Some(f) = &t.fairness {
            for (path, value) in [("fairness.tenant", &f.tenant), ("fairness.key", &f.key)] {
                let Some(v) = value else { continue };
                if v.is_empty() {
                    self.fail(path, "not_empty", "must not be empty when present");
                }
                self.max_len(path, v, crate::fairness::MAX_FAIRNESS_KEY_BYTES);
                self.no_control_chars(path, v);
            }
        }
        self.source(t);
        self.sandbox(t, l);
        self.files(t, l);
        self.steps(t, l);
        if t.artifacts.len() > l.max_artifacts {
            self.fail(
                "artifacts",
                "max_items",
                format!(
                    "has {} entries; at most {} allowed",
                    t.artifacts.len(),
                    l.max_artifacts
                ),
            );
        }
        for (i, a) in t.artifacts.iter().enumerate() {
            self.relative_path(&format!("artifacts[{i}]"), a, l);
        }
        if t.retry.max_attempts < 1 {
            self.fail("retry.max_attempts", "min", "must be at least 1");
        } else if t.retry.max_attempts > l.max_attempts {
            self.fail(
                "retry.max_attempts",
                "max",
                format!(
                    "is {}; at most {} allowed",
                    t.retry.max_attempts, l.max_attempts
                ),
            );
        }
        self.labels(&t.labels, l);
    }

    fn source(&mut self, t: &Task) {
        let s = &t.source;
        let segment_ok = |seg: &str| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        };
        let segments: Vec<&str> = s.repository.split('/').collect();
        if s.repository.len() > 255 || segments.len() < 2 || !segments.iter().all(|g| segment_ok(g))
        {
            self.fail(
                "source.repository",
                "repository",
                "must be `owner/name` (GitLab: `group/sub/name`) of [A-Za-z0-9._-], at most 255 bytes",
            );
        }
        let c = &s.commit;
        if !(7..=64).contains(&c.len()) || !c.bytes().all(|b| b.is_ascii_hexdigit()) {
            self.fail("source.commit", "commit_sha", "must be 7 to 64 hex digits");
        }
        if let Some(r) = &s.git_ref {
            if r.is_empty() {
                self.fail("source.ref", "not_empty", "must not be empty when present");
            }
            self.max_len("source.ref", r, 255);
            self.no_control_chars("source.ref", r);
        }
        if let Some(id) = &s.ci_run_id {
            self.max_len("source.ci_run_id", id, 255);
            self.no_control_chars("source.ci_run_id", id);
        }
        if let Some(url) = &s.url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                self.fail("source.url", "http_url", "must be an http(s) URL");
            }
            self.max_len("source.url", url, 2048);
            self.no_control_chars("source.url", url);
        }
    }

    fn sandbox(&mut self, t: &Task, l: &Limits) {
        let s = &t.sandbox;
        if let Err(e) = ImageRef::parse(&s.image) {
            self.fail("sandbox.image", "image_ref", format!("{:?} {e}", s.image));
        }
        let r = &s.resources;
        let mut quantity = |path: &str, value: &Option<String>| -> Option<f64> {
            let value = value.as_deref()?;
            match Quantity::parse(value) {
                Ok(q) if q.0 > 0.0 => Some(q.0),
                Ok(_) => {
                    self.fail(
                        path,
                        "positive_quantity",
                        format!("{value:?} must be greater than zero"),
                    );
                    None
                }
                Err(e) => {
                    self.fail(path, "quantity", e.to_string());
                    None
                }
            }
        };
        let cpu_request = quantity("sandbox.resources.cpu_request", &r.cpu_request);
        let cpu_limit = quantity("sandbox.resources.cpu_limit", &r.cpu_limit);
        let mem_request = quantity("sandbox.resources.memory_request", &r.memory_request);
        let mem_limit = quantity("sandbox.resources.memory_limit", &r.memory_limit);
        for (path, request, limit) in [
            ("sandbox.resources.cpu_request", cpu_request, cpu_limit),
            ("sandbox.resources.memory_request", mem_request, mem_limit),
        ] {
            if let (Some(req), Some(lim)) = (request, limit)
                && req > lim
            {
                self.fail(path, "request_within_limit", "must not exceed the limit");
            }
        }
        self.env("sandbox.env", &s.env, l);
        if s.deadline_secs < 1 {
            self.fail("sandbox.deadline_secs", "min", "must be at least 1");
        } else if s.deadline_secs > l.max_deadline_secs {
            self.fail(
                "sandbox.deadline_secs",
                "max",
                format!(
                    "is {}; at most {} allowed",
                    s.deadline_secs, l.max_deadline_secs
                ),
            );
        }
        if s.pending_timeout_secs < l.min_pending_timeout_secs
            || s.pending_timeout_secs > l.max_pending_timeout_secs
        {
            self.fail(
                "sandbox.pending_timeout_secs",
                "range",
                format!(
                    "is {}; must be between {} and {}",
                    s.pending_timeout_secs, l.min_pending_timeout_secs, l.max_pending_timeout_secs
                ),
            );
        }
    }

    fn files(&mut self, t: &Task, l: &Limits) {
        if t.files.len() > l.max_files {
            self.fail(
                "files",
                "max_items",
                format!(
                    "has {} files; at most {} allowed",
                    t.files.len(),
                    l.max_files
                ),
            );
        }
        let mut seen = HashSet::new();
        for (i, f) in t.files.iter().enumerate() {
            let path = format!("files[{i}].path");
            self.relative_path(&path, &f.path, l);
            if !seen.insert(f.path.as_str()) {
                self.fail(path, "unique", format!("{:?} is written twice", f.path));
            }
            if f.content.len() > l.max_file_bytes {
                self.fail(
                    format!("files[{i}].content"),
                    "max_len",
                    format!(
                        "is {} bytes; at most {} allowed",
                        f.content.len(),
                        l.max_file_bytes
                    ),
                );
            }
        }
    }

    fn steps(&mut self, t: &Task, l: &Limits) {
        if t.steps.is_empty() {
            self.fail("steps", "not_empty", "a task needs at least one step");
        }
        if t.steps.len() > l.max_steps {
            self.fail(
                "steps",
                "max_items",
                format!(
                    "has {} steps; at most {} allowed",
                    t.steps.len(),
                    l.max_steps
                ),
            );
        }
        let deadline = t.sandbox.deadline_secs;
        let mut names = HashSet::new();
        let mut total: u64 = 0;
        for (i, s) in t.steps.iter().enumerate() {
            let p = |field: &str| format!("steps[{i}].{field}");
            let name_ok = s
                .name
                .as_bytes()
                .first()
                .is_some_and(u8::is_ascii_alphanumeric)
                && s.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !name_ok {
                self.fail(
                    p("name"),
                    "step_name",
                    "must start with a letter or digit and contain only [A-Za-z0-9_.-]",
                );
            }
            self.max_len(&p("name"), &s.name, l.max_step_name_bytes);
            if !names.insert(s.name.as_str()) {
                self.fail(
                    p("name"),
                    "unique",
                    format!("step name {:?} is used twice", s.name),
                );
            }
            if s.run.trim().is_empty() {
                self.fail(p("run"), "not_empty", "must not be empty");
            }
            if s.run.contains('\0') {
                self.fail(p("run"), "no_nul", "must not contain NUL");
            }
            self.max_len(&p("run"), &s.run, l.max_command_bytes);
            if s.timeout_secs < 1 {
                self.fail(p("timeout_secs"), "min", "must be at least 1");
            } else if s.timeout_secs > l.max_step_timeout_secs {
                self.fail(
                    p("timeout_secs"),
                    "max",
                    format!(
                        "is {}; at most {} allowed",
                        s.timeout_secs, l.max_step_timeout_secs
                    ),
                );
            } else if deadline >= 1 && s.timeout_secs > deadline {
                self.fail(
                    p("timeout_secs"),
                    "timeout_within_deadline",
                    format!(
                        "is {}; exceeds sandbox.deadline_secs ({deadline})",
                        s.timeout_secs
                    ),
                );
            }
            total = total.saturating_add(s.timeout_secs);
            self.env(&p("env"), &s.env, l);
        }
        // Each step fitting is not enough: the steps run one after another, so
        // their timeouts together must fit in the deadline, or the deadline
        // (not a step timeout) would end a task that followed every rule.
        if t.steps.len() > 1 && deadline >= 1 && total > deadline {
            self.fail(
                "steps",
                "timeouts_within_deadline",
                format!(
                    "step timeouts add up to {total}s; exceeds sandbox.deadline_secs ({deadline})"
                ),
            );
        }
    }

    fn env(&mut self, base: &str, env: &BTreeMap<String, String>, l: &Limits) {
        if env.len() > l.max_env_vars {
            self.fail(
                base,
                "max_items",
                format!(
                    "has {} variables; at most {} allowed",
                    env.len(),
                    l.max_env_vars
                ),
            );
        }
        for (name, value) in env {
            let path = key_path(base, name);
            let b = name.as_bytes();
            let valid = b
                .first()
                .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
            if !valid {
                self.fail(
                    &path,
                    "env_name",
                    "variable names must match [A-Za-z_][A-Za-z0-9_]*",
                );
            } else if is_reserved_env(name) {
                self.fail(
                    &path,
                    "reserved_env",
                    "this name is set by sandfleet for the sandbox script",
                );
            }
            if value.contains('\0') {
                self.fail(&path, "no_nul", "value must not contain NUL");
            }
            self.max_len(&path, value, l.max_env_value_bytes);
        }
    }

    fn labels(&mut self, labels: &BTreeMap<String, String>, l: &Limits) {
        if labels.len() > l.max_labels {
            self.fail(
                "labels",
                "max_items",
                format!(
                    "has {} labels; at most {} allowed",
                    labels.len(),
                    l.max_labels
                ),
            );
        }
        for (key, value) in labels {
            let path = key_path("labels", key);
            if !is_qualified_name(key) {
                self.fail(
                    &path,
                    "label_key",
                    "keys must be `[prefix/]name`: name 1-63 of [A-Za-z0-9_.-] starting and ending alphanumeric, prefix a DNS subdomain",
                );
            }
            self.max_len(&path, value, l.max_label_value_bytes);
            self.no_control_chars(&path, value);
        }
    }

    fn relative_path(&mut self, path: &str, value: &str, l: &Limits) {
        if value.is_empty() {
            self.fail(path, "relative_path", "must not be empty");
            return;
        }
        if value.contains('\0') {
            self.fail(path, "relative_path", "must not contain NUL");
        }
        if value.starts_with('/') {
            self.fail(
                path,
                "relative_path",
                format!("{value:?} must be relative to the workspace"),
            );
        }
        if value.split('/').any(|c| c == "..") {
            self.fail(
                path,
                "relative_path",
                format!("{value:?} must not contain `..`"),
            );
        } else if !value.starts_with('/') && value.split('/').any(str::is_empty) {
            self.fail(
                path,
                "relative_path",
                format!("{value:?} has an empty component"),
            );
        }
        self.max_len(path, value, l.max_path_bytes);
    }
}

/// `base.key` for identifier-like keys, `base["key"]` (JSON-quoted) otherwise.
fn key_path(base: &str, key: &str) -> String {
    let simple = key
        .as_bytes()
        .first()
        .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
        && key.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
    if simple {
        format!("{base}.{key}")
    } else {
        let quoted = serde_json::to_string(key).unwrap_or_else(|_| format!("{key:?}"));
        format!("{base}[{quoted}]")
    }
}

/// A Kubernetes qualified name: `[dns-subdomain/]name`.
fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let nb = name.as_bytes();
    let name_ok = !nb.is_empty()
        && nb.len() <= 63
        && nb[0].is_ascii_alphanumeric()
        && nb[nb.len() - 1].is_ascii_alphanumeric()
        && nb
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|label| {
                let b = label.as_bytes();
                !b.is_empty()
                    && b.len() <= 63
                    && b[0].is_ascii_alphanumeric()
                    && b[b.len() - 1].is_ascii_alphanumeric()
                    && b.iter()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            })
    });
    name_ok && prefix_ok
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::{InputFile, Provider, SandboxSpec, Source, Step};

    fn task() -> Task {
        Task::fix_attempt(
            Source {
                provider: Provider::Github,
                repository: "acme/widgets".into(),
                commit: "4f2a9c1e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a39".into(),
                git_ref: Some("main".into()),
                ci_run_id: Some("123".into()),
                pull_request: Some(7),
                url: Some("https://github.com/acme/widgets/actions/runs/123".into()),
            },
            SandboxSpec {
                image: "docker.io/library/node:20-alpine".into(),
                resources: Default::default(),
                env: BTreeMap::from([("CI".into(), "true".into())]),
                deadline_secs: 600,
                pending_timeout_secs: 120,
            },
        )
        .with_file("fix.patch", "--- a/x\n+++ b/x\n")
        .with_step("test", "npm test", 300)
    }

    /// The errors `validate` reports for `task` after `edit`, as (path, rule).
    fn errors(edit: impl FnOnce(&mut Task)) -> Vec<(String, &'static str)> {
        let mut t = task();
        edit(&mut t);
        match validate(&t, &Limits::default()) {
            Ok(()) => Vec::new(),
            Err(e) => e.0.into_iter().map(|e| (e.path, e.rule)).collect(),
        }
    }

    fn one(path: &str, rule: &'static str) -> Vec<(String, &'static str)> {
        vec![(path.to_owned(), rule)]
    }

    #[test]
    fn a_sensible_task_is_valid() {
        assert_eq!(errors(|_| {}), vec![]);
    }

    #[test]
    fn schema_version_must_be_current() {
        assert_eq!(
            errors(|t| t.schema_version = 2),
            one("schema_version", "schema_version")
        );
    }

    #[test]
    fn step_count_and_file_count_are_bounded() {
        let l = Limits::default();
        let e = errors(|t| {
            t.sandbox.deadline_secs = 14_400;
            t.steps = (0..=l.max_steps)
                .map(|i| Step {
                    name: format!("s{i}"),
                    run: "true".into(),
                    timeout_secs: 1,
                    env: BTreeMap::new(),
                    continue_on_error: false,
                })
                .collect();
            t.files = (0..=l.max_files)
                .map(|i| InputFile {
                    path: format!("f{i}"),
                    content: String::new(),
                    executable: false,
                })
                .collect();
        });
        assert_eq!(
            e,
            vec![("files".into(), "max_items"), ("steps".into(), "max_items")]
        );
        assert_eq!(errors(|t| t.steps.clear()), one("steps", "not_empty"));
    }

    #[test]
    fn file_size_is_bounded() {
        let big = "x".repeat(Limits::default().max_file_bytes + 1);
        assert_eq!(
            errors(|t| t.files[0].content = big),
            one("files[0].content", "max_len")
        );
    }

    #[test]
    fn paths_stay_inside_the_workspace() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/..",
            "a\0b",
            "a//b",
            "dir/",
        ] {
            let e = errors(|t| t.files[0].path = bad.into());
            assert!(!e.is_empty(), "{bad:?} accepted");
            assert!(
                e.iter()
                    .all(|(p, r)| p == "files[0].path" && *r == "relative_path"),
                "{bad:?}: {e:?}"
            );
            let e = errors(|t| t.artifacts = vec!["ok.txt".into(), bad.into()]);
            assert!(e.iter().all(|(p, _)| p == "artifacts[1]"), "{bad:?}: {e:?}");
        }
        for good in ["a", "src/fix.patch", ".npmrc", "./a/b..c/d"] {
            assert_eq!(
                errors(|t| t.files[0].path = good.into()),
                vec![],
                "{good:?}"
            );
        }
        let e = errors(|t| t.files.push(t.files[0].clone()));
        assert_eq!(e, one("files[1].path", "unique"));
    }

    #[test]
    fn env_names_follow_posix_and_avoid_the_reserved_prefix() {
        let e = errors(|t| {
            t.sandbox.env.insert("1BAD".into(), "x".into());
            t.sandbox.env.insert("WITH-DASH".into(), "x".into());
            t.sandbox
                .env
                .insert("SANDFLEET_WORKSPACE".into(), "/".into());
            t.sandbox.env.insert("_ok9".into(), "x".into());
            // Event values under the prefix are allowed (the gateway sets them).
            t.sandbox
                .env
                .insert("SANDFLEET_REPOSITORY".into(), "acme/app".into());
            t.steps[0]
                .env
                .insert("SANDFLEET_STEP_0_RUN".into(), "x".into());
            t.steps[0].env.insert("".into(), "x".into());
            t.steps[0].env.insert("NUL".into(), "a\0b".into());
            // The script's own shell variables; other lower-case names are fine.
            t.sandbox.env.insert("sf_t".into(), "x".into());
            t.steps[0].env.insert("sf_ws".into(), "x".into());
            t.steps[0].env.insert("sfx".into(), "x".into());
        });
        assert_eq!(
            e,
            vec![
                ("sandbox.env[\"1BAD\"]".into(), "env_name"),
                ("sandbox.env.SANDFLEET_WORKSPACE".into(), "reserved_env"),
                ("sandbox.env[\"WITH-DASH\"]".into(), "env_name"),
                ("sandbox.env.sf_t".into(), "reserved_env"),
                ("steps[0].env[\"\"]".into(), "env_name"),
                ("steps[0].env.NUL".into(), "no_nul"),
                ("steps[0].env.SANDFLEET_STEP_0_RUN".into(), "reserved_env"),
                ("steps[0].env.sf_ws".into(), "reserved_env"),
            ]
        );
    }

    #[test]
    fn env_var_count_is_bounded() {
        let e = errors(|t| {
            t.sandbox.env = (0..=64).map(|i| (format!("V{i}"), String::new())).collect();
        });
        assert_eq!(e, one("sandbox.env", "max_items"));
    }

    #[test]
    fn image_reference_is_parsed() {
        assert_eq!(
            errors(|t| t.sandbox.image = "Node:20".into()),
            one("sandbox.image", "image_ref")
        );
        assert_eq!(
            errors(|t| t.sandbox.image = "node:$(id)".into()),
            one("sandbox.image", "image_ref")
        );
        assert_eq!(
            errors(|t| t.sandbox.image = "localhost:5000/n:1".into()),
            vec![]
        );
    }

    #[test]
    fn resources_are_kubernetes_quantities_with_request_within_limit() {
        let e = errors(|t| {
            t.sandbox.resources.cpu_request = Some("2".into());
            t.sandbox.resources.cpu_limit = Some("500m".into());
            t.sandbox.resources.memory_request = Some("1GB".into());
            t.sandbox.resources.memory_limit = Some("0".into());
        });
        assert_eq!(
            e,
            vec![
                ("sandbox.resources.memory_request".into(), "quantity"),
                ("sandbox.resources.memory_limit".into(), "positive_quantity"),
                (
                    "sandbox.resources.cpu_request".into(),
                    "request_within_limit"
                ),
            ]
        );
        let e = errors(|t| {
            t.sandbox.resources.memory_request = Some("512Mi".into());
            t.sandbox.resources.memory_limit = Some("1Gi".into());
        });
        assert_eq!(e, vec![]);
    }

    #[test]
    fn timeouts_fit_the_configured_bounds_and_the_deadline() {
        assert_eq!(
            errors(|t| t.steps[0].timeout_secs = 0),
            one("steps[0].timeout_secs", "min")
        );
        assert_eq!(
            errors(|t| {
                t.sandbox.deadline_secs = 14_400;
                t.steps[0].timeout_secs = 14_401;
            }),
            one("steps[0].timeout_secs", "max")
        );
        assert_eq!(
            errors(|t| t.steps[0].timeout_secs = 601),
            one("steps[0].timeout_secs", "timeout_within_deadline")
        );
        let e = errors(|t| {
            t.steps[0].timeout_secs = 400;
            t.steps.push(Step {
                name: "b".into(),
                ..t.steps[0].clone()
            });
        });
        assert_eq!(e, one("steps", "timeouts_within_deadline"));
        assert_eq!(
            errors(|t| t.sandbox.deadline_secs = 0),
            one("sandbox.deadline_secs", "min")
        );
        assert_eq!(
            errors(|t| t.sandbox.deadline_secs = 14_401),
            one("sandbox.deadline_secs", "max")
        );
        for p in [0, 9, 3601] {
            assert_eq!(
                errors(|t| t.sandbox.pending_timeout_secs = p),
                one("sandbox.pending_timeout_secs", "range")
            );
        }
    }

    #[test]
    fn step_names_are_short_unique_words() {
        let e = errors(|t| {
            t.steps[0].timeout_secs = 10;
            t.steps.push(Step {
                name: "".into(),
                ..t.steps[0].clone()
            });
            t.steps.push(Step {
                name: "run tests".into(),
                ..t.steps[0].clone()
            });
            t.steps.push(Step {
                name: "test".into(),
                ..t.steps[0].clone()
            });
            t.steps.push(Step {
                name: "x".repeat(64),
                ..t.steps[0].clone()
            });
            t.steps.push(Step {
                name: "-x".into(),
                ..t.steps[0].clone()
            });
        });
        assert_eq!(
            e,
            vec![
                ("steps[1].name".into(), "step_name"),
                ("steps[2].name".into(), "step_name"),
                ("steps[3].name".into(), "unique"),
                ("steps[4].name".into(), "max_len"),
                ("steps[5].name".into(), "step_name"),
            ]
        );
        assert_eq!(
            errors(|t| t.steps[0].run = "  ".into()),
            one("steps[0].run", "not_empty")
        );
    }

    #[test]
    fn labels_are_qualified_names_with_bounded_values() {
        let e = errors(|t| {
            t.labels.insert("sandfleet.dev/team".into(), "infra".into());
            t.labels.insert("Bad.Prefix/x".into(), "v".into());
            t.labels.insert("-x".into(), "v".into());
            t.labels.insert("ok".into(), "v".repeat(257));
            t.labels.insert("ctl".into(), "a\nb".into());
        });
        assert_eq!(
            e,
            vec![
                ("labels[\"-x\"]".into(), "label_key"),
                ("labels[\"Bad.Prefix/x\"]".into(), "label_key"),
                ("labels.ctl".into(), "no_control_chars"),
                ("labels.ok".into(), "max_len"),
            ]
        );
    }

    #[test]
    fn idempotency_key_commit_and_attempts_are_bounded() {
        assert_eq!(
            errors(|t| t.idempotency_key = String::new()),
            one("idempotency_key", "not_empty")
        );
        assert_eq!(
            errors(|t| t.idempotency_key = "k".repeat(257)),
            one("idempotency_key", "max_len")
        );
        for bad in ["abc123", "xyz1234", &"a".repeat(65)] {
            assert_eq!(
                errors(|t| t.source.commit = bad.into()),
                one("source.commit", "commit_sha"),
                "{bad}"
            );
        }
        assert_eq!(errors(|t| t.source.commit = "ABCDEF1".into()), vec![]);
        assert_eq!(
            errors(|t| t.retry.max_attempts = 0),
            one("retry.max_attempts", "min")
        );
        assert_eq!(
            errors(|t| t.retry.max_attempts = 11),
            one("retry.max_attempts", "max")
        );
        assert_eq!(
            errors(|t| t.source.repository = "widgets".into()),
            one("source.repository", "repository")
        );
        assert_eq!(
            errors(|t| t.source.repository = "group/sub/app".into()),
            vec![]
        );
    }

    #[test]
    fn every_violation_is_reported_at_once() {
        let mut t = task();
        t.source.commit = "nope".into();
        t.sandbox.image = "".into();
        t.steps[0].timeout_secs = 0;
        t.files[0].path = "/abs".into();
        let err = validate(&t, &Limits::default()).unwrap_err();
        assert_eq!(
            err.paths(),
            [
                "source.commit",
                "sandbox.image",
                "files[0].path",
                "steps[0].timeout_secs"
            ]
        );
        let text = err.to_string();
        assert!(
            text.starts_with("4 invalid fields: source.commit: "),
            "{text}"
        );
    }

    #[test]
    fn intake_also_checks_the_consumer_timeout_budget_with_the_workers_reason() {
        let limits = Limits {
            broker_consumer_timeout_secs: 600,
            ..Limits::default()
        };
        // 600 + 120 > 600 - 60: fine for validate(), refused at intake.
        let t = task();
        validate(&t, &limits).unwrap();
        let err = validate_intake(&t, &limits).unwrap_err();
        assert_eq!(err.paths(), ["sandbox.deadline_secs"]);
        assert_eq!(err.errors()[0].rule, crate::DEADLINE_TOO_LONG_CODE);
        let reason = crate::check_consumer_timeout(&t, std::time::Duration::from_secs(600))
            .unwrap_err()
            .to_string();
        assert_eq!(err.errors()[0].message, reason);
        // Other violations are reported in the same round.
        let mut bad = task();
        bad.schema_version = 2;
        assert_eq!(
            validate_intake(&bad, &limits).unwrap_err().paths(),
            ["schema_version", "sandbox.deadline_secs"]
        );
        validate_intake(&t, &Limits::default()).unwrap();
    }
}
