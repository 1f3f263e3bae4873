//! Interactive sandbox sessions: a sandbox that stays up between commands.
//!
//! Batch tasks run one generated script per Job (see [`crate::script`]); a
//! session instead keeps its sandbox alive and takes commands one at a time,
//! the way an agent repairing a build works: run the tests, read the failing
//! file, write a patch, run the tests again.
//!
//! The contract is the [`SessionBackend`] trait, addressed by [`SessionId`] so
//! that a stateless service can serve any session from any replica, and the
//! [`Session`] handle over it, which tears its sandbox down when dropped. Two
//! backends implement it: [`LocalSessions`] (child processes in a temp dir) and
//! [`KubeSessions`] (a long-lived pod driven through `pods/exec`). Both run the
//! same POSIX `sh` wrappers ([`script`]), so the local backend tests them for
//! real, and both pass every user value as an argument or environment
//! variable, never spliced into a shell line.
//!
//! Start with [`SessionBackend`], then [`Session`].

pub mod conformance;
pub mod kubernetes;
pub mod local;
pub mod pool;
pub mod script;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sandfleet_proto::Resources;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use kubernetes::KubeSessions;
pub use local::LocalSessions;

/// Identifies a session within its backend (the Kubernetes backend: the Job's name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub String);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a session's sandbox looks like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSpec {
    /// Container image (the local backend ignores it: it runs on the host).
    pub image: String,
    /// CPU and memory; unset fields take the deployment's defaults.
    #[serde(default)]
    pub resources: Resources,
    /// Environment of every command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of every command, relative to the workspace (created
    /// at start). `"."` is the workspace itself.
    #[serde(default = "default_working_dir")]
    pub working_dir: String,
    /// The sandbox ends by itself after this long without a command or a file
    /// transfer (a running command counts as activity).
    #[serde(with = "secs", default = "default_idle")]
    pub idle_timeout: Duration,
    /// The sandbox ends by itself this long after it was created, whatever it does.
    #[serde(with = "secs", default = "default_lifetime")]
    pub max_lifetime: Duration,
}

fn default_working_dir() -> String {
    ".".into()
}
fn default_idle() -> Duration {
    Duration::from_secs(600)
}
fn default_lifetime() -> Duration {
    Duration::from_secs(3600)
}

/// Durations as whole seconds on the wire.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

impl SessionSpec {
    /// A spec with the defaults: workspace as working dir, 10 min idle, 1 h lifetime.
    pub fn new(image: impl Into<String>) -> SessionSpec {
        SessionSpec {
            image: image.into(),
            resources: Resources::default(),
            env: BTreeMap::new(),
            working_dir: default_working_dir(),
            idle_timeout: default_idle(),
            max_lifetime: default_lifetime(),
        }
    }

    /// Checks what every backend needs: env names that are identifiers and not
    /// reserved, no NUL bytes, a relative working dir inside the workspace,
    /// timeouts of at least a second.
    pub fn validate(&self) -> Result<(), SessionError> {
        let invalid = |m: String| Err(SessionError::InvalidSpec(m));
        if self.image.trim().is_empty() {
            return invalid("image must not be empty".into());
        }
        for (k, v) in &self.env {
            let ident = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ident {
                return invalid(format!("env name {k:?} is not an identifier"));
            }
            // `sf_*` are the wrappers' own variables (see `script`).
            if k.starts_with("SANDFLEET_") || k.starts_with("sf_") || k == "PATH" || k == "HOME" {
                return invalid(format!("env name {k:?} is reserved"));
            }
            if v.contains('\0') {
                return invalid(format!("env {k} contains a NUL byte"));
            }
        }
        check_relative(&self.working_dir).map_err(SessionError::InvalidSpec)?;
        if self.idle_timeout < Duration::from_secs(1) || self.max_lifetime < Duration::from_secs(1)
        {
            return invalid("idle_timeout and max_lifetime must be at least 1 s".into());
        }
        Ok(())
    }
}

