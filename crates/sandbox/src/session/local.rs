//! The local session backend: each session is a temp dir (`workspace/`,
//! `state/`) on this host, and each operation a child process running the
//! session wrapper ([`super::script`]) in it. For trying sessions out and for
//! fast tests of the wrappers; *not* an isolation boundary (the image is
//! ignored). Idle timeout and max lifetime are enforced by a guard task per
//! session; teardown kills what still runs (TERM, which the run wrapper
//! passes on to the command's tree, then KILL) and removes the dir.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rustix::process::{Pid, Signal, kill_process_group};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::script::{self, Bounded};
use super::{
    CommandOutput, FileContents, OutputChunk, RunOptions, SessionBackend, SessionError, SessionId,
    SessionSpec, check_mode, check_relative,
};
use crate::local::SANDBOX_PATH;

/// How long a torn-down command gets between TERM and KILL.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Slack past a command's timeout before the backend stops waiting for the
/// wrapper's own watchdog and kills it from here.
const WATCHDOG_SLACK: Duration = Duration::from_secs(10);

struct LocalSession {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    working_dir: String,
    /// Cancelled at teardown: running operations kill their processes.
    ended: CancellationToken,
    /// Operations running; teardown waits for it to reach zero.
    busy: tokio::sync::watch::Sender<usize>,
    last_activity: Mutex<Instant>,
}

impl LocalSession {
    fn workspace(&self) -> PathBuf {
        self.dir.path().join("workspace")
    }
    fn touch(&self) {
        if let Ok(mut t) = self.last_activity.lock() {
            *t = Instant::now();
        }
    }
}

/// Runs sessions as local child processes. Cheap to clone.
#[derive(Clone, Default)]
pub struct LocalSessions {
    sessions: Arc<Mutex<HashMap<SessionId, Arc<LocalSession>>>>,
    base: Option<PathBuf>,
}

impl std::fmt::Debug for LocalSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSessions")
            .field("sessions", &self.count())
            .finish()
    }
}

/// Marks a session busy while an operation runs (the idle guard waits).
struct Busy(Arc<LocalSession>);

