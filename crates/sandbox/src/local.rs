//! The local executor: the generated script as a child process in a fresh
//! temp directory. The embedded default for trying sandfleet out and for fast
//! tests; it is *not* an isolation boundary unless bubblewrap is enabled (and
//! even then only a light one: read-only host, private /tmp, own IPC/UTS).
//!
//! Layout of a run's temp dir: `workspace/` (the step's cwd and `$HOME`),
//! `state/` (captured step output, the summary, pid files) and `output.log`
//! (the script's stdout+stderr, bounded by construction: steps write to
//! their own files and the script prints only their bounded tails).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use rustix::process::{Pid, Signal, kill_process, kill_process_group};
use sandfleet_proto::{Outcome, Task, TaskId};
use sandfleet_settings::LocalSettings;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::classify::{self, LocalEnd};
use crate::executor::{ExecError, Execution, Executor, RunContext};
use crate::report;
use crate::script::{self, ENV_STATE_DIR, ENV_TERMINATION_LOG, ENV_WORKSPACE, ScriptOptions};

/// `PATH` of the script: fixed, so a worker's own PATH (version-manager shims
/// and the like) does not leak into sandboxes.
pub const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a stopped script gets to kill its step and write its summary
/// before its whole process group is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

type RunKey = (TaskId, u32);

/// Runs tasks as local child processes.
#[derive(Debug, Clone)]
pub struct LocalExecutor {
    settings: LocalSettings,
    bwrap: Option<PathBuf>,
    running: Arc<Mutex<HashMap<RunKey, CancellationToken>>>,
}

impl LocalExecutor {
    /// A local executor. With `settings.bubblewrap`, `bwrap` must be on the
    /// worker's PATH, else this fails (silently running unisolated would
    /// surprise whoever turned it on).
    pub fn new(settings: LocalSettings) -> Result<LocalExecutor, ExecError> {
        let bwrap = if settings.bubblewrap {
            let found = find_in_path("bwrap").ok_or_else(|| {
                ExecError::Config(
                    "sandbox.local.bubblewrap is on but `bwrap` is not installed".into(),
                )
            })?;
            Some(found)
        } else {
            None
        };
        if !Path::new(&settings.shell).is_file() {
            return Err(ExecError::Config(format!(
                "sandbox.local.shell {:?} does not exist",
                settings.shell
            )));
        }
        Ok(LocalExecutor {
            settings,
            bwrap,
            running: Arc::default(),
        })
    }

    /// True when runs are wrapped in bubblewrap.
    pub fn isolated(&self) -> bool {
        self.bwrap.is_some()
    }