/// A relative path that stays inside the workspace (no `..`, not absolute, no NUL).
pub(crate) fn check_relative(path: &str) -> Result<(), String> {
    if path.is_empty() || path.contains('\0') {
        return Err(format!("path {path:?} is empty or holds a NUL byte"));
    }
    if path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(format!(
            "path {path:?} must be relative to the workspace, without `..`"
        ));
    }
    Ok(())
}

/// How one command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// The command and everything it started are killed after this long
    /// (whole seconds, rounded up: the in-sandbox watchdog is `sleep`).
    pub timeout: Duration,
    /// Bytes of stdout and of stderr kept each; the rest is counted as truncated.
    pub max_output_bytes: usize,
}

impl RunOptions {
    /// `timeout`, and 1 MiB of each stream.
    pub fn new(timeout: Duration) -> RunOptions {
        RunOptions {
            timeout,
            max_output_bytes: 1 << 20,
        }
    }
}

/// What a finished command did. A command's own failure is data here, not an `Err`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutput {
    /// Exit code (128 + n when killed by signal n, as `sh` reports it). Meaningless when `timed_out`.
    pub exit_code: i32,
    /// The command ran past its timeout and was killed with its process tree.
    pub timed_out: bool,
    /// Standard output, at most `max_output_bytes`.
    #[serde(with = "b64")]
    pub stdout: Vec<u8>,
    /// Standard error, at most `max_output_bytes`.
    #[serde(with = "b64")]
    pub stderr: Vec<u8>,
    /// Stdout was longer than kept.
    pub stdout_truncated: bool,
    /// Stderr was longer than kept.
    pub stderr_truncated: bool,
    /// Wall time from sending the command to its exit status.
    #[serde(with = "millis")]
    pub duration: Duration,
}

/// Binary output as base64 on the wire (binary-safe JSON).
pub mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Encodes.
    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(b))
    }
    /// Decodes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// A piece of a running command's output, for the streaming form of `run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputChunk {
    /// Bytes the command wrote to stdout.
    Stdout(Bytes),
    /// Bytes the command wrote to stderr.
    Stderr(Bytes),
}

/// A file read back from a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileContents {
    /// At most `max_bytes` bytes.
    pub bytes: Vec<u8>,
    /// The file was longer.
    pub truncated: bool,
}

/// Why a session operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The spec (or a path, a mode) is not acceptable.
    #[error("invalid session request: {0}")]
    InvalidSpec(String),
    /// No such session (never created, torn down, or ended by idle timeout or lifetime).
    #[error("session {0} does not exist (torn down, idle too long or past its lifetime)")]
    NotFound(SessionId),
    /// The sandbox did not become ready.
    #[error("session sandbox did not start: {0}")]
    Start(String),
    /// The connection to the sandbox was lost while a command ran: whether it
    /// ran, finished or still runs is unknown. Never reported as an exit code.
    #[error("connection lost while the command ran; its fate is unknown: {0}")]
    ConnectionLost(String),
    /// The sandbox refused the command or transfer (exec denied, API error).
    #[error("sandbox unavailable: {0}")]
    Unavailable(String),
    /// A file could not be written or read (missing, not a regular file, no space).
    #[error("file {path}: {message}")]
    File {
        /// The path as given.
        path: String,
        /// What the sandbox said.
        message: String,
    },
    /// A local I/O failure of the backend itself.
    #[error("session backend i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl SessionError {
    /// True when the command's outcome is unknown (it may have run).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, SessionError::ConnectionLost(_))
    }
}

