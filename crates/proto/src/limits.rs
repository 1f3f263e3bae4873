//! The limits that protect the fleet from oversized or abusive tasks.
//!
//! Every bound [`crate::validate()`] enforces lives here, so an operator can
//! tighten or loosen them in one place (the `limits` section of the
//! configuration) and producers and workers agree on them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Bounds a task must respect to be accepted.
///
/// The defaults suit fix attempts: a few build and test steps, a patch and a
/// handful of config files, a deadline of at most four hours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest encoded task message, in bytes. Checked before parsing.
    pub max_message_bytes: usize,
    /// Most steps in one task.
    pub max_steps: usize,
    /// Most input files in one task.
    pub max_files: usize,
    /// Largest single input file, in bytes.
    pub max_file_bytes: usize,
    /// Longest workspace-relative path (files and artifacts), in bytes.
    pub max_path_bytes: usize,
    /// Most artifact paths in one task.
    pub max_artifacts: usize,
    /// Longest step command, in bytes.
    pub max_command_bytes: usize,
    /// Longest step name, in bytes.
    pub max_step_name_bytes: usize,
    /// Largest step timeout, in seconds.
    pub max_step_timeout_secs: u64,
    /// Largest task deadline, in seconds.
    pub max_deadline_secs: u64,
    /// Smallest pending timeout, in seconds (image pulls need some time).
    pub min_pending_timeout_secs: u64,
    /// Largest pending timeout, in seconds.
    pub max_pending_timeout_secs: u64,
    /// Most environment variables, per map (the sandbox's, and each step's).
    pub max_env_vars: usize,
    /// Longest environment variable value, in bytes.
    pub max_env_value_bytes: usize,
    /// Most labels on one task.
    pub max_labels: usize,
    /// Longest label value, in bytes.
    pub max_label_value_bytes: usize,
    /// Longest idempotency key, in bytes.
    pub max_idempotency_key_bytes: usize,
    /// Largest `retry.max_attempts`.
    pub max_attempts: u32,
    /// The broker's `consumer_timeout`, in seconds: a worker holds a task's
    /// delivery while its sandbox runs, so `deadline_secs +
    /// pending_timeout_secs` must fit in it less a 60 s margin (see
    /// [`crate::budget`]). Checked by every intake ([`crate::validate_intake`])
    /// and by the worker; not by [`crate::validate()`].
    pub broker_consumer_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 1024 * 1024,
            max_steps: 32,
            max_files: 64,
            max_file_bytes: 256 * 1024,
            max_path_bytes: 1024,
            max_artifacts: 32,
            max_command_bytes: 16 * 1024,
            max_step_name_bytes: 63,
            max_step_timeout_secs: 4 * 3600,
            max_deadline_secs: 4 * 3600,
            min_pending_timeout_secs: 10,
            max_pending_timeout_secs: 3600,
            max_env_vars: 64,
            max_env_value_bytes: 16 * 1024,
            max_labels: 32,
            max_label_value_bytes: 256,
            max_idempotency_key_bytes: 256,
            max_attempts: 10,
            // RabbitMQ's own default consumer_timeout (30 min).
            broker_consumer_timeout_secs: 1800,
        }
    }
}
