//! The task message: one fix attempt to run in a sandbox.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::SCHEMA_VERSION;
use crate::fairness::Fairness;

/// A task's identifier: a UUIDv7, so ids sort by creation time.
pub type TaskId = Uuid;

/// One unit of sandbox work, as published to the task queue.
///
/// Everything the sandbox needs travels in the message: the files to write,
/// the steps to run, the image and resources. Values taken from CI events
/// (repository, commit, branch) reach the sandbox as environment variables,
/// never spliced into a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Version of this contract; must be 1.
    #[schemars(extend("const" = 1))]
    pub schema_version: u32,
    /// Unique id of this task (UUIDv7). A replay gets a new id.
    pub id: TaskId,
    /// Producer-chosen key that identifies "the same request" across retries of
    /// the producer itself (a webhook delivery id, a replay batch + original id).
    pub idempotency_key: String,
    /// What kind of work this is.
    pub kind: TaskKind,
    /// When the producer created the task.
    pub created_at: DateTime<Utc>,
    /// Where the work comes from (repository, commit, CI run).
    pub source: Source,
    /// The sandbox to run in.
    pub sandbox: SandboxSpec,
    /// Files written into the workspace before the first step (a patch, a config).
    #[serde(default)]
    pub files: Vec<InputFile>,
    /// Steps run in order in the workspace.
    pub steps: Vec<Step>,
    /// Workspace-relative paths collected into the result after the steps ran.
    #[serde(default)]
    pub artifacts: Vec<String>,
    /// How often infrastructure failures may be retried.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Free-form labels, copied to the result (and to the Job's annotations).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The original task this one replays, when it was created by a replay:
    /// the first task of a replay chain (a replay of a replay points at the
    /// same original), so every replay of one build shares it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<TaskId>,
    /// Tasks with the same supersede key replace each other: a newer one
    /// cancels the older ones wherever they are (the gateway sets
    /// `<provider>:<repository>:ref:<branch>` or `...:mr:<number>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supersede_key: Option<String>,
    /// Who this task's service is accounted to when the fleet is saturated
    /// (`docs/fairness.md`): a key (default: `source.repository`) under a
    /// tenant (default: the repository's owner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fairness: Option<Fairness>,
}

/// The kind of work a task asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Check out a repository at a commit, apply a patch, run build and tests.
    FixAttempt,
}

/// Where the task comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Who produced the task.
    pub provider: Provider,
    /// Repository in `owner/name` form (or a GitLab path with groups).
    pub repository: String,
    /// Full commit SHA the sandbox checks out.
    #[schemars(regex(pattern = "^[0-9a-fA-F]{7,64}$"))]
    pub commit: String,
    /// Branch or tag (`ref` on the wire).
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// CI run or pipeline id that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_run_id: Option<String>,
    /// Pull or merge request number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<u64>,
    /// Link to the failed run, for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// Who produced a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// A GitHub webhook (workflow_run, check_suite).
    Github,
    /// A GitLab pipeline webhook.
    Gitlab,
    /// The HTTP task API, the CLI, or the producer library.
    Api,
}

/// The sandbox a task runs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// Container image reference (`registry/repo:tag` or `@sha256:...`).
    pub image: String,
    /// CPU and memory requests and limits.
    #[serde(default)]
    pub resources: Resources,
    /// Environment variables for every step.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Overall deadline for the whole task, in seconds, from sandbox start.
    pub deadline_secs: u64,
    /// How long the sandbox may stay pending (unschedulable, pulling its image)
    /// before the attempt is given up as an infrastructure failure, in seconds.
    #[serde(default = "default_pending_timeout_secs")]
    pub pending_timeout_secs: u64,
}

fn default_pending_timeout_secs() -> u64 {
    300
}

impl Source {
    /// A source with only what every task needs: who produced it, the
    /// repository and the commit; the optional fields are empty.
    pub fn new(
        provider: Provider,
        repository: impl Into<String>,
        commit: impl Into<String>,
    ) -> Source {
        Source {
            provider,
            repository: repository.into(),
            commit: commit.into(),
            git_ref: None,
            ci_run_id: None,
            pull_request: None,
            url: None,
        }
    }
}

impl SandboxSpec {
    /// A sandbox of `image` with a deadline of `deadline_secs`, no resources
    /// or env of its own, and the default pending timeout (what a task that
    /// leaves `pending_timeout_secs` out gets).
    pub fn new(image: impl Into<String>, deadline_secs: u64) -> SandboxSpec {
        SandboxSpec {
            image: image.into(),
            resources: Resources::default(),
            env: BTreeMap::new(),
            deadline_secs,
            pending_timeout_secs: default_pending_timeout_secs(),
        }
    }
}

/// Kubernetes-style resource quantities (`"500m"`, `"2"`, `"1Gi"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_request: Option<String>,
    /// CPU limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<String>,
    /// Memory request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_request: Option<String>,
    /// Memory limit; exceeding it ends the attempt as `oom_killed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<String>,
}

/// A file written into the workspace before the steps run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InputFile {
    /// Workspace-relative path; no `..`, no leading `/`, no NUL.
    pub path: String,
    /// UTF-8 file content.
    pub content: String,
    /// Whether the file is made executable.
    #[serde(default)]
    pub executable: bool,
}

/// One step: a shell command run in the workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Short name shown in results (`install`, `build`, `test`).
    pub name: String,
    /// The command, run by `/bin/sh -c` in the workspace.
    pub run: String,
    /// Timeout for this step, in seconds.
    pub timeout_secs: u64,
    /// Extra environment variables for this step.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// When true, a non-zero exit does not stop the task or fail it.
    #[serde(default)]
    pub continue_on_error: bool,
}

/// How often infrastructure failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry).
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 3 }
    }
}

impl Task {
    /// A new fix-attempt task with a fresh UUIDv7 id, created now, with no
    /// files and no steps yet; the idempotency key defaults to the id.
    pub fn fix_attempt(source: Source, sandbox: SandboxSpec) -> Task {
        let id = Uuid::now_v7();
        Task {
            schema_version: SCHEMA_VERSION,
            id,
            idempotency_key: id.to_string(),
            kind: TaskKind::FixAttempt,
            created_at: Utc::now(),
            source,
            sandbox,
            files: Vec::new(),
            steps: Vec::new(),
            artifacts: Vec::new(),
            retry: RetryPolicy::default(),
            labels: BTreeMap::new(),
            replay_of: None,
            supersede_key: None,
            fairness: None,
        }
    }

    /// Adds a step (builder style).
    pub fn with_step(mut self, name: &str, run: &str, timeout_secs: u64) -> Task {
        self.steps.push(Step {
            name: name.to_owned(),
            run: run.to_owned(),
            timeout_secs,
            env: BTreeMap::new(),
            continue_on_error: false,
        });
        self
    }

    /// Sets the fairness tenant and key (builder style); `None` keeps the
    /// default (the repository's owner, the repository).
    pub fn with_fairness(mut self, tenant: Option<&str>, key: Option<&str>) -> Task {
        self.fairness = Some(Fairness {
            tenant: tenant.map(str::to_owned),
            key: key.map(str::to_owned),
        });
        self
    }

    /// Adds an input file (builder style).
    pub fn with_file(mut self, path: &str, content: &str) -> Task {
        self.files.push(InputFile {
            path: path.to_owned(),
            content: content.to_owned(),
            executable: false,
        });
        self
    }
}