    fn command(&self, dir: &Path, workspace: &Path, script: &str) -> Command {
        let mut cmd = match &self.bwrap {
            Some(bwrap) => {
                let mut c = Command::new(bwrap);
                c.args([
                    "--ro-bind",
                    "/",
                    "/",
                    "--dev",
                    "/dev",
                    "--proc",
                    "/proc",
                    "--tmpfs",
                    "/tmp",
                ])
                .arg("--bind")
                .arg(dir)
                .arg(dir)
                .args([
                    "--unshare-user-try",
                    "--unshare-ipc",
                    "--unshare-uts",
                    "--unshare-cgroup-try",
                ])
                .arg("--chdir")
                .arg(workspace)
                .arg("--")
                .arg(&self.settings.shell);
                c
            }
            None => Command::new(&self.settings.shell),
        };
        cmd.arg("-c").arg(script).current_dir(workspace);
        cmd
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(std::env::split_paths(SANDBOX_PATH))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Kills what a run may have left behind when it is dropped or finished:
/// the running step's process group (steps run in sessions of their own)
/// and the script's process group.
struct ProcessGuard {
    pgid: Option<Pid>,
    state: PathBuf,
    key: RunKey,
    running: Arc<Mutex<HashMap<RunKey, CancellationToken>>>,
}

impl ProcessGuard {
    fn kill_all(&self) {
        if let Some(step) = read_pid(&self.state.join("step.pid")) {
            let _ = kill_process_group(step, Signal::KILL);
        }
        if let Some(pgid) = self.pgid {
            let _ = kill_process_group(pgid, Signal::KILL);
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill_all();
        if let Ok(mut r) = self.running.lock() {
            r.remove(&self.key);
        }
    }
}

fn read_pid(path: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(path).ok()?;
    Pid::from_raw(text.trim().parse().ok()?)
}

/// Reads at most `limit` bytes of `path`; the flag says more was there.
fn read_bounded(path: &Path, limit: u64) -> (Vec<u8>, bool) {
    use std::io::Read;
    let Ok(file) = std::fs::File::open(path) else {
        return (Vec::new(), false);
    };
    let mut buf = Vec::new();
    let _ = file.take(limit + 1).read_to_end(&mut buf);
    let cut = buf.len() as u64 > limit;
    buf.truncate(limit as usize);
    (buf, cut)
}

#[async_trait]
impl Executor for LocalExecutor {
    async fn run(
        &self,
        task: &Task,
        attempt: u32,
        _ctx: &RunContext,
    ) -> Result<Execution, ExecError> {
        let budget = self.settings.max_output_bytes as u64;
        let script = script::generate(task, attempt, &ScriptOptions::for_budget(task, budget))?;
        let key = (task.id, attempt);

        let mut builder = tempfile::Builder::new();
        let prefix = format!("sandfleet-{}-a{attempt}-", task.id.simple());
        builder.prefix(&prefix);
        let dir = match &self.settings.work_dir {
            Some(base) => {
                std::fs::create_dir_all(base)?;
                builder.tempdir_in(base)?
            }
            None => builder.tempdir()?,
        };
        let workspace = dir.path().join("workspace");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&workspace)?;
        std::fs::create_dir_all(&state)?;
        let token = CancellationToken::new();
        {
            let mut running = self
                .running
                .lock()
                .map_err(|_| ExecError::Config("poisoned lock".into()))?;
            if running.contains_key(&key) {
                return Err(ExecError::Conflict {
                    name: format!("local run of attempt {attempt}"),
                    other: task.id.to_string(),
                });
            }
            running.insert(key, token.clone());
        }
        // Declared after `dir`, so it is dropped first: it reads `state/step.pid`.
        let mut guard = ProcessGuard {
            pgid: None,
            state: state.clone(),
            key,
            running: self.running.clone(),
        };
        let summary_path = state.join("summary");
        let output_path = dir.path().join("output.log");
        let output = std::fs::File::create(&output_path)?;

        let mut cmd = self.command(dir.path(), &workspace, &script.text);
        cmd.env_clear()
            .env("PATH", SANDBOX_PATH)
            .env("HOME", &workspace)
            .envs(script.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(ENV_WORKSPACE, &workspace)
            .env(ENV_STATE_DIR, &state)
            .env(ENV_TERMINATION_LOG, &summary_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(output.try_clone()?))
            .stderr(Stdio::from(output))
            .process_group(0)
            .kill_on_drop(true);

        let started_at = Utc::now();
        let mut child = cmd.spawn()?;
        guard.pgid = child.id().and_then(|id| Pid::from_raw(id as i32));
        tracing::debug!(task = %task.id, attempt, dir = %dir.path().display(), "local sandbox started");

        let deadline = Duration::from_secs(task.sandbox.deadline_secs);
        // `child.wait()` is cancel-safe: losing the race only drops the future.
        let end = tokio::select! {
            status = child.wait() => Some(status?),
            () = tokio::time::sleep(deadline) => None,
            () = token.cancelled() => None,
        };
        let end = match end {
            Some(status) => exit_of(status),
            None => {
                // Ask the script to stop its step and write its summary, then make sure.
                let script_pid = read_pid(&state.join("script.pid")).or(guard.pgid);
                if let Some(pid) = script_pid {
                    let _ = kill_process(pid, Signal::TERM);
                }
                let _ = tokio::time::timeout(STOP_GRACE, child.wait()).await;
                guard.kill_all();
                let _ = child.wait().await;
                if token.is_cancelled() {
                    LocalEnd::Signalled(15)
                } else {
                    LocalEnd::DeadlineExceeded
                }
            }
        };
        guard.kill_all();
        let cancelled = token.is_cancelled();
        drop(guard);

        let finished_at = Utc::now();
        let (summary_text, _) = read_bounded(&summary_path, 8 * 1024);
        let summary = script::parse_summary(&String::from_utf8_lossy(&summary_text));
        // The script bounds its own output; the slack covers marker lines.
        let (log, log_cut) = read_bounded(&output_path, budget + 16 * 1024);
        let parsed = script::parse_log(&log);
        let report = report::assemble(task, &summary, &parsed, log_cut);
        let verdict = if cancelled {
            classify::Verdict {
                outcome: Outcome::Cancelled,
                exit_code: None,
                error: Some("the attempt was cancelled".into()),
            }
        } else {
            classify::local(task, &summary, end)
        };
        Ok(Execution {
            outcome: verdict.outcome,
            exit_code: verdict.exit_code,
            steps: report.steps,
            log_tail: report.log_tail,
            log_truncated: report.log_truncated,
            artifacts: report.artifacts,
            started_at: Some(started_at),
            finished_at,
            sandbox: dir.path().display().to_string(),
            error: verdict.error,
            adopted: false,
        })
        // `dir` drops here: the workspace is removed.
    }

    async fn cancel(&self, task_id: TaskId, attempt: u32) -> Result<(), ExecError> {
        if let Ok(running) = self.running.lock()
            && let Some(token) = running.get(&(task_id, attempt))
        {
            token.cancel();
        }
        Ok(())
    }
}

fn exit_of(status: std::process::ExitStatus) -> LocalEnd {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => LocalEnd::Exited(code),
        (None, Some(sig)) => LocalEnd::Signalled(sig),
        (None, None) => LocalEnd::Exited(-1),
    }
}
