//! The script generator: a task's files and steps become one POSIX `sh` script.
//!
//! The same script runs in a Kubernetes pod and in the local executor's temp
//! directory; only the environment differs. The script text is a pure function
//! of the task's *shape* (how many files, steps, artifacts; each step's timeout
//! and `continue_on_error`; the names of step env vars, which must be shell
//! identifiers). Every value a user controls — file paths and contents, step
//! commands, env values, artifact paths — reaches the shell only as an
//! environment variable ([`Script::env`]), so nothing is ever spliced into
//! shell text.
//!
//! ## What the script does
//!
//! 1. Writes each input file (`SANDFLEET_FILE_<i>_PATH`, content in
//!    `SANDFLEET_FILE_<i>_CONTENT`, split into `..._CONTENT_<k>` chunks when
//!    large) under `$SANDFLEET_WORKSPACE`.
//! 2. Runs each step as `/bin/sh -c "$SANDFLEET_STEP_<i>_RUN"` in the
//!    workspace, in the background, in a session of its own (`setsid`, when the
//!    image has it) so that a watchdog can kill the step's whole process group
//!    when its timeout passes (TERM, then KILL after a grace period). Without
//!    `setsid` the watchdog stops and kills the step's process tree through
//!    `/proc/<pid>/task/*/children`. (`set -m` would be the textbook way, but
//!    dash and busybox refuse job control without a terminal, which pods and
//!    the local executor never have.) The local executor starts no `setsid`:
//!    it keeps the steps in the script's process group and is their watchdog
//!    ([`ScriptOptions::executor_watchdog`]).
//! 3. Captures each step's output in a file under `$SANDFLEET_STATE_DIR`, then
//!    prints its tail between marker lines, with an explicit truncation line
//!    ([`TRUNCATION_PREFIX`]) when output was dropped.
//! 4. Records one short line per step in `$SANDFLEET_TERMINATION_LOG`
//!    (`<index> <exit> <ms> <ok|fail|timeout|killed|limit>`), which always fits the
//!    kubelet's 4096-byte termination message (at most [`MAX_STEPS`] steps).
//! 5. Stops at the first failing step unless it continues on error, prints the
//!    requested artifacts (bounded), and exits with the failing step's code.
//!
//! A TERM/INT/HUP to the script (the overall deadline, a cancel) kills the
//! running step's group, records it as `killed` and exits 143.
//!
//! Two options serve the local executor, which has no kubelet around it:
//! [`ScriptOptions::max_file_bytes`] caps every file a step writes (its
//! captured output included) with `ulimit -f`, and
//! [`ScriptOptions::executor_watchdog`] leaves the steps' timeouts to the
//! executor, which also keeps the steps in the script's process group.
//!
//! [`parse_summary`] and [`parse_log`] read the two channels back.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use sandfleet_proto::Task;

/// Environment variable holding the workspace directory.
pub const ENV_WORKSPACE: &str = "SANDFLEET_WORKSPACE";
/// Environment variable holding the file the per-step summary is written to.
pub const ENV_TERMINATION_LOG: &str = "SANDFLEET_TERMINATION_LOG";
/// Environment variable holding a private directory for captured output.
pub const ENV_STATE_DIR: &str = "SANDFLEET_STATE_DIR";
/// Environment variable holding the script itself (pods run `$SANDFLEET_SCRIPT`).
pub const ENV_SCRIPT: &str = "SANDFLEET_SCRIPT";
/// Most steps a task may have: keeps the summary inside the kubelet's
/// 4096-byte termination message (one line of at most ~30 bytes per step).
pub const MAX_STEPS: usize = 120;

/// Start of the line printed before an output tail when output was dropped:
/// `[sandfleet: output truncated, N bytes omitted]`.
pub const TRUNCATION_PREFIX: &str = "[sandfleet: output truncated, ";

/// Marker that starts every line the script itself prints around step output.
pub const MARKER: &str = "::sandfleet::";

/// Largest environment variable value the script relies on (Linux refuses a
/// single `NAME=value` string over 128 KiB at exec); larger file contents are
/// split into chunks.
const ENV_CHUNK_BYTES: usize = 96 * 1024;

/// Bounds on what the script prints and writes, and how it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptOptions {
    /// Tail of each step's output that is printed, in bytes.
    pub step_output_bytes: u64,
    /// Prefix of each artifact that is printed inline, in bytes.
    pub artifact_bytes: u64,
    /// Seconds between TERM and KILL when a step times out.
    pub kill_grace_secs: u64,
    /// Largest file a step may write, in bytes (`ulimit -f`): its captured
    /// output as well as any file in the workspace. A step that reaches it is
    /// recorded as `limit` and stops the task. `None`: no limit from the
    /// script (pods are bounded by their ephemeral-storage limit instead).
    pub max_file_bytes: Option<u64>,
    /// Bytes per block of the shell's `ulimit -f` (512 in POSIX shells, 1024
    /// in bash outside POSIX mode), when the caller has measured it for the
    /// shell that runs the script ([`ULIMIT_PROBE`]; the local executor does
    /// once per shell). `None`: the script measures it itself, at the cost of
    /// a subshell per run.
    pub file_block_bytes: Option<u64>,
    /// The executor enforces each step's timeout itself, so the script
    /// starts no watchdog (a subshell and a `sleep` per step). The executor
    /// reads the script's stdout as it comes, starts a step's clock at its
    /// `step <i> begin` marker and, when the timeout passes, creates
    /// `$SANDFLEET_STATE_DIR/timeout.<i>` (the script then records the step
    /// as `timeout`), sends TERM to the process group named in
    /// `$SANDFLEET_STATE_DIR/step.pid` (and every process that step
    /// started) and KILL after the grace period: what the watchdog does.
    ///
    /// The steps then also stay in the script's process group instead of
    /// a session of their own (no `setsid`, a program start per step): the
    /// executor finds a step's processes in that group (all but the script
    /// and the script's own children other than the step), and killing the
    /// group kills the whole sandbox. What a step leaves running in the
    /// background after it ends lives on until the task ends, as where the
    /// image has no `setsid`.
    /// The local executor only; off in pods, which have no executor beside them.
    pub executor_watchdog: bool,
    /// Each step runs in the subshell the script forks for it, evaluated as
    /// `/bin/sh -c` would start it (the script's own variables and functions
    /// unset, `set -u` off, no positional parameters, `$0` the script's),
    /// instead of in a new `/bin/sh`: one program start less per step. The
    /// step keeps its own process (the subshell), so `$!`, the step's pid
    /// file and every way of killing it are as before; what differs is that
    /// `$$` and `$PPID` are the script's, as in a subshell, and a dash error
    /// message names `eval`. Only for a script run by `/bin/sh` itself (else
    /// the steps would run in another shell), and without `setsid` (a program
    /// start): the script's watchdog kills the step's tree through `/proc`,
    /// the executor's its processes in the script's group. The local executor
    /// only.
    pub steps_in_script_shell: bool,
    /// The script readies its sandbox (the summary, its pid, the file
    /// limit), then waits for a line on its stdin before it writes the task's
    /// files and starts its first step; end of file instead ends it with 125
    /// and nothing of the task done. It then reads no more of its stdin:
    /// it continues with `/dev/null` there. The local executor starts the
    /// script while the worker's cancellation barrier is in flight and lets
    /// it go once the barrier passes; a pod starts only once it did.
    pub start_on_stdin: bool,
    /// The script writes its pid to `$SANDFLEET_STATE_DIR/script.pid`. The
    /// local executor needs it only under bubblewrap, where the script is
    /// not its process group's leader: without it, the group it records
    /// names the script.
    pub record_script_pid: bool,
}

