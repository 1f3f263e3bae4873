//! `sandfleet session create|exec|cp|rm|ls`: the sessions service from scripts.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use sandfleet_sandbox::session::{
    OutputChunk, RunOptions, SessionBackend, SessionError, SessionId, SessionSpec,
};
use sandfleet_sessions::SessionsClient;
use serde_json::json;
use tokio::sync::mpsc;

use crate::exit::{CliError, CliResult, Exit};
use crate::output::Output;

/// Where the sessions service is, and the token to use.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// The sessions service's base URL.
    #[arg(
        long = "url",
        value_name = "URL",
        env = "SANDFLEET_SESSIONS_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub url: String,
    /// Bearer token (prefer the env var: a flag shows in `ps`).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "SANDFLEET_SESSIONS_TOKEN",
        hide_env_values = true
    )]
    pub token: String,
}

impl ServiceArgs {
    /// A client of the service.
    pub fn client(&self) -> SessionsClient {
        SessionsClient::new(&self.url, &self.token)
    }
}

/// What a new session looks like (shared by `session create` and `shell`).
#[derive(Debug, Clone, Args)]
pub struct SpecArgs {
    /// Container image.
    #[arg(long)]
    pub image: String,
    /// Environment variable NAME=VALUE; repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Working directory, relative to the workspace.
    #[arg(long, default_value = ".")]
    pub workdir: String,
    /// End the session after this many idle seconds.
    #[arg(long, default_value_t = 600)]
    pub idle_timeout: u64,
    /// End the session this many seconds after it started.
    #[arg(long, default_value_t = 3600)]
    pub max_lifetime: u64,
}

impl SpecArgs {
    /// The spec these flags describe.
    pub fn spec(&self) -> CliResult<SessionSpec> {
        let mut env = BTreeMap::new();
        for kv in &self.env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| CliError::Usage(format!("--env {kv:?}: expected NAME=VALUE")))?;
            env.insert(k.to_owned(), v.to_owned());
        }
        let mut spec = SessionSpec::new(&self.image);
        spec.env = env;
        spec.working_dir.clone_from(&self.workdir);
        spec.idle_timeout = Duration::from_secs(self.idle_timeout);
        spec.max_lifetime = Duration::from_secs(self.max_lifetime);
        spec.validate()
            .map_err(|e| CliError::Usage(e.to_string()))?;
        Ok(spec)
    }
}

/// `sandfleet session ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum SessionCommand {
    /// Start a session and print its id.
    #[command(after_help = "\
Examples:
  id=$(sandfleet session create --image python:3.12 --env CI=1)
  sandfleet session create --image alpine:3.20 --json | jq -r .id")]
    Create {
        /// The service.
        #[command(flatten)]
        service: ServiceArgs,
        /// The sandbox.
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Run a command in a session; its output streams to stdout and stderr.
    #[command(after_help = "\
Examples:
  sandfleet session exec \"$id\" -- make test
  sandfleet session exec \"$id\" --timeout 60 --json -- 'pytest -x' | jq .exit_code

Exit status: 0 when the command exited 0, 1 otherwise (its code is printed
on stderr, and is `exit_code` with --json).")]
    Exec {
        /// The service.
        #[command(flatten)]
        service: ServiceArgs,
        /// The session id.
        id: String,
        /// Seconds before the command and its process tree are killed.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The command line (run with /bin/sh -c; words are joined by spaces).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Copy a file into or out of a session: one side is ID:PATH.
    #[command(after_help = "\
Examples:
  sandfleet session cp fix.patch \"$id\":fix.patch
  sandfleet session cp \"$id\":report.xml ./report.xml
  sandfleet session cp \"$id\":out.log -        # to stdout")]
    Cp {
        /// The service.
        #[command(flatten)]
        service: ServiceArgs,
        /// Source: a local file, `-` (stdin) or ID:PATH.
        src: String,
        /// Destination: a local file, `-` (stdout) or ID:PATH.
        dst: String,
        /// Permission bits of an uploaded file (octal).
        #[arg(long, default_value = "644")]
        mode: String,
        /// Largest download, in bytes.
        #[arg(long, default_value_t = 16 << 20)]
        max_bytes: usize,
    },
    /// Tear sessions down.
    Rm {
        /// The service.
        #[command(flatten)]
        service: ServiceArgs,
        /// Session ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// List this token's sessions.
    Ls {
        /// The service.
        #[command(flatten)]
        service: ServiceArgs,
    },
}

fn failed(e: SessionError) -> CliError {
    CliError::Failed(e.to_string())
}

/// Runs `command` on `backend`, streaming its output; the result, or why not.
pub async fn run_streamed(
    backend: &dyn SessionBackend,
    id: &SessionId,
    command: &str,
    timeout: Duration,
) -> Result<sandfleet_sandbox::session::CommandOutput, SessionError> {
    let (tx, mut rx) = mpsc::channel(64);
    let printer = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            // Raw bytes, as the command wrote them.
            let _ = match chunk {
                OutputChunk::Stdout(b) => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&b).and_then(|()| o.flush())
                }
                OutputChunk::Stderr(b) => {
                    let mut e = std::io::stderr().lock();
                    e.write_all(&b).and_then(|()| e.flush())
                }
            };
        }
    });
    let result = backend
        .run(id, command, RunOptions::new(timeout), Some(tx))
        .await;
    let _ = printer.await;
    result
}