/// Where sessions run. Operations name the session by id, so any process that
/// can reach the backend's state (for Kubernetes: the cluster) serves any session.
#[async_trait]
pub trait SessionBackend: Send + Sync + 'static {
    /// Starts a sandbox; returns once it can run commands (its working dir exists).
    async fn start(&self, spec: &SessionSpec) -> Result<SessionId, SessionError>;

    /// Runs `command` with `/bin/sh -c` in the session's working dir and env.
    /// With `sink`, output is also sent there as it arrives (the streaming
    /// form); the returned [`CommandOutput`] is bounded either way. A command
    /// past `opts.timeout` is killed with its process tree and the session
    /// stays usable.
    async fn run(
        &self,
        id: &SessionId,
        command: &str,
        opts: RunOptions,
        sink: Option<mpsc::Sender<OutputChunk>>,
    ) -> Result<CommandOutput, SessionError>;

    /// Writes `bytes` to `path` (relative to the working dir; parents are
    /// created) with permission bits `mode` (e.g. `0o644`).
    async fn write_file(
        &self,
        id: &SessionId,
        path: &str,
        bytes: &[u8],
        mode: u32,
    ) -> Result<(), SessionError>;

    /// Reads at most `max_bytes` of `path` (relative to the working dir).
    async fn read_file(
        &self,
        id: &SessionId,
        path: &str,
        max_bytes: usize,
    ) -> Result<FileContents, SessionError>;

    /// Ends the sandbox. Idempotent: tearing down a gone session is `Ok`.
    async fn teardown(&self, id: &SessionId) -> Result<(), SessionError>;
}

/// Permission bits a file may be written with.
pub(crate) fn check_mode(mode: u32) -> Result<String, SessionError> {
    if mode > 0o7777 {
        return Err(SessionError::InvalidSpec(format!(
            "mode {mode:o} is not a permission mode"
        )));
    }
    Ok(format!("{mode:o}"))
}

/// A started session. Dropping it without [`Session::teardown`] schedules the
/// teardown on the current tokio runtime (so a panic in the caller's code does
/// not leak a sandbox); the sandbox's idle timeout is the backstop when no
/// runtime is left.
pub struct Session {
    backend: Arc<dyn SessionBackend>,
    id: SessionId,
    torn_down: bool,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").field("id", &self.id).finish()
    }
}

impl Session {
    /// Starts a session on `backend`.
    pub async fn start(
        backend: Arc<dyn SessionBackend>,
        spec: &SessionSpec,
    ) -> Result<Session, SessionError> {
        spec.validate()?;
        let id = backend.start(spec).await?;
        Ok(Session {
            backend,
            id,
            torn_down: false,
        })
    }

    /// A handle to an existing session (which the handle then owns: dropping
    /// it tears the session down).
    pub fn attach(backend: Arc<dyn SessionBackend>, id: SessionId) -> Session {
        Session {
            backend,
            id,
            torn_down: false,
        }
    }

    /// The session's id.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// Gives up ownership: the session outlives the handle (until its idle timeout).
    pub fn detach(mut self) -> SessionId {
        self.torn_down = true;
        self.id.clone()
    }

    /// Runs a command (see [`SessionBackend::run`]).
    pub async fn run(
        &self,
        command: &str,
        timeout: Duration,
    ) -> Result<CommandOutput, SessionError> {
        self.backend
            .run(&self.id, command, RunOptions::new(timeout), None)
            .await
    }

    /// Runs a command, sending its output to `sink` as it arrives.
    pub async fn run_streaming(
        &self,
        command: &str,
        opts: RunOptions,
        sink: mpsc::Sender<OutputChunk>,
    ) -> Result<CommandOutput, SessionError> {
        self.backend.run(&self.id, command, opts, Some(sink)).await
    }

    /// Writes a file (see [`SessionBackend::write_file`]).
    pub async fn write_file(
        &self,
        path: &str,
        bytes: &[u8],
        mode: u32,
    ) -> Result<(), SessionError> {
        self.backend.write_file(&self.id, path, bytes, mode).await
    }

    /// Reads a file (see [`SessionBackend::read_file`]).
    pub async fn read_file(
        &self,
        path: &str,
        max_bytes: usize,
    ) -> Result<FileContents, SessionError> {
        self.backend.read_file(&self.id, path, max_bytes).await
    }

    /// Ends the session; calling it again is `Ok`.
    pub async fn teardown(&mut self) -> Result<(), SessionError> {
        self.backend.teardown(&self.id).await?;
        self.torn_down = true;
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let backend = self.backend.clone();
            let id = self.id.clone();
            rt.spawn(async move {
                if let Err(e) = backend.teardown(&id).await {
                    tracing::warn!(session = %id, "teardown of a dropped session failed: {e}");
                }
            });
        }
    }
}