impl ScriptOptions {
    /// Splits a total output budget (for example a pod log `limitBytes`)
    /// between the steps and artifacts of `task`: a quarter at most for
    /// artifacts, the rest for steps, less room for the marker lines, so the
    /// whole log stays under `total_bytes`.
    pub fn for_budget(task: &Task, total_bytes: u64) -> ScriptOptions {
        let steps = task.steps.len().max(1) as u64;
        let artifacts = task.artifacts.len() as u64;
        // Marker lines: ~80 bytes per step, ~80 per artifact, plus slack.
        let overhead = 256 + 80 * steps + 80 * artifacts;
        let usable = total_bytes.saturating_sub(overhead).max(steps * 256);
        let artifact_total = if artifacts == 0 { 0 } else { usable / 4 };
        let artifact_bytes = (artifact_total / artifacts.max(1)).clamp(1, 64 * 1024);
        let step_output_bytes = ((usable - artifact_total.min(usable)) / steps).max(256);
        ScriptOptions {
            step_output_bytes,
            artifact_bytes,
            kill_grace_secs: 2,
            max_file_bytes: None,
            file_block_bytes: None,
            executor_watchdog: false,
            steps_in_script_shell: false,
            start_on_stdin: false,
            record_script_pid: true,
        }
    }
}

/// A script that measures the block size of `ulimit -f` in the shell that
/// runs it: writes 600 bytes under a limit of one block to the file named by
/// its first argument, whose size is then over 512 where blocks are 1 KiB.
pub const ULIMIT_PROBE: &str = "( ulimit -f 1 && printf '%0600d' 0 >\"$1\" ) 2>/dev/null; :";

/// The block size [`ULIMIT_PROBE`] measured, from the size of its file.
pub fn ulimit_block_bytes(probe_file_len: u64) -> u64 {
    if probe_file_len > 512 { 1024 } else { 512 }
}

/// A generated script and the environment that carries the task's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    /// The POSIX `sh` script.
    pub text: String,
    /// Environment for the script, in a stable order: the source variables
    /// (`SANDFLEET_TASK_ID`, `SANDFLEET_ATTEMPT`, `SANDFLEET_REPOSITORY`,
    /// `SANDFLEET_COMMIT`, `SANDFLEET_REF`), the task's `sandbox.env`, then the
    /// script's own variables. The executor adds [`ENV_WORKSPACE`],
    /// [`ENV_STATE_DIR`] and [`ENV_TERMINATION_LOG`].
    pub env: Vec<(String, String)>,
}

/// Why a task cannot be turned into a script. These are the task's fault:
/// executors report them as [`crate::ExecError::Rejected`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    /// The task has no steps.
    #[error("the task has no steps")]
    NoSteps,
    /// More steps than fit in the termination message.
    #[error("the task has {0} steps; at most {MAX_STEPS} are supported")]
    TooManySteps(usize),
    /// A step's timeout is zero.
    #[error("steps[{0}].timeout_secs must be at least 1")]
    ZeroTimeout(usize),
    /// An environment variable name is not a shell identifier.
    #[error("{field}: {name:?} is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)")]
    BadEnvName {
        /// Where the name was found.
        field: String,
        /// The name.
        name: String,
    },
    /// An environment variable name is reserved for the script.
    #[error("{field}: {name:?} is reserved by sandfleet")]
    ReservedEnvName {
        /// Where the name was found.
        field: String,
        /// The name.
        name: String,
    },
    /// A workspace path is absolute, empty, or climbs out with `..`.
    #[error("{field}: {path:?} must be a relative path inside the workspace")]
    UnsafePath {
        /// Where the path was found.
        field: String,
        /// The path.
        path: String,
    },
    /// A value contains a NUL byte, which no environment variable can carry.
    #[error("{0} contains a NUL byte")]
    Nul(String),
}

/// True for the names the script reserves for itself; the contract's
/// validation refuses the same names, so one list serves both.
fn is_reserved(name: &str) -> bool {
    sandfleet_proto::is_reserved_env(name)
}

/// True for a POSIX shell identifier.
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

fn check_path(field: String, path: &str) -> Result<(), ScriptError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.ends_with('/')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(ScriptError::UnsafePath {
            field,
            path: path.to_owned(),
        });
    }
    if path.contains('\0') {
        return Err(ScriptError::Nul(field));
    }
    Ok(())
}

