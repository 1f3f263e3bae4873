//! The local executor: the generated script as a child process in a fresh
//! temp directory. The embedded default for trying sandfleet out and for fast
//! tests; it is *not* an isolation boundary unless bubblewrap is enabled (and
//! even then only a light one: read-only host, private /tmp, own IPC/UTS).
//!
//! Layout of a run's directory (`<base>/sf-<task>-a<attempt>-<random>/`,
//! see [`crate::rundir`]): `workspace/` (the step's cwd and `$HOME`) and,
//! beside it, the script's own files (captured step output, the summary,
//! pid files): one directory fewer to create and remove per run. The script's
//! stdout (bounded by construction: steps write to their own files and the
//! script prints only their bounded tails) is a pipe the executor reads as
//! it comes: its step markers drive the per-step watchdog, which runs in
//! the executor rather than in the script ([`watchdog`]).
//!
//! ## A sandbox dies with its worker
//!
//! The script runs in a process group of its own, and its steps in that
//! group too ([`ScriptOptions::executor_watchdog`]), so nothing the kernel
//! does on the worker's death reaches them, and `kill_on_drop` only runs on a
//! clean drop. So each executor starts one parent watcher ([`watcher`]): a
//! small `sh` reading a pipe whose write end only the worker holds
//! (close-on-exec, so no other child inherits it), told the name of each run
//! before its script starts. When the worker dies — SIGKILL, a panic, a
//! forced exit — the kernel closes the pipe, and the watcher reads end of
//! file, kills the process group of every run that is still there and
//! removes their run directories. A pipe works with every shell and needs no
//! `unsafe` `pre_exec`; the usual alternative, `PR_SET_PDEATHSIG`
//! (bubblewrap's `--die-with-parent`), fires when the *thread* that spawned
//! the child exits, which in a tokio runtime is not the worker's death, and
//! reaches only one process, not the sandbox's group. What the watcher cannot
//! reach is a step that leaves the group on purpose (a daemon that calls
//! `setsid`): the Kubernetes executor is the containment boundary, the local
//! one a convenience.
//!
//! Runs whose watcher could not clean up (the whole process tree killed at
//! once, a reboot) are removed by the next executor that starts on the same
//! base directory: each run's lock file is held (`flock`) by its worker, and
//! a free lock means the owner is gone ([`crate::rundir::sweep`]).
//!
//! ## Bounds on what a step writes
//!
//! `max_file_bytes` caps every file a step writes, its captured output
//! included (`ulimit -f`, inherited by everything the step starts): a step
//! that writes forever is stopped at the cap, the step is recorded as
//! `limit` and the task fails with a reason naming the setting.
//! `max_workspace_bytes` caps the disk space of the whole run (many files):
//! the executor measures it every second and stops the run when it passes.

mod watchdog;
mod watcher;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
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
use tokio_util::task::AbortOnDropHandle;

use crate::classify::{self, LocalEnd};
use crate::executor::{Clearance, ExecError, Execution, Executor, RunContext};
use crate::report;
use crate::rundir::{self, RunDir};
use crate::script::{self, ENV_STATE_DIR, ENV_TERMINATION_LOG, ENV_WORKSPACE, ScriptOptions};
use watcher::ParentWatcher;

/// `PATH` of the script: fixed, so a worker's own PATH (version-manager shims
/// and the like) does not leak into sandboxes.
pub const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a stopped script gets to kill its step and write its summary
/// before its whole process group is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// How often a run's disk usage is measured against `max_workspace_bytes`.
const DISK_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Longest wait for the dying sandbox of a dead worker's run of the same
/// task (its watcher kills it at once, or within a few seconds for a run
/// whose group was not recorded yet).
const ORPHAN_WAIT: Duration = Duration::from_secs(15);

type RunKey = (TaskId, u32);