impl Busy {
    fn new(s: Arc<LocalSession>) -> Busy {
        s.busy.send_modify(|n| *n += 1);
        s.touch();
        Busy(s)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl LocalSessions {
    /// Sessions in the system temp dir.
    pub fn new() -> LocalSessions {
        LocalSessions::default()
    }

    /// Sessions under `base`.
    pub fn in_dir(base: impl Into<PathBuf>) -> LocalSessions {
        LocalSessions {
            base: Some(base.into()),
            ..LocalSessions::default()
        }
    }

    /// How many sessions are alive.
    pub fn count(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    fn get(&self, id: &SessionId) -> Result<Arc<LocalSession>, SessionError> {
        self.sessions
            .lock()
            .ok()
            .and_then(|s| s.get(id).cloned())
            .ok_or_else(|| SessionError::NotFound(id.clone()))
    }

    fn command(&self, s: &LocalSession, argv: &[String]) -> Command {
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", SANDBOX_PATH)
            .env("HOME", s.workspace())
            .env("SANDFLEET_STATE_DIR", s.dir.path().join("state"))
            .envs(s.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(s.workspace())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        cmd
    }

    /// Runs one wrapper to its end, feeding `stdin` and collecting bounded output.
    #[allow(clippy::too_many_arguments)]
    async fn exec(
        &self,
        id: &SessionId,
        s: &Arc<LocalSession>,
        argv: &[String],
        stdin: Option<&[u8]>,
        limit: usize,
        deadline: Option<Duration>,
        sink: Option<mpsc::Sender<OutputChunk>>,
    ) -> Result<(i32, Bounded, Bounded), SessionError> {
        let _busy = Busy::new(s.clone());
        let mut cmd = self.command(s, argv);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = cmd.spawn()?;
        let pgid = child.id().and_then(|p| Pid::from_raw(p as i32));
        if let (Some(bytes), Some(mut w)) = (stdin, child.stdin.take()) {
            w.write_all(bytes).await?;
            w.shutdown().await?;
        }
        let out = child.stdout.take();
        let err = child.stderr.take();
        let pump_out = pump(out, limit, sink.clone(), OutputChunk::Stdout);
        // Stderr keeps at least 64 KiB: it carries the wrappers' error messages.
        let pump_err = pump(err, limit.max(64 * 1024), sink, OutputChunk::Stderr);
        let hard_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep(d + WATCHDOG_SLACK).await,
                None => std::future::pending().await,
            }
        };
        let waited = async {
            let (o, e) = tokio::join!(pump_out, pump_err);
            (child.wait().await, o, e)
        };
        tokio::pin!(waited);
        // Not cancel-safe on purpose: losing the race kills the process group below.
        let ended = tokio::select! {
            r = &mut waited => Some(r),
            () = s.ended.cancelled() => None,
            () = hard_deadline => {
                if let Some(p) = pgid { let _ = kill_process_group(p, Signal::KILL); }
                let (_, o, e) = waited.await;
                return Ok((script::TIMEOUT_EXIT, o, e));
            }
        };
        match ended {
            Some((status, o, e)) => Ok((exit_code(status?), o, e)),
            None => {
                if let Some(p) = pgid {
                    let _ = kill_process_group(p, Signal::TERM);
                    if tokio::time::timeout(KILL_GRACE, &mut waited).await.is_err() {
                        let _ = kill_process_group(p, Signal::KILL);
                    }
                }
                Err(SessionError::NotFound(id.clone()))
            }
        }
    }

    /// Ends sessions idle or past their lifetime.
    fn guard(&self, id: SessionId, s: Arc<LocalSession>, idle: Duration, lifetime: Duration) {
        let this = self.clone();
        let end_of_life = Instant::now() + lifetime;
        tokio::spawn(async move {
            loop {
                let last = s
                    .last_activity
                    .lock()
                    .map(|t| *t)
                    .unwrap_or_else(|_| Instant::now());
                let wake = (last + idle).min(end_of_life);
                tokio::select! {
                    () = s.ended.cancelled() => return,
                    () = tokio::time::sleep_until(wake) => {}
                }
                let now = Instant::now();
                let idle_for = now
                    .saturating_duration_since(s.last_activity.lock().map(|t| *t).unwrap_or(now));
                let reason = if now >= end_of_life {
                    "max lifetime"
                } else if *s.busy.borrow() == 0 && idle_for >= idle {
                    "idle timeout"
                } else {
                    continue;
                };
                tracing::info!(session = %id, reason, "local session ended by itself");
                let _ = this.teardown(&id).await;
                return;
            }
        });
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

async fn pump(
    reader: Option<impl AsyncRead + Unpin>,
    limit: usize,
    sink: Option<mpsc::Sender<OutputChunk>>,
    wrap: fn(Bytes) -> OutputChunk,
) -> Bounded {
    let mut kept = Bounded::new(limit);
    let Some(mut reader) = reader else {
        return kept;
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.push(&buf[..n]);
                if let Some(tx) = &sink {
                    // A listener that went away does not stop the command.
                    let _ = tx.send(wrap(Bytes::copy_from_slice(&buf[..n]))).await;
                }
            }
        }
    }
}

fn file_error(path: &str, code: i32, stderr: &Bounded) -> SessionError {
    let text = String::from_utf8_lossy(&stderr.bytes).trim().to_owned();
    SessionError::File {
        path: path.to_owned(),
        message: if text.is_empty() {
            format!("failed with exit code {code}")
        } else {
            text
        },
    }
}

#[async_trait]
impl SessionBackend for LocalSessions {
    async fn start(&self, spec: &SessionSpec) -> Result<SessionId, SessionError> {
        spec.validate()?;
        let mut builder = tempfile::Builder::new();
        builder.prefix("sandfleet-session-");
        let dir = match &self.base {
            Some(base) => {
                std::fs::create_dir_all(base)?;
                builder.tempdir_in(base)?
            }
            None => builder.tempdir()?,
        };
        std::fs::create_dir_all(dir.path().join("workspace"))?;
        std::fs::create_dir_all(dir.path().join("state"))?;
        let id = SessionId(format!("local-{}", uuid::Uuid::now_v7().simple()));
        let session = Arc::new(LocalSession {
            dir,
            env: spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            working_dir: spec.working_dir.clone(),
            ended: CancellationToken::new(),
            busy: tokio::sync::watch::Sender::new(0),
            last_activity: Mutex::new(Instant::now()),
        });
        let (code, _, err) = self
            .exec(
                &id,
                &session,
                &script::prepare_argv(&spec.working_dir),
                None,
                4096,
                None,
                None,
            )
            .await?;
        if code != 0 {
            return Err(SessionError::Start(
                String::from_utf8_lossy(&err.bytes).trim().to_owned(),
            ));
        }
        self.sessions
            .lock()
            .map_err(|_| SessionError::Start("poisoned session table".into()))?
            .insert(id.clone(), session.clone());
        self.guard(id.clone(), session, spec.idle_timeout, spec.max_lifetime);
        tracing::debug!(session = %id, "local session started");
        Ok(id)
    }

    async fn run(
        &self,
        id: &SessionId,
        command: &str,
        opts: RunOptions,
        sink: Option<mpsc::Sender<OutputChunk>>,
    ) -> Result<CommandOutput, SessionError> {
        let s = self.get(id)?;
        let argv = script::run_argv(&s.working_dir, command, opts.timeout);
        let started = Instant::now();
        let (code, out, err) = self
            .exec(
                id,
                &s,
                &argv,
                None,
                opts.max_output_bytes,
                Some(opts.timeout),
                sink,
            )
            .await?;
        let duration = started.elapsed();
        Ok(CommandOutput {
            exit_code: code,
            timed_out: script::timed_out(code, duration, opts.timeout),
            stdout: out.bytes,
            stderr: err.bytes,
            stdout_truncated: out.truncated,
            stderr_truncated: err.truncated,
            duration,
        })
    }

    async fn write_file(
        &self,
        id: &SessionId,
        path: &str,
        bytes: &[u8],
        mode: u32,
    ) -> Result<(), SessionError> {
        check_relative(path).map_err(SessionError::InvalidSpec)?;
        let mode = check_mode(mode)?;
        let s = self.get(id)?;
        let argv = script::write_argv(&s.working_dir, path, &mode, bytes.len());
        let (code, _, err) = self
            .exec(id, &s, &argv, Some(bytes), 4096, None, None)
            .await?;
        if code != 0 {
            return Err(file_error(path, code, &err));
        }
        Ok(())
    }

    async fn read_file(
        &self,
        id: &SessionId,
        path: &str,
        max_bytes: usize,
    ) -> Result<FileContents, SessionError> {
        check_relative(path).map_err(SessionError::InvalidSpec)?;
        let s = self.get(id)?;
        let argv = script::read_argv(&s.working_dir, path, max_bytes.saturating_add(1));
        let (code, out, err) = self
            .exec(id, &s, &argv, None, max_bytes, None, None)
            .await?;
        if code != 0 {
            return Err(file_error(path, code, &err));
        }
        Ok(FileContents {
            bytes: out.bytes,
            truncated: out.truncated,
        })
    }

    async fn teardown(&self, id: &SessionId) -> Result<(), SessionError> {
        let removed = self.sessions.lock().ok().and_then(|mut s| s.remove(id));
        let Some(s) = removed else {
            return Ok(());
        };
        s.ended.cancel();
        // Running operations kill their processes and return; then the dir goes.
        let mut busy = s.busy.subscribe();
        let _ = tokio::time::timeout(KILL_GRACE * 2, busy.wait_for(|n| *n == 0)).await;
        // Other holders of the Arc (the guard task) may drop it later: remove now.
        let _ = tokio::fs::remove_dir_all(s.dir.path()).await;
        tracing::debug!(session = %id, "local session torn down");
        Ok(())
    }
}

/// The workspace of a local session (for tests and the demo).
pub fn workspace_of(sessions: &LocalSessions, id: &SessionId) -> Option<PathBuf> {
    sessions.get(id).ok().map(|s| s.workspace())
}