fn check_value(field: impl FnOnce() -> String, value: &str) -> Result<(), ScriptError> {
    if value.contains('\0') {
        return Err(ScriptError::Nul(field()));
    }
    Ok(())
}

fn check_name(field: impl Fn() -> String, name: &str) -> Result<(), ScriptError> {
    if !is_identifier(name) {
        return Err(ScriptError::BadEnvName {
            field: field(),
            name: name.to_owned(),
        });
    }
    if is_reserved(name) {
        return Err(ScriptError::ReservedEnvName {
            field: field(),
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Splits `s` into pieces of at most `max` bytes, on char boundaries.
fn chunks(s: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while rest.len() > max {
        let mut cut = max;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        out.push(head);
        rest = tail;
    }
    out.push(rest);
    out
}

/// The fixed part of every script: helpers and the abort trap.
const PRELUDE: &str = r#"# sandfleet task script v1 (generated). Task values arrive only as environment variables.
set -u
# A task env var must not change how this script splits words.
IFS=' 	
'
sf_ws="${SANDFLEET_WORKSPACE:?SANDFLEET_WORKSPACE is not set}"
sf_state="${SANDFLEET_STATE_DIR:?SANDFLEET_STATE_DIR is not set}"
sf_tlog="${SANDFLEET_TERMINATION_LOG:-/dev/null}"
unset SANDFLEET_SCRIPT 2>/dev/null || :
sf_step_pid=
sf_step_idx=
sf_step_start=0
sf_wd_pid=
sf_t=0
sf_fblocks=
sf_fcap=
sf_ext_wd=
sf_setsid=

# A monotonic clock in milliseconds in sf_t. /proc/uptime (10 ms steps)
# is read by a builtin; where it is missing, `date` (since the epoch,
# seconds * 1000 where date lacks %N).
sf_now() {
  sf_up=
  { read -r sf_up sf_x </proc/uptime; } 2>/dev/null || :
  case "$sf_up" in
    *[!0-9.]*|'') ;;
    *.[0-9][0-9]) sf_t=$(( ${sf_up%.*} * 1000 + 1${sf_up#*.} * 10 - 1000 )); return 0 ;;
  esac
  sf_t=$(date +%s%N 2>/dev/null) || sf_t=
  case "$sf_t" in
    *[!0-9]*|'') sf_t=$(date +%s)000 ;;
    *) if [ "${#sf_t}" -ge 19 ]; then sf_t=${sf_t%??????}; else sf_t=${sf_t}000; fi ;;
  esac
}

# One summary line to the termination log.
sf_note() { printf '%s\n' "$*" >>"$sf_tlog" 2>/dev/null || :; }

# Stop a process tree top-down, signal it, let it go (used without setsid).
sf_kill_tree() {
  kill -s STOP "$1" 2>/dev/null || return 0
  for sf_c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do sf_kill_tree "$sf_c" "$2"; done
  kill -s "$2" "$1" 2>/dev/null
  kill -s CONT "$1" 2>/dev/null
  return 0
}

# Signal the running step: its whole process group (session) with setsid,
# else its process tree. busybox kill rejects "--", dash needs it.
sf_kill_step() {
  [ -n "$sf_step_pid" ] || return 0
  if [ -n "$sf_setsid" ]; then
    kill -s "$1" -- "-$sf_step_pid" 2>/dev/null || kill -s "$1" "-$sf_step_pid" 2>/dev/null || :
  else
    sf_kill_tree "$sf_step_pid" "$1"
  fi
}

# Print the tail of a captured output file, marking what was dropped.
# An empty file costs no process.
sf_emit() {
  [ -s "$1" ] || return 0
  sf_n=$(wc -c <"$1" 2>/dev/null) || sf_n=0
  sf_n=$(( $sf_n + 0 ))
  if [ "$sf_n" -gt "$2" ]; then
    printf '[sandfleet: output truncated, %s bytes omitted]\n' "$(( sf_n - $2 ))"
    tail -c "$2" "$1"
  elif [ "$sf_n" -gt 0 ]; then
    cat "$1"
  fi
  if [ "$sf_n" -gt 0 ] && [ -n "$(tail -c 1 "$1")" ]; then printf '\n'; fi
}

sf_setup_fail() {
  sf_note "setup $1"
  printf '::sandfleet:: setup failed: %s\n' "$1"
  exit 125
}

sf_start() {
  sf_step_idx=$1
  if [ -e "$sf_state/timeout.$1" ]; then rm -f "$sf_state/timeout.$1" 2>/dev/null; fi
  printf '::sandfleet:: step %s begin\n' "$1"
  sf_now
  sf_step_start=$sf_t
}

sf_finish() {
  sf_now
  sf_ms=$(( sf_t - sf_step_start ))
  sf_note "$1 $2 $sf_ms $3"
  sf_emit "$sf_state/out.$1" "$sf_out_limit"
  printf '::sandfleet:: step %s end %s %s %s\n' "$1" "$2" "$sf_ms" "$3"
  sf_step_idx=
}

sf_artifact() {
  sf_f="$sf_ws/$2"
  if [ -f "$sf_f" ]; then
    sf_n=$(wc -c <"$sf_f" 2>/dev/null) || sf_n=0
    sf_n=$(( $sf_n + 0 ))
    sf_s=$sf_n
    if [ "$sf_s" -gt "$sf_art_limit" ]; then sf_s=$sf_art_limit; fi
    printf '::sandfleet:: artifact %s begin %s %s\n' "$1" "$sf_n" "$sf_s"
    head -c "$sf_s" "$sf_f"
    printf '\n::sandfleet:: artifact %s end\n' "$1"
  else
    printf '::sandfleet:: artifact %s missing\n' "$1"
  fi
}

sf_end() {
  sf_artifacts
  sf_note "end $1"
  exit "$1"
}

sf_stop_watchdog() {
  [ -n "$sf_wd_pid" ] || return 0
  kill -s KILL "$sf_wd_pid" 2>/dev/null
  wait "$sf_wd_pid" 2>/dev/null
  sf_wd_pid=
  sf_p=
  { read -r sf_p <"$sf_state/watchdog.pid"; } 2>/dev/null || :
  if [ -n "$sf_p" ]; then
    kill -s KILL "$sf_p" 2>/dev/null
    : >"$sf_state/watchdog.pid"
  fi
  return 0
}

sf_abort() {
  trap '' TERM INT HUP
  # A TERM that lands between starting a step and recording its pid: $! is
  # that step (the watchdog starts only after the pid is recorded).
  if [ -z "$sf_step_pid" ] && [ -n "$sf_step_idx" ]; then sf_step_pid=${!:-}; fi
  sf_kill_step KILL
  # The pid may be reused once the step is gone: nobody may signal it later
  # (an empty file names no process; truncating costs no process).
  : >"$sf_state/step.pid"
  sf_stop_watchdog
  if [ -n "$sf_step_idx" ]; then sf_finish "$sf_step_idx" 143 killed; fi
  sf_note "end 143"
  exit 143
}
trap sf_abort TERM INT HUP

# `ulimit -f` counts 512-byte blocks in POSIX shells but 1 KiB blocks in
# bash outside POSIX mode: measure which, by letting a throw-away subshell
# write 600 bytes under a limit of one block.
# The probe is read back by a builtin (it holds no newline).
sf_file_limit() {
  ( ulimit -f 1 && printf '%0600d' 0 >"$sf_state/fsize.probe" ) 2>/dev/null
  sf_x=
  { read -r sf_x <"$sf_state/fsize.probe"; } 2>/dev/null || :
  if [ "${#sf_x}" -gt 512 ]; then sf_u=1024; else sf_u=512; fi
  sf_fblocks=$(( ($1 + sf_u - 1) / sf_u ))
  sf_fcap=$(( sf_fblocks * sf_u ))
}

# Wait for the step started last ($1 index, $2 timeout, $3 continue on error).
sf_wait() {
  sf_step_pid=$!
  printf '%s\n' "$sf_step_pid" >"$sf_state/step.pid" 2>/dev/null
  # The watchdog is stopped with KILL, not a trap: a TERM that races the
  # subshell's trap reset is lost in dash. Its sleep is killed through the
  # pid it records. Where the executor is the watchdog (sf_ext_wd), none.
  if [ -z "$sf_ext_wd" ]; then
  (
    sleep "$2" & printf '%s\n' "$!" >"$sf_state/watchdog.pid"
    wait "$!"
    : >"$sf_state/timeout.$1"
    sf_kill_step TERM
    sleep "$sf_grace" & printf '%s\n' "$!" >"$sf_state/watchdog.pid"
    wait "$!"
    sf_kill_step KILL
  ) </dev/null >/dev/null 2>&1 &
  sf_wd_pid=$!
  fi
  wait "$sf_step_pid"
  sf_rc=$?
  sf_stop_watchdog
  # Leftovers of the step (background children) die with its group.
  if [ -n "$sf_setsid" ]; then sf_kill_step KILL; fi
  # No stale pid for anyone to signal later (the executor's watchdog).
  : >"$sf_state/step.pid"
  sf_step_pid=
  sf_n=0
  # Only a failed step can have hit the file limit.
  if [ "$sf_rc" -ne 0 ] && [ -n "$sf_fcap" ]; then
    sf_n=$(wc -c <"$sf_state/out.$1" 2>/dev/null) || sf_n=0
    sf_n=$(( $sf_n + 0 ))
  fi
  if [ "$sf_rc" -eq 0 ]; then sf_status=ok
  elif [ -e "$sf_state/timeout.$1" ]; then sf_status=timeout
  elif [ -n "$sf_fcap" ] && { [ "$sf_n" -ge "$sf_fcap" ] || [ "$sf_rc" -eq 153 ]; }; then sf_status=limit
  else sf_status=fail
  fi
  sf_finish "$1" "$sf_rc" "$sf_status"
  if [ "$sf_status" = limit ]; then sf_end "$sf_rc"; fi
  if [ "$sf_status" != ok ] && [ "$3" = 0 ]; then sf_end "$sf_rc"; fi
}
"#;

/// Generates the script and its environment for attempt `attempt` of `task`.
pub fn generate(task: &Task, attempt: u32, opts: &ScriptOptions) -> Result<Script, ScriptError> {
    if task.steps.is_empty() {
        return Err(ScriptError::NoSteps);
    }
    if task.steps.len() > MAX_STEPS {
        return Err(ScriptError::TooManySteps(task.steps.len()));
    }

    let mut env: Vec<(String, String)> = Vec::new();
    let mut push = |k: String, v: &str| env.push((k, v.to_owned()));
    push("SANDFLEET_TASK_ID".into(), &task.id.to_string());
    push("SANDFLEET_ATTEMPT".into(), &attempt.to_string());
    push("SANDFLEET_REPOSITORY".into(), &task.source.repository);
    push("SANDFLEET_COMMIT".into(), &task.source.commit);
    if let Some(r) = &task.source.git_ref {
        push("SANDFLEET_REF".into(), r);
    }
    for (k, v) in &task.sandbox.env {
        check_name(|| format!("sandbox.env.{k}"), k)?;
        check_value(|| format!("sandbox.env.{k}"), v)?;
    }
    // The task's own env wins over the source variables it names again.
    env.retain(|(k, _)| !task.sandbox.env.contains_key(k));
    env.extend(task.sandbox.env.iter().map(|(k, v)| (k.clone(), v.clone())));

    let mut text = String::with_capacity(SENT_PRELUDE.len() + 256 * task.steps.len());
    text.push_str(&SENT_PRELUDE);
    // Only numbers are spliced below: indexes, timeouts, byte bounds.
    let _ = writeln!(text, "sf_grace={}", opts.kill_grace_secs.max(1));
    let _ = writeln!(text, "sf_out_limit={}", opts.step_output_bytes.max(1));
    let _ = writeln!(text, "sf_art_limit={}", opts.artifact_bytes.max(1));
    if opts.executor_watchdog {
        // The executor kills a step's processes in the script's group.
        text.push_str("sf_ext_wd=1\n");
    } else if !opts.steps_in_script_shell {
        text.push_str("if command -v setsid >/dev/null 2>&1; then sf_setsid=setsid; fi\n");
    }

    if opts.steps_in_script_shell {
        // Once per script, not per step: the script is one argument of at
        // most 128 KiB in the local executor.
        text.push_str(&FRESH_FUNCTION);
    }
    text.push_str("sf_artifacts() {\n  :\n");
    for (i, path) in task.artifacts.iter().enumerate() {
        check_path(format!("artifacts[{i}]"), path)?;
        env.push((format!("SANDFLEET_ARTIFACT_{i}_PATH"), path.clone()));
        let _ = writeln!(text, "  sf_artifact {i} \"$SANDFLEET_ARTIFACT_{i}_PATH\"");
    }
    text.push_str("}\n\n");

    text.push_str(": >\"$sf_tlog\" 2>/dev/null || :\nsf_note sf1\n");
    text.push_str(
        "{ [ -d \"$sf_ws\" ] && [ -d \"$sf_state\" ]; } || mkdir -p \"$sf_ws\" \"$sf_state\" || { sf_note \"setup workspace\"; exit 125; }\n",
    );
    if opts.record_script_pid {
        text.push_str("printf '%s\\n' \"$$\" >\"$sf_state/script.pid\"\n");
    }
    match (opts.max_file_bytes, opts.file_block_bytes) {
        (Some(bytes), Some(unit)) => {
            let unit = unit.max(1);
            let blocks = bytes.max(1).div_ceil(unit);
            let _ = writeln!(text, "sf_fblocks={blocks}\nsf_fcap={}", blocks * unit);
        }
        (Some(bytes), None) => {
            // The probe's death by SIGXFSZ is reported by the shell itself.
            let _ = writeln!(text, "sf_file_limit {} 2>/dev/null", bytes.max(1));
        }
        (None, _) => {}
    }
    if opts.start_on_stdin {
        // `read` is a builtin; a closed stdin (the start called off, the
        // worker gone) ends the script before anything of the task ran.
        text.push_str("read -r sf_go || exit 125\nexec </dev/null\n");
    }
    for (i, file) in task.files.iter().enumerate() {
        check_path(format!("files[{i}].path"), &file.path)?;
        check_value(|| format!("files[{i}].content"), &file.content)?;
        env.push((format!("SANDFLEET_FILE_{i}_PATH"), file.path.clone()));
        let mut names = Vec::new();
        for (k, piece) in chunks(&file.content, ENV_CHUNK_BYTES)
            .into_iter()
            .enumerate()
        {
            let name = if k == 0 {
                format!("SANDFLEET_FILE_{i}_CONTENT")
            } else {
                format!("SANDFLEET_FILE_{i}_CONTENT_{k}")
            };
            env.push((name.clone(), piece.to_owned()));
            names.push(name);
        }
        // `printf '%s' "$A" "$B"` repeats the format: the chunks are concatenated.
        let args: String = names.iter().map(|n| format!(" \"${n}\"")).collect();
        let _ = writeln!(text, "sf_p=\"$sf_ws/$SANDFLEET_FILE_{i}_PATH\"");
        let _ = writeln!(
            text,
            "{{ mkdir -p \"${{sf_p%/*}}\" && printf '%s'{args} >\"$sf_p\"; }} || sf_setup_fail \"file {i}\""
        );
        if file.executable {
            let _ = writeln!(text, "chmod +x \"$sf_p\" || sf_setup_fail \"file {i}\"");
        }
        // Large contents need not stay in every step's environment.
        let _ = writeln!(text, "unset {}", names.join(" "));
    }

    // Until here the shell's own errors (an input file it could not write)
    // go to the log, before the `setup failed` line; from the first step on
    // its job-status chatter ("Killed", "Terminated") stays out of it.
    text.push_str("exec 2>/dev/null\n");
    for (i, step) in task.steps.iter().enumerate() {
        if step.timeout_secs == 0 {
            return Err(ScriptError::ZeroTimeout(i));
        }
        check_value(|| format!("steps[{i}].run"), &step.run)?;
        env.push((format!("SANDFLEET_STEP_{i}_RUN"), step.run.clone()));
        let _ = writeln!(text, "\nsf_start {i}\n( cd \"$sf_ws\" || exit 125");
        if opts.max_file_bytes.is_some() {
            text.push_str("  ulimit -f \"$sf_fblocks\" 2>/dev/null || :\n");
        }
        for (k, (name, value)) in step.env.iter().enumerate() {
            check_name(|| format!("steps[{i}].env.{name}"), name)?;
            check_value(|| format!("steps[{i}].env.{name}"), value)?;
            env.push((format!("SANDFLEET_STEP_{i}_ENV_{k}"), value.clone()));
            let _ = writeln!(
                text,
                "  {name}=\"$SANDFLEET_STEP_{i}_ENV_{k}\"; export {name}"
            );
        }
        if opts.steps_in_script_shell {
            // `set --` runs inside the eval, after `$1` was expanded: the
            // step sees no positional parameters.
            let _ = writeln!(
                text,
                "  sf_fresh; unset -f sf_fresh\n  set +u -- \"$SANDFLEET_STEP_{i}_RUN\"\n  eval \"set --; $1\""
            );
        } else {
            let _ = writeln!(
                text,
                "  exec $sf_setsid /bin/sh -c \"$SANDFLEET_STEP_{i}_RUN\""
            );
        }
        let _ = writeln!(
            text,
            ") </dev/null >\"$sf_state/out.{i}\" 2>&1 &\nsf_wait {i} {} {}",
            step.timeout_secs,
            u8::from(step.continue_on_error)
        );
    }
    text.push_str("\nsf_end 0\n");
    Ok(Script { text, env })
}

/// The prelude as every script carries it: its first line (what generated
/// the script), then the rest without comment lines, blank lines and
/// indentation. The script travels in every Job and Pod, so in the create
/// request and every watch event a worker reads; the comments are for
/// whoever reads this file. Only the single-quoted `IFS` value spans two
/// lines, and its second line has no indentation to lose.
static SENT_PRELUDE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let mut lines = PRELUDE.lines();
    let mut out = String::with_capacity(PRELUDE.len());
    if let Some(first) = lines.next() {
        out.push_str(first);
        out.push('\n');
    }
    for line in lines {
        let code = line.trim_start_matches(' ');
        if code.is_empty() || code.starts_with('#') {
            continue;
        }
        out.push_str(code);
        out.push('\n');
    }
    out
});

/// `sf_fresh`, which unsets every variable and function of the script's own
/// (`sf_*`, names a task may not use) in a step's subshell
/// ([`ScriptOptions::steps_in_script_shell`]); the step's subshell then
/// unsets `sf_fresh` itself. The names are taken from the prelude's text, so
/// a name added there is unset too; the generated part adds `sf_grace`,
/// `sf_out_limit`, `sf_art_limit` and `sf_artifacts`, which the prelude
/// names as well.
static FRESH_FUNCTION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let names = prelude_names().join(" ");
    format!("sf_fresh() {{\n  unset -f {names} 2>/dev/null\n  unset {names} 2>/dev/null\n}}\n")
});