/// Runs tasks as local child processes.
#[derive(Debug, Clone)]
pub struct LocalExecutor {
    settings: LocalSettings,
    base: PathBuf,
    bwrap: Option<PathBuf>,
    /// Block size of the shell's `ulimit -f`, measured once (else each
    /// script would measure it with a subshell).
    file_block_bytes: Option<u64>,
    /// The shell is `/bin/sh` itself, so steps may run in the script's
    /// subshells ([`ScriptOptions::steps_in_script_shell`]).
    shell_is_bin_sh: bool,
    /// Kills this executor's sandboxes when its process dies.
    watcher: Arc<ParentWatcher>,
    running: Arc<Mutex<HashMap<RunKey, CancellationToken>>>,
}

impl LocalExecutor {
    /// A local executor. With `settings.bubblewrap`, `bwrap` must be on the
    /// worker's PATH, else this fails (silently running unisolated would
    /// surprise whoever turned it on).
    ///
    /// Runs live under `settings.work_dir` (default `$TMPDIR/sandfleet-<uid>`);
    /// runs left there by executors that are gone are removed first.
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
        let base = settings
            .work_dir
            .as_ref()
            .map_or_else(rundir::default_base, PathBuf::from);
        rundir::ensure_base(&base).map_err(|e| {
            ExecError::Config(format!("sandbox.local.work_dir {}: {e}", base.display()))
        })?;
        match rundir::sweep(&base) {
            Ok(swept) if swept.removed > 0 => tracing::info!(
                removed = swept.removed,
                live = swept.live,
                dir = %base.display(),
                "removed local sandboxes left by workers that are gone"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(dir = %base.display(), error = %e, "could not sweep old local sandboxes")
            }
        }
        let file_block_bytes = measure_block_bytes(Path::new(&settings.shell), &base);
        let watcher = ParentWatcher::start(Path::new(&settings.shell), &base).map_err(|e| {
            ExecError::Config(format!(
                "starting the local executor's parent watcher in {}: {e}",
                settings.shell
            ))
        })?;
        let shell_is_bin_sh = same_file(Path::new(&settings.shell), Path::new("/bin/sh"));
        Ok(LocalExecutor {
            settings,
            base,
            bwrap,
            file_block_bytes,
            shell_is_bin_sh,
            watcher: Arc::new(watcher),
            running: Arc::default(),
        })
    }

    /// The directory runs are created in.
    pub fn base_dir(&self) -> &Path {
        &self.base
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

/// The block size of `ulimit -f` in `shell` ([`script::ULIMIT_PROBE`]);
/// `None` when the probe cannot run (the scripts then measure it themselves).
fn measure_block_bytes(shell: &Path, base: &Path) -> Option<u64> {
    let probe = base.join(format!(".ulimit-probe-{}", std::process::id()));
    let ran = std::process::Command::new(shell)
        .arg("-c")
        .arg(script::ULIMIT_PROBE)
        .arg("sh")
        .arg(&probe)
        .env_clear()
        .env("PATH", SANDBOX_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let len = std::fs::metadata(&probe).map(|m| m.len());
    let _ = std::fs::remove_file(&probe);
    match (ran, len) {
        (Ok(status), Ok(len)) if status.success() => Some(script::ulimit_block_bytes(len)),
        _ => None,
    }
}

/// True when both paths name one existing file (links followed).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
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
/// the sandbox's process group, which holds the script, its steps and what
/// they left running.
struct ProcessGuard {
    pgid: Option<Pid>,
    key: RunKey,
    running: Arc<Mutex<HashMap<RunKey, CancellationToken>>>,
}

impl ProcessGuard {
    fn kill_all(&self) {
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

use watchdog::read_pid;

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

/// A local sandbox started and held before the task's first file
/// ([`ScriptOptions::start_on_stdin`]): its script readies the run
/// directory, then waits for the line [`LocalExecutor::start`] writes.
/// Dropped, it kills the sandbox's process group, then removes the run
/// directory: fields drop in their order here.
struct Held {
    guard: ProcessGuard,
    child: tokio::process::Child,
    reader: AbortOnDropHandle<watchdog::Log>,
    stop_reading: CancellationToken,
    /// The script's stdin: a line lets it start, end of file ends it.
    go: std::io::PipeWriter,
    token: CancellationToken,
    /// The run directory, which holds the script's own files too.
    dir: DropOffThread,
}

impl LocalExecutor {
    /// Starts the sandbox of attempt `attempt` of `task` and holds it before
    /// anything of the task: the run directory, the script with its
    /// environment, the reader of its output.
    async fn prepare(&self, task: &Task, attempt: u32) -> Result<Held, ExecError> {
        let budget = self.settings.max_output_bytes as u64;
        let opts = self.script_options(task);
        let script = script::generate(task, attempt, &opts)?;
        let key = (task.id, attempt);
        let task_hex = task.id.simple().to_string();
        // A redelivery after a worker's death may arrive while that worker's
        // sandbox is still being stopped by its watcher: wait for it, so the
        // two never run at once (workers sharing this work dir).
        let dir = create_run_dir(&self.base, &task_hex, attempt, &self.watcher).await?;
        let dir = DropOffThread(Some(dir), self.watcher.clone());
        let workspace = dir.path().join("workspace");
        // The script's own files live beside the workspace, out of the steps' way.
        let state = dir.path().to_owned();
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
        // Dropped before `dir` on an early return: the sandbox is killed
        // before its directory is removed.
        let mut guard = ProcessGuard {
            pgid: None,
            key,
            running: self.running.clone(),
        };
        // The script's stdout and stderr: one pipe, read as it comes; its
        // stdin: the line that lets it start.
        let (out_read, out_write) = std::io::pipe()?;
        let (go_read, go) = std::io::pipe()?;

        let mut cmd = self.command(dir.path(), &workspace, &script.text);
        cmd.env_clear()
            .env("PATH", SANDBOX_PATH)
            .env("HOME", &workspace)
            .envs(script.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(ENV_WORKSPACE, &workspace)
            .env(ENV_STATE_DIR, &state)
            .env(ENV_TERMINATION_LOG, state.join("summary"))
            .stdin(Stdio::from(go_read))
            .stdout(Stdio::from(out_write.try_clone()?))
            .stderr(Stdio::from(out_write))
            .process_group(0)
            .kill_on_drop(true);

        let child = cmd.spawn()?;
        // Our copies of the pipes' child ends go with the command, so the
        // read end sees end of file once the script's processes are done.
        drop(cmd);
        guard.pgid = child.id().and_then(|id| Pid::from_raw(id as i32));
        let out = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(out_read))?;
        let watchdog = opts.executor_watchdog.then(|| {
            watchdog::Watchdog::new(
                task.steps
                    .iter()
                    .map(|s| Duration::from_secs(s.timeout_secs))
                    .collect(),
                Duration::from_secs(opts.kill_grace_secs.max(1)),
            )
        });
        let stop_reading = CancellationToken::new();
        // The script bounds its own output; the slack covers marker lines.
        let log_cap = usize::try_from(budget + 16 * 1024).unwrap_or(usize::MAX);
        let reader = AbortOnDropHandle::new(tokio::spawn(watchdog::pump(
            out,
            log_cap,
            watchdog,
            state.clone(),
            guard.pgid,
            stop_reading.clone(),
        )));
        if let Some(pgid) = guard.pgid {
            // Tells a sweep or a redelivery whether this sandbox still lives
            // once this worker is gone.
            if let Some(d) = dir.0.as_ref() {
                d.set_group(pgid.as_raw_nonzero().get())?;
            }
        }
        tracing::debug!(task = %task.id, attempt, dir = %dir.path().display(), "local sandbox started, held");
        Ok(Held {
            guard,
            child,
            reader,
            stop_reading,
            go,
            token,
            dir,
        })
    }

    fn script_options(&self, task: &Task) -> ScriptOptions {
        ScriptOptions {
            max_file_bytes: Some(self.settings.max_file_bytes),
            file_block_bytes: self.file_block_bytes,
            executor_watchdog: true,
            steps_in_script_shell: self.shell_is_bin_sh,
            start_on_stdin: true,
            // Without bubblewrap the script leads its process group, which
            // the lock file records right after the start, before the
            // script may go: a worker killed in between leaves a script
            // held on a stdin whose end died with it, and it ends there.
            record_script_pid: self.bwrap.is_some(),
            ..ScriptOptions::for_budget(task, self.settings.max_output_bytes as u64)
        }
    }

    /// Lets a held sandbox start the task, and runs it to its end.
    async fn start(&self, held: Held, task: &Task) -> Result<Execution, ExecError> {
        use std::io::Write as _;
        let mut held = held;
        let summary_path = held.dir.path().join("summary");
        let started_at = Utc::now();
        // A fresh pipe takes the line without blocking. A script that is
        // gone already (its setup failed) makes this fail; its exit says why.
        let _ = held.go.write_all(b"go\n");

        let deadline = Duration::from_secs(task.sandbox.deadline_secs);
        let disk_limit = self.settings.max_workspace_bytes;
        // `child.wait()` is cancel-safe: losing the race only drops the future;
        // so is the disk watch (a measurement in flight finishes unobserved).
        let stop = tokio::select! {
            status = held.child.wait() => Stop::Exited(status?),
            () = tokio::time::sleep(deadline) => Stop::Deadline,
            () = held.token.cancelled() => Stop::Cancelled,
            used = disk_over(held.dir.path().to_owned(), disk_limit) => Stop::Disk(used),
        };
        let end = match stop {
            Stop::Exited(status) => exit_of(status),
            stop => {
                // Ask the script to stop its step and write its summary, then make sure.
                let script_pid = read_pid(&held.dir.path().join("script.pid")).or(held.guard.pgid);
                if let Some(pid) = script_pid {
                    let _ = kill_process(pid, Signal::TERM);
                }
                let _ = tokio::time::timeout(STOP_GRACE, held.child.wait()).await;
                held.guard.kill_all();
                let _ = held.child.wait().await;
                match stop {
                    Stop::Disk(used) => LocalEnd::DiskLimit {
                        used,
                        limit: disk_limit,
                    },
                    Stop::Cancelled => LocalEnd::Signalled(15),
                    _ => LocalEnd::DeadlineExceeded,
                }
            }
        };
        held.guard.kill_all();
        let cancelled = held.token.is_cancelled();
        // Everything the script printed is in the pipe by now.
        held.stop_reading.cancel();
        let log = (&mut held.reader).await.unwrap_or_default();

        let finished_at = Utc::now();
        // Read back and remove the run directory off the async threads; the
        // run directory is gone (and its lock let go) when this returns.
        let sandbox = held.dir.path_display();
        let run_dir = held.dir.0.take();
        // The sandbox is killed before its directory is removed.
        drop(held);
        let watcher = self.watcher.clone();
        let (summary_text, _) = tokio::task::spawn_blocking(move || {
            let summary = read_bounded(&summary_path, 8 * 1024);
            if let Some(d) = run_dir {
                let name = run_name(&d);
                drop(d);
                watcher.forget(&name);
            }
            summary
        })
        .await
        .map_err(std::io::Error::other)?;
        let summary = script::parse_summary(&String::from_utf8_lossy(&summary_text));
        let parsed = script::parse_log(&log.bytes);
        let report = report::assemble(task, &summary, &parsed, log.cut);
        let verdict = if cancelled {
            classify::Verdict {
                outcome: Outcome::Cancelled,
                exit_code: None,
                error: Some("the attempt was cancelled".into()),
            }
        } else {
            classify::local(task, &summary, end)
        };
        let hit_file_limit = summary
            .steps
            .iter()
            .any(|s| s.status == script::StepStatus::FileLimit);
        let error = match &verdict.error {
            Some(e) if hit_file_limit && !cancelled => Some(format!(
                "{e} of {} bytes (sandbox.local.max_file_bytes)",
                self.settings.max_file_bytes
            )),
            e => e.clone(),
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
            sandbox,
            error,
            adopted: false,
            admission_wait: None,
        })
    }
}

#[async_trait]
impl Executor for LocalExecutor {
    async fn run(
        &self,
        task: &Task,
        attempt: u32,
        _ctx: &RunContext,
    ) -> Result<Execution, ExecError> {
        let held = self.prepare(task, attempt).await?;
        self.start(held, task).await
    }

    /// Starts the sandbox while the clearance is pending (the worker's
    /// cancellation barrier is a broker round trip, the script's start
    /// about as long) and lets it go once the clearance comes; a refusal
    /// kills it before anything of the task ran.
    async fn run_when_cleared(
        &self,
        task: &Task,
        attempt: u32,
        clearance: Clearance<'_>,
    ) -> Option<Result<Execution, ExecError>> {
        let mut clearance = clearance;
        let mut prepare = std::pin::pin!(self.prepare(task, attempt));
        let mut held = None;
        // Not a join: a refusal must not wait for a slow preparation (a dead
        // worker's sandbox of the task still dying).
        let cleared = loop {
            tokio::select! {
                ctx = &mut clearance => break ctx,
                h = &mut prepare, if held.is_none() => held = Some(h),
            }
        };
        cleared?;
        let held = match held {
            Some(h) => h,
            None => prepare.await,
        };
        Some(match held {
            Ok(held) => self.start(held, task).await,
            Err(e) => Err(e),
        })
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

/// Creates the run directory of attempt `attempt` of the task (32 hex)
/// under `base` once no run of the task there is dying (worker gone, sandbox
/// processes still alive), waiting for that at most [`ORPHAN_WAIT`]. The
/// check and the creation are one trip to the blocking pool: file-system
/// work stays off the async threads (a slow disk must not stall the other
/// tasks of this worker), and each trip costs two thread switches.
/// The parent watcher is told about the run there too, before its script
/// can start.
async fn create_run_dir(
    base: &Path,
    task_hex: &str,
    attempt: u32,
    watcher: &Arc<ParentWatcher>,
) -> std::io::Result<RunDir> {
    let start = tokio::time::Instant::now();
    let mut wait = true;
    loop {
        let (b, t, w) = (base.to_owned(), task_hex.to_owned(), watcher.clone());
        let made =
            tokio::task::spawn_blocking(move || -> std::io::Result<Result<RunDir, usize>> {
                if wait {
                    let dying = rundir::dying_runs_of(&b, &t);
                    if dying > 0 {
                        return Ok(Err(dying));
                    }
                }
                let dir = RunDir::create(&b, &t, attempt)?;
                std::fs::DirBuilder::new().create(dir.path().join("workspace"))?;
                let name = run_name(&dir);
                if let Err(e) = w.watch(&name) {
                    w.forget(&name);
                    return Err(e);
                }
                Ok(Ok(dir))
            })
            .await
            .map_err(std::io::Error::other)??;
        match made {
            Ok(dir) => return Ok(dir),
            Err(dying) if start.elapsed() >= ORPHAN_WAIT => {
                tracing::warn!(
                    task = task_hex,
                    dying,
                    "a dead worker's sandbox of this task is still running; starting anyway"
                );
                wait = false;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The name of a run's directory under the base.
fn run_name(dir: &RunDir) -> String {
    dir.path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A run directory that is removed off the async threads when dropped on
/// an early return (a failed spawn); the normal end removes it explicitly.
/// The parent watcher forgets it once it is gone.
struct DropOffThread(Option<RunDir>, Arc<ParentWatcher>);

impl DropOffThread {
    fn path(&self) -> &Path {
        self.0.as_ref().map_or(Path::new(""), |d| d.path())
    }

    fn path_display(&self) -> String {
        self.path().display().to_string()
    }
}

impl Drop for DropOffThread {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let watcher = self.1.clone();
            let remove = move || {
                let name = run_name(&dir);
                drop(dir);
                watcher.forget(&name);
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn_blocking(remove);
                }
                Err(_) => remove(),
            }
        }
    }
}

/// Why the wait for the script ended.
enum Stop {
    Exited(std::process::ExitStatus),
    Deadline,
    Cancelled,
    Disk(u64),
}

/// Resolves with the disk usage of `dir` once it passes `limit` (measured
/// every [`DISK_CHECK_INTERVAL`], off the async threads: a big tree takes a while).
async fn disk_over(dir: PathBuf, limit: u64) -> u64 {
    loop {
        tokio::time::sleep(DISK_CHECK_INTERVAL).await;
        let d = dir.clone();
        match tokio::task::spawn_blocking(move || rundir::disk_usage(&d, limit)).await {
            Ok(used) if used > limit => return used,
            _ => {}
        }
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
