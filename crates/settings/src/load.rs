//! Loading and validating [`Settings`].
//!
//! Layers, later ones winning: the defaults in the section structs, then a
//! TOML file (the path given, or `sandfleet.toml` in the working directory if
//! it exists), then `SANDFLEET__SECTION__KEY` environment variables (`__`
//! separates nesting levels: `SANDFLEET__SANDBOX__KUBERNETES__NAMESPACE`; keys
//! are lower-cased). The environment is passed in as a map, so tests never
//! touch the process environment; binaries pass `std::env::vars().collect()`.
//!
//! Every failure names the key: a value of the wrong type
//! (`worker.concurrency: invalid type: string "many", expected u16`), an
//! unknown key (`worker.concurency: unknown key`), or a value that parses but
//! makes no sense (`worker.concurrency: must be at least 1`). Validation
//! reports every invalid key at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use config::{Config, Environment, File, FileFormat};
use sandfleet_proto::{ImageRef, Limits, Quantity};
use serde::{Deserialize, Serialize};

use crate::sections::*;

/// Prefix of the environment variables read by [`load`].
pub const ENV_PREFIX: &str = "SANDFLEET";
/// Separator of nesting levels in environment variable names.
pub const ENV_SEPARATOR: &str = "__";
/// Separator of list items in environment variable values (`5,30,300`).
pub const ENV_LIST_SEPARATOR: &str = ",";
/// The file read when no path is given, if it exists.
pub const DEFAULT_FILE: &str = "sandfleet.toml";

/// Keys whose environment value is a comma-separated list.
pub const LIST_KEYS: &[&str] = &[
    "topology.retry_delays_secs",
    "gateway.api_tokens",
    "gateway.allowed_repositories",
    "sandbox.kubernetes.image_pull_secrets",
];

/// Keys that moved: `(old, new)`. Loading a configuration that still sets
/// the old key fails with a message naming the new one.
pub const MOVED_KEYS: &[(&str, &str)] = &[(
    "worker.broker_consumer_timeout_secs",
    "limits.broker_consumer_timeout_secs",
)];

/// The choices of enum-valued keys, for error messages.
const ENUM_CHOICES: &[(&str, &str)] = &[
    ("worker.executor", "local, kubernetes"),
    ("telemetry.log_format", "human, json"),
];

/// Every section of sandfleet's configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// RabbitMQ connection.
    pub amqp: AmqpSettings,
    /// Exchange and queue names and arguments.
    pub topology: TopologySettings,
    /// The worker process.
    pub worker: WorkerSettings,
    /// The Kubernetes API circuit breaker.
    pub breaker: BreakerSettings,
    /// Retries of infrastructure failures.
    pub retry: RetrySettings,
    /// Executors.
    pub sandbox: SandboxSettings,
    /// The webhook gateway.
    pub gateway: GatewaySettings,
    /// The operator console.
    pub console: ConsoleSettings,
    /// The sessions service (its warm pools).
    pub sessions: SessionsSettings,
    /// Fair sharing between tenants and keys.
    pub fairness: FairnessSettings,
    /// Logs and traces.
    pub telemetry: TelemetrySettings,
    /// Bounds every task must respect (message size, steps, timeouts, ...).
    pub limits: Limits,
}

/// One invalid setting: the key (`worker.concurrency`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct SettingError {
    /// Dotted key of the setting.
    pub key: String,
    /// What is wrong with its value.
    pub reason: String,
}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read or is not valid TOML.
    #[error("cannot read settings: {0}")]
    Source(String),
    /// One or more values are invalid, of the wrong type, or unknown keys.
    #[error("invalid settings:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<SettingError>),
}

impl SettingsError {
    /// The invalid keys, for [`SettingsError::Invalid`].
    pub fn errors(&self) -> &[SettingError] {
        match self {
            SettingsError::Invalid(errors) => errors,
            SettingsError::Source(_) => &[],
        }
    }