/// Every `sf_*` name in the prelude's text (its variables and functions),
/// sorted, once each.
fn prelude_names() -> Vec<&'static str> {
    let words = PRELUDE.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
    let names: std::collections::BTreeSet<&str> = words
        .filter(|w| w.len() > 3 && w.starts_with("sf_"))
        .collect();
    names.into_iter().collect()
}

/// How one step ended, as the script recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStatus {
    /// Exited 0.
    Ok,
    /// Exited non-zero.
    Fail,
    /// Killed by its own timeout.
    Timeout,
    /// Killed because the whole script was stopped (deadline, cancel).
    Killed,
    /// Reached the largest file a step may write (its output or a workspace
    /// file; [`ScriptOptions::max_file_bytes`]). Stops the task even when the
    /// step continues on error.
    FileLimit,
}

/// One summary line: `<index> <exit> <ms> <status>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLine {
    /// Step index.
    pub index: usize,
    /// Exit status as the shell saw it (128+n for signal n).
    pub exit_code: i32,
    /// Wall-clock duration in milliseconds.
    pub duration_ms: u64,
    /// How it ended.
    pub status: StepStatus,
}

/// The per-step summary the script writes to `$SANDFLEET_TERMINATION_LOG`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// True when the summary header was found (the script started).
    pub started: bool,
    /// Steps that ran, in order.
    pub steps: Vec<StepLine>,
    /// Set when writing the workspace or an input file failed (`"file 2"`).
    pub setup_failure: Option<String>,
    /// The script's exit code, when it reached its end (or its abort handler).
    pub exit_code: Option<i32>,
}

