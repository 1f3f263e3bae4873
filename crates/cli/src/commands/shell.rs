//! `sandfleet shell --image IMAGE`: an interactive session. Each line typed
//! runs as one command (`/bin/sh -c`), its output streamed back; the session
//! is torn down on `exit`, end of input or Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use sandfleet_sandbox::session::{LocalSessions, Session, SessionBackend};
use tokio::io::AsyncBufReadExt as _;
use tokio_util::sync::CancellationToken;

use crate::commands::session::{ServiceArgs, SpecArgs, run_streamed};
use crate::exit::{CliError, CliResult, Exit};
use crate::output::diag;

/// `sandfleet shell`.
#[derive(Debug, Clone, Args)]
pub struct ShellArgs {
    /// The sandbox.
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Run the session as local child processes (no service, no isolation;
    /// the image is ignored) instead of through the sessions service.
    #[arg(long)]
    pub local: bool,
    /// The service (unless --local).
    #[arg(
        long = "url",
        value_name = "URL",
        env = "SANDFLEET_SESSIONS_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub url: String,
    /// Bearer token (unless --local).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "SANDFLEET_SESSIONS_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Seconds before each command is killed.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// Runs the shell until `exit`, EOF or `shutdown` (Ctrl-C).
pub async fn run(a: &ShellArgs, shutdown: CancellationToken) -> CliResult<Exit> {
    let spec = a.spec.spec()?;
    let backend: Arc<dyn SessionBackend> = if a.local {
        Arc::new(LocalSessions::new())
    } else {
        let token = a.token.clone().ok_or_else(|| {
            CliError::Usage(
                "--token (or SANDFLEET_SESSIONS_TOKEN) is required without --local".into(),
            )
        })?;
        Arc::new(
            ServiceArgs {
                url: a.url.clone(),
                token,
            }
            .client(),
        )
    };
    let mut session = tokio::select! {
        s = Session::start(backend.clone(), &spec) => s.map_err(|e| CliError::Failed(e.to_string()))?,
        () = shutdown.cancelled() => return Ok(Exit::Interrupted),
    };
    diag(format_args!(
        "sandfleet: session {} ready; one command per line, `exit` or Ctrl-D to end",
        session.id()
    ));
    let timeout = Duration::from_secs(a.timeout);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut last = 0;
    loop {
        // `next_line` is cancel-safe: a Ctrl-C loses no typed input that matters.
        let line = tokio::select! {
            l = lines.next_line() => l.map_err(|e| CliError::Failed(format!("stdin: {e}")))?,
            () = shutdown.cancelled() => break,
        };
        let Some(line) = line else { break };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "exit" {
            break;
        }
        let run = run_streamed(backend.as_ref(), session.id(), line, timeout);
        let result = tokio::select! {
            r = run => r,
            () = shutdown.cancelled() => break,
        };
        match result {
            Ok(o) if o.timed_out => {
                diag(format_args!("[killed after {}s]", timeout.as_secs()));
                last = 124;
            }
            Ok(o) => {
                if o.exit_code != 0 {
                    diag(format_args!("[exit {}]", o.exit_code));
                }
                last = o.exit_code;
            }
            Err(e) if e.is_connection_lost() => {
                diag(format_args!("sandfleet: {e}"));
                last = 255;
            }
            Err(e) => {
                diag(format_args!("sandfleet: {e}"));
                break;
            }
        }
    }
    session
        .teardown()
        .await
        .map_err(|e| CliError::Failed(format!("teardown: {e}")))?;
    diag(format_args!(
        "sandfleet: session {} torn down",
        session.id()
    ));
    Ok(if last == 0 { Exit::Ok } else { Exit::Failure })
}
