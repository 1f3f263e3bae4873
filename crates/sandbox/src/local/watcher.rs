//! The executor's parent watcher: one small `sh` per executor that kills the
//! sandboxes of its runs and removes their run directories when the
//! executor's process is gone, however it died (SIGKILL included).
//!
//! The watcher reads a pipe whose write end only the executor holds
//! (close-on-exec, so no sandbox inherits it). The executor writes the name
//! of each run directory there before it starts the run's script. When the
//! executor's process dies the kernel closes the pipe, and the watcher, at
//! end of file, kills the process group of each of those runs whose
//! directory still exists — every process of a sandbox is in that group:
//! the steps run in it too ([`ScriptOptions::executor_watchdog`]) — and
//! removes the directory and its lock file. The group is the one recorded in
//! the run's lock file ([`crate::rundir::RunDir::set_group`]), or the
//! script's (`script.pid` in the run directory) when the executor died before recording it.
//!
//! One watcher per executor instead of one per run saves a process per task;
//! it forgets a run once its directory is gone (the executor removes it at
//! the end of every run), so its list stays as long as the runs in flight.
//! It runs detached (its parent `sh` exits at once), so it is reaped by
//! whoever adopts it, not left a zombie of the worker.
//!
//! [`ScriptOptions::executor_watchdog`]: crate::script::ScriptOptions::executor_watchdog

use std::collections::HashSet;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

/// Environment variable holding the executor's base directory.
const ENV_BASE: &str = "SANDFLEET_LOCAL_BASE";

/// The watcher. Run names are `sf-<hex>-a<digits>-<hex>` ([`crate::rundir`]):
/// nothing in them that the shell would split or expand.
const WATCHER: &str = r#"set -f
exec 3<&0
(
  trap '' TERM INT HUP
  # Out of the base directory, so nothing it holds is kept busy.
  cd / || :
  sf_b=$SANDFLEET_LOCAL_BASE
  sf_runs=
  while read -r sf_r; do
    case $sf_r in ''|*[!0-9a-z-]*) continue ;; esac
    # Runs whose directory is gone have ended.
    sf_keep=
    for sf_x in $sf_runs; do if [ -d "$sf_b/$sf_x" ]; then sf_keep="$sf_keep $sf_x"; fi; done
    sf_runs="$sf_keep $sf_r"
  done
  # The executor is gone. Kill each run's sandbox: its group from the lock
  # file, else from the script's pid; a run without either yet may be a
  # script that was just started, so look again for a few seconds.
  sf_try=0
  while [ -n "$sf_runs" ]; do
    sf_left=
    for sf_x in $sf_runs; do
      sf_d="$sf_b/$sf_x"
      [ -d "$sf_d" ] || continue
      sf_g=
      { read -r sf_g <"$sf_d.lock"; } 2>/dev/null || :
      if [ -z "$sf_g" ]; then
        sf_p=
        { read -r sf_p <"$sf_d/script.pid"; } 2>/dev/null || :
        if [ -n "$sf_p" ]; then
          # `pid (comm) state ppid pgrp ...`: the script's group.
          sf_s=
          { read -r sf_s <"/proc/$sf_p/stat"; } 2>/dev/null || :
          sf_s=${sf_s##*) }
          set -- $sf_s
          sf_g=${3:-}
        fi
      fi
      case $sf_g in
        ''|*[!0-9]*|0|1)
          if [ "$sf_try" -lt 5 ]; then sf_left="$sf_left $sf_x"; continue; fi ;;
        *) kill -s KILL -- "-$sf_g" 2>/dev/null || kill -s KILL "-$sf_g" 2>/dev/null ;;
      esac
      rm -rf "$sf_d" "$sf_d.lock"
    done
    sf_runs=$sf_left
    if [ -n "$sf_runs" ]; then sleep 1; sf_try=$(( sf_try + 1 )); fi
  done
) <&3 >/dev/null 2>&1 &
"#;

/// The executor's side of the watcher.
#[derive(Debug)]
pub(crate) struct ParentWatcher {
    shell: PathBuf,
    base: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The write end of the watcher's pipe; `None` until started.
    pipe: Option<io::PipeWriter>,
    /// Runs told to the watcher and not yet ended, for a watcher started
    /// again (if it was killed).
    runs: HashSet<String>,
}

impl ParentWatcher {
    /// Starts the watcher of the runs under `base`, in `shell`.
    pub(crate) fn start(shell: &Path, base: &Path) -> io::Result<ParentWatcher> {
        let w = ParentWatcher {
            shell: shell.to_owned(),
            base: base.to_owned(),
            inner: Mutex::default(),
        };
        let pipe = w.spawn()?;
        w.lock().pipe = Some(pipe);
        Ok(w)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The data stays consistent whatever panicked while it was held.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn(&self) -> io::Result<io::PipeWriter> {
        let (read, write) = io::pipe()?;
        let status = std::process::Command::new(&self.shell)
            .arg("-c")
            .arg(WATCHER)
            .env_clear()
            .env("PATH", super::SANDBOX_PATH)
            .env(ENV_BASE, &self.base)
            .current_dir("/")
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // A signal to the worker's process group does not reach it.
            .process_group(0)
            .status()?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "the parent watcher's shell exited with {status}"
            )));
        }
        Ok(write)
    }

    /// Tells the watcher about run directory `name` (under the base),
    /// before its script starts. Blocking (a pipe write, and a new watcher
    /// when the last one is gone): call it off the async threads.
    pub(crate) fn watch(&self, name: &str) -> io::Result<()> {
        let mut inner = self.lock();
        inner.runs.insert(name.to_owned());
        let line = format!("{name}\n");
        if let Some(pipe) = inner.pipe.as_mut()
            && pipe.write_all(line.as_bytes()).is_ok()
        {
            return Ok(());
        }
        // The watcher is gone (killed): start another and tell it every run.
        inner.pipe = None;
        let mut pipe = self.spawn()?;
        tracing::warn!("the local executor's parent watcher was gone; started another");
        let all: String = inner.runs.iter().map(|r| format!("{r}\n")).collect();
        pipe.write_all(all.as_bytes())?;
        inner.pipe = Some(pipe);
        Ok(())
    }

    /// Run directory `name` is gone.
    pub(crate) fn forget(&self, name: &str) {
        self.lock().runs.remove(name);
    }
}