impl Summary {
    /// The step that stopped the task: the first non-ok step that did not
    /// continue on error (`continue_on_error[i]` tells which did).
    pub fn deciding_step(&self, continue_on_error: impl Fn(usize) -> bool) -> Option<&StepLine> {
        self.steps.iter().find(|s| {
            s.status != StepStatus::Ok
                && (matches!(s.status, StepStatus::Killed | StepStatus::FileLimit)
                    || !continue_on_error(s.index))
        })
    }
}

/// Parses the summary; unknown lines are ignored so that a newer script can add some.
pub fn parse_summary(text: &str) -> Summary {
    let mut summary = Summary::default();
    for line in text.lines() {
        let mut words = line.split_ascii_whitespace();
        match words.next() {
            Some("sf1") => summary.started = true,
            Some("setup") => summary.setup_failure = Some(words.collect::<Vec<_>>().join(" ")),
            Some("end") => summary.exit_code = words.next().and_then(|w| w.parse().ok()),
            Some(first) => {
                let fields: Vec<&str> = std::iter::once(first).chain(words).collect();
                if let [index, exit, ms, status] = fields[..] {
                    let status = match status {
                        "ok" => StepStatus::Ok,
                        "fail" => StepStatus::Fail,
                        "timeout" => StepStatus::Timeout,
                        "killed" => StepStatus::Killed,
                        "limit" => StepStatus::FileLimit,
                        _ => continue,
                    };
                    if let (Ok(index), Ok(exit_code), Ok(duration_ms)) =
                        (index.parse(), exit.parse(), ms.parse())
                    {
                        summary.steps.push(StepLine {
                            index,
                            exit_code,
                            duration_ms,
                            status,
                        });
                    }
                }
            }
            None => {}
        }
    }
    summary
}

