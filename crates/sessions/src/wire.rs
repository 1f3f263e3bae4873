//! The JSON shapes of the HTTP API, shared by the server and [`crate::client`].

use sandfleet_sandbox::session::CommandOutput;
use serde::{Deserialize, Serialize};

/// A session as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The session id.
    pub id: String,
    /// Its image.
    pub image: String,
    /// Its working dir, relative to the workspace.
    pub working_dir: String,
    /// Its idle timeout in seconds.
    pub idle_timeout_secs: u64,
    /// When it was created (RFC 3339), if known.
    pub created: Option<String>,
    /// It ended by itself and is about to be deleted.
    pub ended: bool,
}

/// `POST /v1/sessions/{id}/run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequest {
    /// The command line, run with `/bin/sh -c`.
    pub command: String,
    /// Seconds before the command and its process tree are killed.
    pub timeout_secs: u64,
    /// Bytes kept of each stream (capped by the service's limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<usize>,
}

/// One line of a streamed run (`?stream=true`, `application/x-ndjson`):
/// output as it comes, then exactly one `result` or `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamLine {
    /// Stdout bytes, base64.
    Stdout(String),
    /// Stderr bytes, base64.
    Stderr(String),
    /// The command finished.
    Result(CommandOutput),
    /// The run failed (`code` as in error bodies).
    Error {
        /// Stable code.
        code: String,
        /// Message.
        message: String,
    },
}

/// Response header of `GET .../files`: `true` when the file was longer than returned.
pub const TRUNCATED_HEADER: &str = "x-sandfleet-truncated";