    /// Always false: a bad configuration stays bad until someone edits it.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// Loads settings: defaults, then the file, then the environment map, and
/// validates them.
///
/// `file`: `Some(path)` must exist; `None` reads `sandfleet.toml` from the
/// working directory when it exists. `env`: variables other than
/// `SANDFLEET__*` are ignored.
pub fn load(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Settings, SettingsError> {
    let mut builder = Config::builder();
    match file {
        Some(path) => {
            if !path.is_file() {
                return Err(SettingsError::Source(format!(
                    "{}: no such file",
                    path.display()
                )));
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        None => {
            builder = builder.add_source(File::new(DEFAULT_FILE, FileFormat::Toml).required(false));
        }
    }
    builder = add_env(builder, env)?;
    let config = builder
        .build()
        .map_err(|e| SettingsError::Source(e.to_string()))?;
    // serde_path_to_error tracks the key of any type error or unknown field
    // through the nested sections; config's own error names it only sometimes.
    let settings: Settings = serde_path_to_error::deserialize(config).map_err(|e| {
        let key = e.path().to_string();
        SettingsError::Invalid(vec![describe(key, e.into_inner())])
    })?;
    settings.validate()?;
    Ok(settings)
}

/// Adds the `SANDFLEET__*` variables of `env`: plain keys as strings (the
/// deserializer converts them to numbers and booleans where the field asks
/// for one, so a secret that happens to look like a number stays intact),
/// list keys split on `,`.
fn add_env(
    mut builder: config::ConfigBuilder<config::builder::DefaultState>,
    env: &HashMap<String, String>,
) -> Result<config::ConfigBuilder<config::builder::DefaultState>, SettingsError> {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    let key_of = |var: &str| {
        var.to_lowercase()
            .strip_prefix(&prefix.to_lowercase())
            .map(|rest| rest.replace(ENV_SEPARATOR, "."))
    };
    let mut scalars = config::Map::new();
    let mut lists = config::Map::new();
    for (var, value) in env {
        let Some(key) = key_of(var) else { continue };
        if !LIST_KEYS.contains(&key.as_str()) {
            scalars.insert(var.clone(), value.clone());
        } else if value.contains(ENV_LIST_SEPARATOR) {
            lists.insert(var.clone(), value.clone());
        } else {
            // config's list parsing only applies to values it could not read
            // as a number first, so `RETRY_DELAYS_SECS=30` would arrive as
            // the integer 30; a list of zero or one items is set directly.
            let items: Vec<String> = if value.trim().is_empty() {
                Vec::new()
            } else {
                vec![value.trim().to_owned()]
            };
            builder = builder
                .set_override(key.as_str(), items)
                .map_err(|e| SettingsError::Source(e.to_string()))?;
        }
    }
    let base = || {
        Environment::with_prefix(ENV_PREFIX)
            .prefix_separator(ENV_SEPARATOR)
            .separator(ENV_SEPARATOR)
    };
    let mut list_env = base()
        .try_parsing(true)
        .list_separator(ENV_LIST_SEPARATOR)
        .source(Some(lists));
    for key in LIST_KEYS {
        list_env = list_env.with_list_parse_key(key);
    }
    Ok(builder
        .add_source(base().source(Some(scalars)))
        .add_source(list_env))
}

/// Turns a deserialization error at `key` into a [`SettingError`].
fn describe(key: String, error: config::ConfigError) -> SettingError {
    let reason = match &error {
        // config decorates type errors with its own idea of the key and
        // origin; the path we tracked is the reliable one.
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => {
            format!("invalid type: {unexpected}, expected {expected}")
        }
        config::ConfigError::At { error, .. } => error.to_string(),
        other => other.to_string(),
    };
    // config's message for a bad enum value does not list the choices.
    if reason.contains("does not have variant constructor")
        && let Some((_, choices)) = ENUM_CHOICES.iter().find(|(k, _)| *k == key)
    {
        let reason = format!("{reason}; expected one of: {choices}");
        return SettingError { key, reason };
    }
    if let Some((_, new)) = MOVED_KEYS.iter().find(|(old, _)| *old == key) {
        return SettingError {
            key,
            reason: format!(
                "moved to {new} (the gateway and `sandfleet enqueue` check tasks against it too): \
                 rename the key, or SANDFLEET__{} in the environment",
                new.replace('.', "__").to_uppercase()
            ),
        };
    }
    // serde_path_to_error's path of an unknown field already ends with it.
    if reason.starts_with("unknown field `") {
        return SettingError {
            key,
            reason: "unknown key".to_owned(),
        };
    }
    let key = if key == "." { String::new() } else { key };
    SettingError { key, reason }
}

/// Collects [`SettingError`]s.
struct Check(Vec<SettingError>);

impl Check {
    fn fail(&mut self, key: &str, reason: impl Into<String>) {
        self.0.push(SettingError {
            key: key.to_owned(),
            reason: reason.into(),
        });
    }
    fn at_least<T: PartialOrd + std::fmt::Display + Copy>(&mut self, key: &str, value: T, min: T) {
        if value < min {
            self.fail(key, format!("must be at least {min}"));
        }
    }
    fn socket_addr(&mut self, key: &str, value: &str) {
        if value.parse::<SocketAddr>().is_err() {
            self.fail(
                key,
                format!("{value:?} is not an address like 0.0.0.0:8080"),
            );
        }
    }
    fn fraction(&mut self, key: &str, value: f64, zero_ok: bool) {
        let ok = value <= 1.0 && if zero_ok { value >= 0.0 } else { value > 0.0 };
        if !ok {
            let lower = if zero_ok { "[0" } else { "(0" };
            self.fail(key, format!("must be in {lower}, 1]"));
        }
    }
    fn dns_label(&mut self, key: &str, value: &str) {
        let b = value.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
        if !ok {
            self.fail(
                key,
                format!("{value:?} must be a DNS label (lowercase a-z, 0-9, '-', at most 63)"),
            );
        }
    }
    fn dns_subdomain(&mut self, key: &str, value: &str) {
        let label_ok = |l: &str| {
            let b = l.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        };
        if value.is_empty() || value.len() > 253 || !value.split('.').all(label_ok) {
            self.fail(key, format!("{value:?} must be a DNS subdomain name"));
        }
    }
}

impl Settings {
    /// Checks every value and reports every invalid key at once.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let mut c = Check(Vec::new());
        self.check_amqp(&mut c);
        self.check_topology(&mut c);
        self.check_worker(&mut c);
        self.check_breaker(&mut c);
        self.check_retry(&mut c);
        self.check_sandbox(&mut c);
        self.check_gateway(&mut c);
        self.check_console(&mut c);
        self.check_sessions(&mut c);
        self.check_fairness(&mut c);
        self.check_telemetry(&mut c);
        self.check_limits(&mut c);
        if c.0.is_empty() {
            Ok(())
        } else {
            Err(SettingsError::Invalid(c.0))
        }
    }

    fn check_amqp(&self, c: &mut Check) {
        let a = &self.amqp;
        if !(a.url.starts_with("amqp://") || a.url.starts_with("amqps://")) {
            // Never echo the URL: it carries credentials.
            c.fail("amqp.url", "must start with amqp:// or amqps://");
        }
        c.at_least("amqp.pool_size", a.pool_size, 1);
        c.at_least("amqp.connect_timeout_secs", a.connect_timeout_secs, 1);
        c.at_least(
            "amqp.max_outstanding_confirms",
            a.max_outstanding_confirms,
            1,
        );
        c.at_least(
            "amqp.reconnect_max_delay_secs",
            a.reconnect_max_delay_secs,
            1,
        );
        if a.connection_name.as_deref().is_some_and(str::is_empty) {
            c.fail("amqp.connection_name", "must not be empty when set");
        }
    }

    fn check_topology(&self, c: &mut Check) {
        let t = &self.topology;
        let prefix_ok = !t.prefix.is_empty()
            && t.prefix.len() <= 100
            && t.prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !prefix_ok {
            c.fail("topology.prefix", "must be 1-100 of [A-Za-z0-9._-]");
        }
        c.at_least("topology.delivery_limit", t.delivery_limit, 1);
        if t.retry_delays_secs.is_empty() {
            c.fail("topology.retry_delays_secs", "needs at least one delay");
        }
        if t.retry_delays_secs.contains(&0) {
            c.fail(
                "topology.retry_delays_secs",
                "delays must be at least 1 second",
            );
        }
        if !t.retry_delays_secs.windows(2).all(|w| w[0] < w[1]) {
            c.fail(
                "topology.retry_delays_secs",
                "delays must be strictly increasing",
            );
        }
        if !is_rabbitmq_max_age(&t.results_max_age) {
            c.fail(
                "topology.results_max_age",
                format!(
                    "{:?} must be a number followed by Y, M, D, h, m or s (e.g. 7D)",
                    t.results_max_age
                ),
            );
        }
        c.at_least("topology.results_max_bytes", t.results_max_bytes, 1);
    }

    fn check_fairness(&self, c: &mut Check) {
        let f = &self.fairness;
        c.at_least("fairness.default_weight", f.default_weight, 1);
        c.at_least("fairness.prefetch_per_shard", f.prefetch_per_shard, 1);
        c.at_least("fairness.max_hold_secs", f.max_hold_secs, 1);
        if self.topology.task_shards > 1024 {
            c.fail("topology.task_shards", "must be at most 1024");
        }
        for (section, list) in [("fairness.tenants", &f.tenants), ("fairness.keys", &f.keys)] {
            let mut seen = std::collections::HashSet::new();
            for (i, share) in list.iter().enumerate() {
                if share.name.is_empty() {
                    c.fail(&format!("{section}[{i}].name"), "must not be empty");
                } else if !seen.insert(share.name.as_str()) {
                    c.fail(
                        &format!("{section}[{i}].name"),
                        format!("{:?} is listed twice", share.name),
                    );
                }
                c.at_least(&format!("{section}[{i}].weight"), share.weight, 1);
            }
        }
    }

    fn check_worker(&self, c: &mut Check) {
        let w = &self.worker;
        c.at_least("worker.concurrency", w.concurrency, 1);
        c.socket_addr("worker.http_addr", &w.http_addr);
        if w.name.as_deref().is_some_and(str::is_empty) {
            c.fail("worker.name", "must not be empty when set");
        }
        c.at_least("worker.queue_depth_poll_secs", w.queue_depth_poll_secs, 1);
    }

    fn check_breaker(&self, c: &mut Check) {
        let b = &self.breaker;
        c.at_least("breaker.consecutive_failures", b.consecutive_failures, 1);
        c.fraction("breaker.failure_rate", b.failure_rate, false);
        c.at_least("breaker.window", b.window, 1);
        c.at_least("breaker.min_calls", b.min_calls, 1);
        if b.min_calls > b.window {
            c.fail(
                "breaker.min_calls",
                format!("must not exceed breaker.window ({})", b.window),
            );
        }
        c.at_least("breaker.cooldown_secs", b.cooldown_secs, 1);
        c.at_least("breaker.half_open_probes", b.half_open_probes, 1);
    }

    fn check_retry(&self, c: &mut Check) {
        let r = &self.retry;
        c.at_least("retry.base_delay_secs", r.base_delay_secs, 1);
        if r.max_delay_secs < r.base_delay_secs {
            c.fail(
                "retry.max_delay_secs",
                "must be at least retry.base_delay_secs",
            );
        }
        c.fraction("retry.jitter", r.jitter, true);
        c.at_least("retry.api_retry_base_ms", r.api_retry_base_ms, 1);
    }

    fn check_sandbox(&self, c: &mut Check) {
        let l = &self.sandbox.local;
        if !l.shell.starts_with('/') {
            c.fail("sandbox.local.shell", "must be an absolute path");
        }
        c.at_least("sandbox.local.max_output_bytes", l.max_output_bytes, 1024);
        c.at_least("sandbox.local.max_file_bytes", l.max_file_bytes, 1 << 20);
        c.at_least(
            "sandbox.local.max_workspace_bytes",
            l.max_workspace_bytes,
            1 << 20,
        );
        if l.work_dir.as_deref().is_some_and(str::is_empty) {
            c.fail("sandbox.local.work_dir", "must not be empty when set");
        }
        let k = &self.sandbox.kubernetes;
        c.dns_label("sandbox.kubernetes.namespace", &k.namespace);
        c.dns_subdomain("sandbox.kubernetes.service_account", &k.service_account);
        if let Some(uid) = k.run_as_user {
            c.at_least("sandbox.kubernetes.run_as_user", uid, 0);
            if k.run_as_non_root && uid == 0 {
                c.fail(
                    "sandbox.kubernetes.run_as_user",
                    "is 0 (root) but run_as_non_root is true",
                );
            }
        }
        if let Some(rc) = &k.runtime_class {
            c.dns_subdomain("sandbox.kubernetes.runtime_class", rc);
        }
        for s in &k.image_pull_secrets {
            c.dns_subdomain("sandbox.kubernetes.image_pull_secrets", s);
        }
        for t in &k.tolerations {
            if !t.is_object() {
                c.fail(
                    "sandbox.kubernetes.tolerations",
                    "each toleration must be a table",
                );
            }
        }
        c.at_least(
            "sandbox.kubernetes.ttl_seconds_after_finished",
            k.ttl_seconds_after_finished,
            0,
        );
        c.at_least(
            "sandbox.kubernetes.log_limit_bytes",
            k.log_limit_bytes,
            1024,
        );
        c.at_least("sandbox.kubernetes.gc_interval_secs", k.gc_interval_secs, 1);
        c.at_least(
            "sandbox.kubernetes.orphan_max_age_secs",
            k.orphan_max_age_secs,
            60,
        );
        match Quantity::parse(&k.workspace_size_limit) {
            Ok(q) if q.0 > 0.0 => {}
            Ok(_) => c.fail(
                "sandbox.kubernetes.workspace_size_limit",
                "must be greater than zero",
            ),
            Err(e) => c.fail("sandbox.kubernetes.workspace_size_limit", e.to_string()),
        }
        c.at_least(
            "sandbox.kubernetes.request_timeout_secs",
            k.request_timeout_secs,
            1,
        );
        if let Some(q) = &k.kueue_queue {
            // A LocalQueue name, used as a label value: a DNS label.
            c.dns_label("sandbox.kubernetes.kueue_queue", q);
        }
        c.at_least(
            "sandbox.kubernetes.admission_timeout_secs",
            k.admission_timeout_secs,
            1,
        );
        self.check_resources(c);
    }

    fn check_resources(&self, c: &mut Check) {
        let k = &self.sandbox.kubernetes;
        let d = &k.default_resources;
        let m = &k.max_resources;
        let mut q = |key: &str, v: &Option<String>| -> Option<f64> {
            let v = v.as_deref()?;
            match Quantity::parse(v) {
                Ok(q) if q.0 > 0.0 => Some(q.0),
                Ok(_) => {
                    c.fail(key, "must be greater than zero");
                    None
                }
                Err(e) => {
                    c.fail(key, e.to_string());
                    None
                }
            }
        };
        let p = "sandbox.kubernetes.default_resources";
        let cpu = (
            q(&format!("{p}.cpu_request"), &d.cpu_request),
            q(&format!("{p}.cpu_limit"), &d.cpu_limit),
            q("sandbox.kubernetes.max_resources.cpu", &m.cpu),
        );
        let memory = (
            q(&format!("{p}.memory_request"), &d.memory_request),
            q(&format!("{p}.memory_limit"), &d.memory_limit),
            q("sandbox.kubernetes.max_resources.memory", &m.memory),
        );
        let storage = (
            q(
                &format!("{p}.ephemeral_storage_request"),
                &d.ephemeral_storage_request,
            ),
            q(
                &format!("{p}.ephemeral_storage_limit"),
                &d.ephemeral_storage_limit,
            ),
            None,
        );
        for (what, (request, limit, max)) in [
            ("cpu", cpu),
            ("memory", memory),
            ("ephemeral_storage", storage),
        ] {
            if let (Some(r), Some(l)) = (request, limit)
                && r > l
            {
                c.fail(
                    &format!("{p}.{what}_request"),
                    format!("is above {p}.{what}_limit"),
                );
            }
            for (kind, v) in [("request", request), ("limit", limit)] {
                if let (Some(v), Some(max)) = (v, max)
                    && v > max
                {
                    c.fail(
                        &format!("{p}.{what}_{kind}"),
                        format!("is above sandbox.kubernetes.max_resources.{what}"),
                    );
                }
            }
        }
    }

    fn check_sessions(&self, c: &mut Check) {
        if self.sessions.backend == crate::SessionBackendKind::Local
            && !self.sessions.pools.is_empty()
        {
            c.fail(
                "sessions.pools",
                "warm pools need sessions.backend = \"kubernetes\" (the local backend starts a session in milliseconds and keeps no pool)",
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.sessions.pools.iter().enumerate() {
            let key = |f: &str| format!("sessions.pools[{i}].{f}");
            // The name goes into Job names (`sp-<pool>-<slot>-<gen>`) and label values.
            let name_ok = !p.name.is_empty()
                && p.name.len() <= 30
                && !p.name.starts_with('-')
                && !p.name.ends_with('-')
                && p.name
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-');
            if !name_ok {
                c.fail(
                    &key("name"),
                    "must be 1-30 lowercase letters, digits or '-'",
                );
            }
            if !seen.insert(p.name.as_str()) {
                c.fail(&key("name"), format!("pool {:?} is declared twice", p.name));
            }
            if p.image.trim().is_empty() {
                c.fail(&key("image"), "must not be empty");
            }
            c.at_least(&key("max_age_secs"), p.max_age_secs, 60);
        }
    }

    fn check_console(&self, c: &mut Check) {
        let k = &self.console;
        c.socket_addr("console.listen_addr", &k.listen_addr);
        c.at_least("console.refresh_secs", k.refresh_secs, 1);
        c.at_least("console.results_kept", k.results_kept, 10);
        if k.tokens.iter().any(|t| t.token.len() < 16) {
            c.fail("console.tokens", "tokens must be at least 16 characters");
        }
        if k.tokens.iter().any(|t| t.name.trim().is_empty()) {
            c.fail("console.tokens", "every token needs a name");
        }
        if k.read_requires_token && k.tokens.is_empty() {
            c.fail(
                "console.read_requires_token",
                "needs at least one token in console.tokens",
            );
        }
        if k.sessions_url.is_some() && k.sessions_token.is_none() {
            c.fail(
                "console.sessions_token",
                "must be set with console.sessions_url",
            );
        }
    }

    fn check_gateway(&self, c: &mut Check) {
        let g = &self.gateway;
        c.socket_addr("gateway.listen_addr", &g.listen_addr);
        if g.github_secret.as_deref().is_some_and(str::is_empty) {
            c.fail("gateway.github_secret", "must not be empty when set");
        }
        if g.gitlab_token.as_deref().is_some_and(str::is_empty) {
            c.fail("gateway.gitlab_token", "must not be empty when set");
        }
        if g.api_tokens.iter().any(|t| t.len() < 16) {
            c.fail(
                "gateway.api_tokens",
                "tokens must be at least 16 characters",
            );
        }
        for repo in &g.allowed_repositories {
            let segments: Vec<&str> = repo.split('/').collect();
            let ok = segments.len() >= 2
                && segments.iter().enumerate().all(|(i, s)| {
                    (*s == "*" && i == segments.len() - 1)
                        || (!s.is_empty()
                            && s.bytes().all(|b| {
                                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
                            }))
                });
            if !ok {
                c.fail(
                    "gateway.allowed_repositories",
                    format!("{repo:?} must be `owner/name` or `owner/*`"),
                );
            }
        }
        c.at_least("gateway.max_body_bytes", g.max_body_bytes, 1024);
        self.check_template(c);
    }

    /// The template must produce tasks that pass validation: check its parts
    /// with the same rules (and limits) tasks are checked with.
    fn check_template(&self, c: &mut Check) {
        let t = &self.gateway.template;
        if let Err(e) = ImageRef::parse(&t.image) {
            c.fail("gateway.template.image", format!("{:?} {e}", t.image));
        }
        let source = sandfleet_proto::Source {
            provider: sandfleet_proto::Provider::Api,
            repository: "template/check".to_owned(),
            commit: "0000000".to_owned(),
            git_ref: None,
            ci_run_id: None,
            pull_request: None,
            url: None,
        };
        let sandbox = sandfleet_proto::SandboxSpec {
            image: "template-check".to_owned(),
            resources: Default::default(),
            env: Default::default(),
            deadline_secs: t.deadline_secs,
            pending_timeout_secs: t.pending_timeout_secs,
        };
        let mut task = sandfleet_proto::Task::fix_attempt(source, sandbox);
        task.steps = t.steps.clone();
        task.retry.max_attempts = t.max_attempts;
        // The intake's checks, consumer-timeout budget included: a template
        // every worker refuses is a configuration error, found at start-up.
        if let Err(errors) = task.validate_intake(&self.limits) {
            for e in errors.0 {
                let key = match e.path.as_str() {
                    "sandbox.deadline_secs" => "gateway.template.deadline_secs".to_owned(),
                    "sandbox.pending_timeout_secs" => {
                        "gateway.template.pending_timeout_secs".to_owned()
                    }
                    "retry.max_attempts" => "gateway.template.max_attempts".to_owned(),
                    p if p.starts_with("steps") => format!("gateway.template.{p}"),
                    // The stand-in fields above are valid by construction.
                    _ => continue,
                };
                c.fail(&key, e.message);
            }
        }
    }

    fn check_telemetry(&self, c: &mut Check) {
        let t = &self.telemetry;
        if t.log_filter.trim().is_empty() {
            c.fail("telemetry.log_filter", "must not be empty (e.g. `info`)");
        }
        if let Some(endpoint) = &t.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            c.fail(
                "telemetry.otlp_endpoint",
                "must be an http:// or https:// URL",
            );
        }
        if t.service_name.is_empty() {
            c.fail("telemetry.service_name", "must not be empty");
        }
    }

    fn check_limits(&self, c: &mut Check) {
        let l = &self.limits;
        c.at_least("limits.max_message_bytes", l.max_message_bytes, 1024);
        c.at_least("limits.max_steps", l.max_steps, 1);
        c.at_least("limits.max_file_bytes", l.max_file_bytes, 1);
        c.at_least("limits.max_path_bytes", l.max_path_bytes, 1);
        c.at_least("limits.max_command_bytes", l.max_command_bytes, 1);
        c.at_least("limits.max_step_name_bytes", l.max_step_name_bytes, 1);
        c.at_least("limits.max_step_timeout_secs", l.max_step_timeout_secs, 1);
        c.at_least("limits.max_deadline_secs", l.max_deadline_secs, 1);
        c.at_least(
            "limits.max_idempotency_key_bytes",
            l.max_idempotency_key_bytes,
            1,
        );
        c.at_least("limits.max_attempts", l.max_attempts, 1);
        // Below the margin no task could ever fit.
        c.at_least(
            "limits.broker_consumer_timeout_secs",
            l.broker_consumer_timeout_secs,
            sandfleet_proto::CONSUMER_TIMEOUT_MARGIN.as_secs() + 1,
        );
        if l.min_pending_timeout_secs > l.max_pending_timeout_secs {
            c.fail(
                "limits.min_pending_timeout_secs",
                "must not exceed limits.max_pending_timeout_secs",
            );
        }
    }
}

/// RabbitMQ's `x-max-age`: a positive integer and one of `Y M D h m s`.
fn is_rabbitmq_max_age(s: &str) -> bool {
    let Some(unit) = s.chars().last() else {
        return false;
    };
    let digits = &s[..s.len() - unit.len_utf8()];
    matches!(unit, 'Y' | 'M' | 'D' | 'h' | 'm' | 's')
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.parse::<u64>().is_ok_and(|n| n > 0)
}