/// One step's printed output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutput {
    /// The printed tail, including the truncation line when there is one.
    pub text: String,
    /// True when the script dropped the beginning of the output.
    pub truncated: bool,
    /// True when the end marker was seen (false: the log was cut or the pod died).
    pub complete: bool,
}

/// One artifact as printed in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactOutput {
    /// Size of the file in the sandbox.
    pub size_bytes: u64,
    /// The bytes printed (a prefix of the file).
    pub content: Vec<u8>,
    /// False when the log ended before all announced bytes were printed.
    pub complete: bool,
}

/// The script's output (pod log, or the local executor's captured stdout),
/// split back into its parts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedLog {
    /// The log without the artifact sections: what a human wants to read.
    pub text: String,
    /// Output per step index.
    pub steps: BTreeMap<usize, StepOutput>,
    /// Artifacts per index; absent indexes were missing in the workspace.
    pub artifacts: BTreeMap<usize, ArtifactOutput>,
}

fn marker_args<'a>(line: &'a [u8], kind: &str) -> Option<Vec<&'a str>> {
    let line = std::str::from_utf8(line).ok()?;
    let rest = line.strip_prefix(MARKER)?.strip_prefix(' ')?;
    let rest = rest.strip_prefix(kind)?.strip_prefix(' ')?;
    Some(rest.split(' ').collect())
}