/// Runs a `session` subcommand.
pub async fn run(c: &SessionCommand, out: Output) -> CliResult<Exit> {
    match c {
        SessionCommand::Create { service, spec } => {
            let info = service
                .client()
                .create(&spec.spec()?)
                .await
                .map_err(failed)?;
            out.emit(&info.id, &json!(info));
            Ok(Exit::Ok)
        }
        SessionCommand::Exec {
            service,
            id,
            timeout,
            command,
        } => {
            let client = service.client();
            let id = SessionId(id.clone());
            let command = command.join(" ");
            let timeout = Duration::from_secs(*timeout);
            let result = if out.json {
                client
                    .run(&id, &command, RunOptions::new(timeout), None)
                    .await
            } else {
                run_streamed(&client, &id, &command, timeout).await
            };
            let o = result.map_err(failed)?;
            out.json(&json!({
                "exit_code": o.exit_code,
                "timed_out": o.timed_out,
                "stdout": String::from_utf8_lossy(&o.stdout),
                "stderr": String::from_utf8_lossy(&o.stderr),
                "stdout_truncated": o.stdout_truncated,
                "stderr_truncated": o.stderr_truncated,
                "duration_ms": o.duration.as_millis() as u64,
            }));
            if o.timed_out {
                crate::output::diag(format_args!(
                    "sandfleet: the command ran past {}s and was killed",
                    timeout.as_secs()
                ));
            } else if o.exit_code != 0 && !out.json {
                crate::output::diag(format_args!("sandfleet: exit code {}", o.exit_code));
            }
            Ok(if o.exit_code == 0 && !o.timed_out {
                Exit::Ok
            } else {
                Exit::Failure
            })
        }
        SessionCommand::Cp {
            service,
            src,
            dst,
            mode,
            max_bytes,
        } => cp(&service.client(), src, dst, mode, *max_bytes, out).await,
        SessionCommand::Rm { service, ids } => {
            let client = service.client();
            for id in ids {
                client
                    .teardown(&SessionId(id.clone()))
                    .await
                    .map_err(failed)?;
                out.emit(format!("removed {id}"), &json!({"removed": id}));
            }
            Ok(Exit::Ok)
        }
        SessionCommand::Ls { service } => {
            let sessions = service.client().list().await.map_err(failed)?;
            if out.json {
                for s in &sessions {
                    out.json(&json!(s));
                }
            } else {
                out.human(format!(
                    "{:<36} {:<24} {:<8} CREATED",
                    "ID", "IMAGE", "STATE"
                ));
                for s in &sessions {
                    out.human(format!(
                        "{:<36} {:<24} {:<8} {}",
                        s.id,
                        s.image,
                        if s.ended { "ended" } else { "running" },
                        s.created.as_deref().unwrap_or("-")
                    ));
                }
            }
            Ok(Exit::Ok)
        }
    }
}

/// `ID:PATH` → (id, path). A local path with a colon is written `./a:b`.
fn remote(arg: &str) -> Option<(SessionId, &str)> {
    if arg.starts_with('.') || arg.starts_with('/') {
        return None;
    }
    let (id, path) = arg.split_once(':')?;
    Some((SessionId(id.to_owned()), path))
}

async fn cp(
    client: &SessionsClient,
    src: &str,
    dst: &str,
    mode: &str,
    max_bytes: usize,
    out: Output,
) -> CliResult<Exit> {
    match (remote(src), remote(dst)) {
        (None, Some((id, path))) => {
            let mode = u32::from_str_radix(mode, 8)
                .map_err(|_| CliError::Usage(format!("--mode {mode:?} is not octal")))?;
            let bytes = if src == "-" {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                    .map_err(|e| CliError::Usage(format!("stdin: {e}")))?;
                buf
            } else {
                std::fs::read(src).map_err(|e| CliError::Usage(format!("{src}: {e}")))?
            };
            client
                .write_file(&id, path, &bytes, mode)
                .await
                .map_err(failed)?;
            out.emit(
                format!("copied {} bytes to {id}:{path}", bytes.len()),
                &json!({"session": id, "path": path, "bytes": bytes.len()}),
            );
            Ok(Exit::Ok)
        }
        (Some((id, path)), None) => {
            let file = client
                .read_file(&id, path, max_bytes)
                .await
                .map_err(failed)?;
            if dst == "-" {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(&file.bytes).and_then(|()| o.flush());
            } else {
                std::fs::write(PathBuf::from(dst), &file.bytes)
                    .map_err(|e| CliError::Failed(format!("{dst}: {e}")))?;
                out.emit(
                    format!("copied {} bytes from {id}:{path}", file.bytes.len()),
                    &json!({"session": id, "path": path, "bytes": file.bytes.len(), "truncated": file.truncated}),
                );
            }
            if file.truncated {
                crate::output::diag(format_args!(
                    "sandfleet: {id}:{path} is longer than --max-bytes {max_bytes}; copied the first {max_bytes} bytes"
                ));
                return Ok(Exit::Partial);
            }
            Ok(Exit::Ok)
        }
        _ => Err(CliError::Usage(
            "exactly one of SRC and DST must be ID:PATH (write a local path with a colon as ./a:b)"
                .into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths_are_id_colon_path() {
        let (id, p) = remote("ss-1:dir/a.txt").unwrap_or((SessionId(String::new()), ""));
        assert_eq!((id.0.as_str(), p), ("ss-1", "dir/a.txt"));
        assert!(remote("./a:b").is_none());
        assert!(remote("plain.txt").is_none());
    }
}