/// Splits the script's output into step outputs and artifacts.
pub fn parse_log(log: &[u8]) -> ParsedLog {
    let mut parsed = ParsedLog::default();
    let mut text: Vec<u8> = Vec::with_capacity(log.len());
    let mut current: Option<(usize, Vec<u8>)> = None;
    let mut pos = 0;
    while pos < log.len() {
        let end = log[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(log.len(), |e| pos + e);
        let line = &log[pos..end];
        let next = (end + 1).min(log.len());
        if let Some(args) = marker_args(line, "artifact") {
            if let [index, "begin", size, shown] = args[..]
                && let (Ok(index), Ok(size), Ok(shown)) = (
                    index.parse::<usize>(),
                    size.parse::<u64>(),
                    shown.parse::<usize>(),
                )
            {
                let body_end = (next + shown).min(log.len());
                let content = log[next..body_end].to_vec();
                let complete = body_end - next == shown;
                parsed.artifacts.insert(
                    index,
                    ArtifactOutput {
                        size_bytes: size,
                        content,
                        complete,
                    },
                );
                // Skip the newline the script prints after the content and the end marker.
                pos = body_end;
                if log.get(pos) == Some(&b'\n') {
                    pos += 1;
                }
                let end_line = log[pos..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(log.len(), |e| pos + e);
                if marker_args(&log[pos..end_line], "artifact").is_some() {
                    pos = (end_line + 1).min(log.len());
                }
                continue;
            }
            pos = next;
            continue;
        }
        text.extend_from_slice(line);
        if end < log.len() {
            text.push(b'\n');
        }
        if let Some(args) = marker_args(line, "step") {
            match (
                args.first().and_then(|i| i.parse::<usize>().ok()),
                args.get(1),
            ) {
                (Some(index), Some(&"begin")) => current = Some((index, Vec::new())),
                (Some(index), Some(&"end")) => {
                    if let Some((open, body)) = current.take()
                        && open == index
                    {
                        parsed.steps.insert(index, step_output(body, true));
                    }
                }
                _ => {}
            }
        } else if let Some((_, body)) = current.as_mut() {
            body.extend_from_slice(line);
            body.push(b'\n');
        }
        pos = next;
    }
    if let Some((index, body)) = current {
        parsed.steps.insert(index, step_output(body, false));
    }
    parsed.text = String::from_utf8_lossy(&text).into_owned();
    parsed
}

fn step_output(body: Vec<u8>, complete: bool) -> StepOutput {
    let text = String::from_utf8_lossy(&body).into_owned();
    let truncated = text.starts_with(TRUNCATION_PREFIX);
    StepOutput {
        text,
        truncated,
        complete,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use sandfleet_proto::{Provider, SandboxSpec, Source};

    #[test]
    fn the_contract_reserves_every_name_the_script_sets_itself() {
        for name in [
            ENV_WORKSPACE,
            ENV_TERMINATION_LOG,
            ENV_STATE_DIR,
            ENV_SCRIPT,
        ] {
            assert!(is_reserved(name), "{name}");
        }
        assert!(!is_reserved("SANDFLEET_REPOSITORY"));
        // The script's shell variables: a task's own value would be
        // overwritten as the script runs, or unset in its steps.
        let names = prelude_names();
        assert!(
            names.contains(&"sf_t") && names.contains(&"sf_wait"),
            "{names:?}"
        );
        for name in names {
            assert!(is_reserved(name), "{name}");
        }
    }

    fn task() -> Task {
        Task::fix_attempt(
            Source {
                provider: Provider::Api,
                repository: "acme/widgets".into(),
                commit: "0123456789abcdef0123456789abcdef01234567".into(),
                git_ref: Some("main".into()),
                ci_run_id: None,
                pull_request: None,
                url: None,
            },
            SandboxSpec {
                image: "alpine:3.20".into(),
                resources: Default::default(),
                env: Default::default(),
                deadline_secs: 60,
                pending_timeout_secs: 60,
            },
        )
    }

    const OPTS: ScriptOptions = ScriptOptions {
        step_output_bytes: 1000,
        artifact_bytes: 100,
        kill_grace_secs: 1,
        max_file_bytes: None,
        file_block_bytes: None,
        executor_watchdog: false,
        steps_in_script_shell: false,
        start_on_stdin: false,
        record_script_pid: true,
    };

    #[test]
    fn scripts_carry_the_prelude_without_its_comments() {
        // No line continues onto the next: dropping a comment line between
        // the two would change the command.
        assert!(PRELUDE.lines().all(|l| !l.ends_with('\\')));
        let code = |text: &str| -> Vec<String> {
            text.lines()
                .map(|l| l.trim_start_matches(' ').to_owned())
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .collect()
        };
        assert_eq!(code(&SENT_PRELUDE), code(PRELUDE));
        assert!(SENT_PRELUDE.starts_with("# sandfleet task script v1 (generated)."));
        assert!(
            SENT_PRELUDE.len() * 4 < PRELUDE.len() * 3,
            "{}",
            SENT_PRELUDE.len()
        );
        let script = generate(&task().with_step("build", "make", 10), 1, &OPTS).unwrap();
        assert!(script.text.starts_with(SENT_PRELUDE.as_str()));
    }

    #[test]
    fn user_values_never_appear_in_the_script_text() {
        let evil = "$(touch /tmp/pwned); `id`; \"'";
        let mut t = task()
            .with_file("dir/evil.txt", evil)
            .with_step("build", evil, 10);
        t.sandbox.env.insert("EVIL".into(), evil.into());
        t.steps[0].env.insert("STEP_VAR".into(), evil.into());
        t.artifacts.push("out/report.txt".into());
        let script = generate(&t, 1, &OPTS).unwrap();
        assert!(!script.text.contains("touch"), "{}", script.text);
        assert!(!script.text.contains("dir/evil"));
        assert!(!script.text.contains("report.txt"));
        let env: BTreeMap<_, _> = script.env.iter().cloned().collect();
        assert_eq!(env["SANDFLEET_FILE_0_PATH"], "dir/evil.txt");
        assert_eq!(env["SANDFLEET_FILE_0_CONTENT"], evil);
        assert_eq!(env["SANDFLEET_STEP_0_RUN"], evil);
        assert_eq!(env["SANDFLEET_STEP_0_ENV_0"], evil);
        assert_eq!(env["EVIL"], evil);
        assert_eq!(env["SANDFLEET_REPOSITORY"], "acme/widgets");
        assert_eq!(env["SANDFLEET_ATTEMPT"], "1");
    }

    #[test]
    fn same_task_shape_gives_the_same_script() {
        let a = task().with_step("a", "true", 5).with_file("x", "1");
        let b = task().with_step("b", "false", 5).with_file("y", "2");
        assert_eq!(
            generate(&a, 1, &OPTS).unwrap().text,
            generate(&b, 1, &OPTS).unwrap().text
        );
    }

    #[test]
    fn invalid_shapes_are_rejected_with_the_field() {
        assert_eq!(generate(&task(), 1, &OPTS), Err(ScriptError::NoSteps));
        let t = task().with_step("a", "true", 0);
        assert_eq!(generate(&t, 1, &OPTS), Err(ScriptError::ZeroTimeout(0)));
        let mut t = task().with_step("a", "true", 1);
        t.steps[0].env.insert("A-B".into(), "x".into());
        assert!(
            matches!(generate(&t, 1, &OPTS), Err(ScriptError::BadEnvName { field, .. }) if field == "steps[0].env.A-B")
        );
        let mut t = task().with_step("a", "true", 1);
        t.sandbox
            .env
            .insert("SANDFLEET_WORKSPACE".into(), "/".into());
        assert!(matches!(
            generate(&t, 1, &OPTS),
            Err(ScriptError::ReservedEnvName { .. })
        ));
        for bad in ["/etc/passwd", "../x", "a/../../b", "", "a//b", "./a", "a/"] {
            let t = task().with_step("a", "true", 1).with_file(bad, "x");
            assert!(
                matches!(generate(&t, 1, &OPTS), Err(ScriptError::UnsafePath { .. })),
                "{bad:?} accepted"
            );
        }
        let t = task().with_step("a", "true", 1).with_file("a", "nul\0");
        assert_eq!(
            generate(&t, 1, &OPTS),
            Err(ScriptError::Nul("files[0].content".into()))
        );
        let mut t = task();
        for i in 0..=MAX_STEPS {
            t = t.with_step(&format!("s{i}"), "true", 1);
        }
        assert_eq!(
            generate(&t, 1, &OPTS),
            Err(ScriptError::TooManySteps(MAX_STEPS + 1))
        );
    }

    #[test]
    fn large_files_are_split_into_chunks_under_the_exec_limit() {
        let big = "é".repeat(150 * 1024); // 300 KiB, two-byte chars
        let t = task().with_step("a", "true", 1).with_file("big", &big);
        let script = generate(&t, 1, &OPTS).unwrap();
        let parts: Vec<_> = script
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("SANDFLEET_FILE_0_CONTENT"))
            .collect();
        assert_eq!(parts.len(), 4);
        assert!(parts.iter().all(|(_, v)| v.len() <= ENV_CHUNK_BYTES));
        assert_eq!(
            parts.iter().map(|(_, v)| v.as_str()).collect::<String>(),
            big
        );
    }

    #[test]
    fn summary_parses_and_finds_the_deciding_step() {
        let s = parse_summary("sf1\n0 0 12 ok\n1 3 40 fail\n2 124 1000 timeout\nend 124\n");
        assert!(s.started);
        assert_eq!(s.exit_code, Some(124));
        assert_eq!(s.steps.len(), 3);
        assert_eq!(s.deciding_step(|i| i == 1).unwrap().index, 2);
        assert_eq!(s.deciding_step(|_| false).unwrap().exit_code, 3);
        let s = parse_summary("sf1\nsetup file 2\n");
        assert_eq!(s.setup_failure.as_deref(), Some("file 2"));
        assert_eq!(s.exit_code, None);
    }

    #[test]
    fn log_splits_into_steps_and_artifacts() {
        let log = b"::sandfleet:: step 0 begin\nhello\n::sandfleet:: step 0 end 0 5 ok\n\
::sandfleet:: step 1 begin\n[sandfleet: output truncated, 10 bytes omitted]\ntail\n::sandfleet:: step 1 end 1 5 fail\n\
::sandfleet:: artifact 0 begin 20 5\nab\ncd\n::sandfleet:: artifact 0 end\n::sandfleet:: artifact 1 missing\n";
        let p = parse_log(log);
        assert_eq!(p.steps[&0].text, "hello\n");
        assert!(!p.steps[&0].truncated && p.steps[&0].complete);
        assert!(p.steps[&1].truncated);
        assert_eq!(p.artifacts[&0].content, b"ab\ncd");
        assert_eq!(p.artifacts[&0].size_bytes, 20);
        assert!(!p.artifacts.contains_key(&1));
        assert!(!p.text.contains("artifact"));
        assert!(p.text.contains("tail"));
    }

    #[test]
    fn a_cut_log_leaves_the_running_step_incomplete() {
        let p = parse_log(b"::sandfleet:: step 0 begin\npartial");
        assert_eq!(p.steps[&0].text, "partial\n");
        assert!(!p.steps[&0].complete);
    }

    #[test]
    fn budget_keeps_the_log_under_the_limit() {
        let mut t = task();
        for i in 0..10 {
            t = t.with_step(&format!("s{i}"), "true", 1);
        }
        t.artifacts = vec!["a".into(), "b".into()];
        let o = ScriptOptions::for_budget(&t, 64 * 1024);
        let worst = 10 * (o.step_output_bytes + 80) + 2 * (o.artifact_bytes + 80) + 256;
        assert!(worst <= 64 * 1024, "{o:?} worst {worst}");
        assert!(o.step_output_bytes >= 4000);
    }
}
