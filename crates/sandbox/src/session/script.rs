//! The POSIX `sh` wrappers every session operation runs, in a pod through
//! `pods/exec` and locally as a child process. Each is a constant: the
//! command, paths, modes and sizes arrive as positional arguments (`$1`…),
//! so no user value is ever parsed as shell. `$SANDFLEET_STATE_DIR` (set in
//! the sandbox's env) holds the activity markers the idle loop reads.

/// `argv[0]` of the wrappers (what `$0` says in their error messages).
const ARGV0: &str = "sandfleet";

/// Exit code the run wrapper reports when its watchdog killed the command
/// (as GNU `timeout` does). The caller also checks that the timeout had
/// passed, so a command that exits 124 by itself is not taken for a timeout.
pub const TIMEOUT_EXIT: i32 = 124;

/// Exit code of a command killed with SIGKILL (128 + 9), as the watchdog
/// kills a wrapper that had become the command.
pub const KILLED_EXIT: i32 = 137;

/// Exit code of a wrapper that could not do its job (no working dir, write
/// failed); its stderr says why.
pub const SETUP_EXIT: i32 = 125;

/// Runs `$3` as `/bin/sh -c` would, in working dir `$1`, killing it with
/// its whole process tree after `$2` seconds. The wrapper's own variables
/// are named `sf_*`, names a session's env may not use, so none of them
/// changes a variable the command inherits. Techniques as in the task script
/// ([`crate::script`]): the command gets a session of its own (`setsid`) when
/// the image has it, else the watchdog walks `/proc` to kill its tree.
/// Leftover background children die with the command (a session runs
/// commands one after another; nothing outlives its command).
///
/// The watchdog is the sandbox's idle loop ([`IDLE_LOOP`]) when it runs (it
/// leaves its pid in `watchdog`): the wrapper writes the deadline (whole
/// seconds of `/proc/uptime`, read with a builtin) and the command's process
/// group into `running.<pid>`, and the loop, which wakes every second
/// anyway, kills that group once the deadline has passed, writing the
/// deadline into `timeout.<pid>` first. The kill comes after the timeout and
/// within two seconds of it (the deadline rounds up, the loop ticks every
/// second).
///
/// Where the wrapper also leads a process group of its own (a kubelet's
/// exec starts it so; the fifth field of `/proc/$$/stat` says), it becomes
/// the command: with its own variables unset, `set -u` undone, no
/// positional parameters and stdin from `/dev/null` (a fresh `sh -c`'s
/// state; `$0` is `/bin/sh`, as the argv names it), it `eval`s the command
/// itself, so a command costs no process besides its own: no fork, no
/// second shell. The exit status is the command's;
/// a command killed at its deadline shows 137, which with the timeout
/// passed is a timeout ([`timed_out`]). What a command leaves running in
/// its group is killed by the next command's wrapper before it starts, and
/// by the loop within a second (a leftover that holds the command's output
/// open holds the exec's end until then).
///
/// Otherwise the command gets a session of its own (`setsid`, when the image
/// has it) and the wrapper waits for it, then kills what is left of its
/// group and writes `done` into its file (the loop removes finished files in
/// batches). Without the loop (the local backend) the wrapper keeps its own
/// watchdog: a subshell sleeping out the timeout, whose `sleep` is killed
/// through the pid it records.
const RUN: &str = r#"set -u
IFS=' 	
'
sf_s="${SANDFLEET_STATE_DIR:-/tmp}"
if [ -f "$sf_s/watchdog" ]; then echo >"$sf_s/activity"; else : >"$sf_s/active"; fi 2>/dev/null
: >"$sf_s/running.$$" 2>/dev/null
# A claimed pool member's env arrived at claim time (see CLAIM), not in the pod spec.
if [ -f "$sf_s/session.env" ]; then . "$sf_s/session.env"; fi
cd -- "$1" || exit 125
sf_t=$2
# The deadline, when the idle loop runs to keep it.
sf_dl=
if [ -f "$sf_s/watchdog" ] && read -r sf_w <"$sf_s/watchdog" \
  && kill -0 "$sf_w" 2>/dev/null && read -r sf_up _ 2>/dev/null </proc/uptime; then
  sf_dl=$(( ${sf_up%.*} + sf_t + 1 ))
fi
if [ -n "$sf_dl" ] && read -r sf_st <"/proc/$$/stat"; then
  # The process group this wrapper is in: the fifth field of its stat.
  sf_pg=${sf_st##*) }; sf_pg=${sf_pg#* }; sf_pg=${sf_pg#* }; sf_pg=${sf_pg%% *}
  if [ "$sf_pg" = "$$" ]; then
    # What earlier commands left behind in their groups goes first.
    for sf_r in "$sf_s"/running.*; do
      [ "$sf_r" != "$sf_s/running.$$" ] || continue
      read -r _ sf_og sf_end 2>/dev/null <"$sf_r" || continue
      if [ "$sf_end" = . ] && ! kill -0 "${sf_r##*.}" 2>/dev/null; then
        kill -s KILL -- "-$sf_og" 2>/dev/null || kill -s KILL "-$sf_og" 2>/dev/null
        echo done >"$sf_r"
      fi
    done
    printf '%s %s .\n' "$sf_dl" "$$" >"$sf_s/running.$$"
    # The command runs here, in a shell as `sh -c` would start it.
    exec </dev/null
    unset sf_s sf_t sf_w sf_st sf_up sf_pg sf_r sf_dl sf_og sf_end
    set +u -- "$3"
    eval "set --; $1"
    exit
  fi
fi
if command -v setsid >/dev/null 2>&1; then sf_sid=setsid; else sf_sid=; fi
# The loop kills a command by its group: without setsid it has none of its own.
if [ -z "$sf_sid" ]; then sf_dl=; fi
kill_tree() {
  kill -s STOP "$1" 2>/dev/null || return 0
  for sf_c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do kill_tree "$sf_c" "$2"; done
  kill -s "$2" "$1" 2>/dev/null
  kill -s CONT "$1" 2>/dev/null
  return 0
}
kill_cmd() {
  if [ -n "$sf_sid" ]; then
    kill -s "$1" -- "-$sf_pid" 2>/dev/null || kill -s "$1" "-$sf_pid" 2>/dev/null || :
  else
    kill_tree "$sf_pid" "$1"
  fi
}
$sf_sid /bin/sh -c "$3" </dev/null &
sf_pid=$!
# Torn down mid-command: take the command's tree along (it is in its own session).
trap 'kill_cmd KILL; rm -f "$sf_s/running.$$"; exit 143' TERM INT HUP
sf_wd=
if [ -n "$sf_dl" ]; then
  printf '%s %s .\n' "$sf_dl" "$sf_pid" >"$sf_s/running.$$"
else
  (
    sleep "$sf_t" & printf '%s\n' "$!" >"$sf_s/sleep.$$"
    wait "$!"
    : >"$sf_s/timeout.$$"
    kill_cmd KILL
  ) </dev/null >/dev/null 2>&1 &
  sf_wd=$!
fi
wait "$sf_pid"
sf_rc=$?
if [ -n "$sf_wd" ]; then
  kill -s KILL "$sf_wd" 2>/dev/null
  wait "$sf_wd" 2>/dev/null
  if [ -f "$sf_s/sleep.$$" ] && read -r sf_w <"$sf_s/sleep.$$"; then kill -s KILL "$sf_w" 2>/dev/null; fi
fi
if [ -n "$sf_sid" ]; then kill_cmd KILL; fi
if [ -f "$sf_s/watchdog" ]; then echo >"$sf_s/activity"; else : >"$sf_s/active"; fi 2>/dev/null
if [ -n "$sf_dl" ]; then
  echo done >"$sf_s/running.$$"
  if [ -f "$sf_s/timeout.$$" ] && read -r sf_x <"$sf_s/timeout.$$" && [ "$sf_x" = "$sf_dl" ]; then exit 124; fi
  exit "$sf_rc"
fi
rm -f "$sf_s/running.$$" "$sf_s/sleep.$$"
if [ -e "$sf_s/timeout.$$" ]; then rm -f "$sf_s/timeout.$$"; exit 124; fi
exit "$sf_rc"
"#;

/// Writes exactly `$4` bytes of stdin to `$2` (relative to working dir `$1`),
/// creating parent dirs, then sets mode `$3`. Reading a known length (not
/// to EOF) lets the caller keep the stream open for the exit status, which
/// `v4.channel.k8s.io` could not do after closing stdin.
const WRITE: &str = r#"set -u
s="${SANDFLEET_STATE_DIR:-/tmp}"
if [ -f "$s/watchdog" ]; then echo >"$s/activity"; else : >"$s/active"; fi 2>/dev/null
cd -- "$1" || exit 125
f=$2
case "$f" in
  */*) mkdir -p -- "${f%/*}" || exit 125 ;;
esac
head -c "$4" >"$f" || exit 125
chmod -- "$3" "$f" || exit 125
n=$(wc -c <"$f") || exit 125
if [ "$(( n + 0 ))" -ne "$4" ]; then
  printf 'short write: %s of %s bytes arrived\n' "$n" "$4" >&2
  exit 125
fi
"#;

/// Prints at most `$3` bytes of `$2` (relative to working dir `$1`).
const READ: &str = r#"set -u
s="${SANDFLEET_STATE_DIR:-/tmp}"
if [ -f "$s/watchdog" ]; then echo >"$s/activity"; else : >"$s/active"; fi 2>/dev/null
cd -- "$1" || exit 125
if [ ! -e "$2" ]; then printf 'no such file\n' >&2; exit 2; fi
if [ ! -f "$2" ]; then printf 'not a regular file\n' >&2; exit 2; fi
head -c "$3" -- "$2"
"#;

/// Creates working dir `$1` (the readiness probe of a new session), and
/// prints how the sandbox takes a claim: `stdin` when its idle loop reads
/// hand-overs from its stdin ([`handover`]), `exec` when the loop runs
/// without, `starting` while the loop has not started yet (it writes
/// `handover` before `watchdog`).
const PREPARE: &str = r#"set -u
s="${SANDFLEET_STATE_DIR:-/tmp}"
if [ -f "$s/watchdog" ]; then echo >"$s/activity"; else : >"$s/active"; fi 2>/dev/null
mkdir -p -- "$1" || exit
if [ ! -f "$s/watchdog" ]; then echo starting
elif [ -f "$s/handover" ] && read -r sf_h <"$s/handover"; then printf '%s\n' "$sf_h"
else echo exec
fi
"#;

/// Takes a warm pool member for one session, without restarting it: makes
/// working dir `$1`, writes the session's env (`$4` bytes of stdin in `$5`
/// lines of `export`, mode 600) where the run wrapper sources it, and hands
/// the idle loop the session's idle timeout `$2` and max lifetime `$3`
/// (seconds from now). A member that was already claimed refuses (exit
/// 125): a sandbox serves one session, and `claimed` is created exclusively
/// (`set -C`; with `true`, a regular builtin, since a failed redirection of
/// `:` ends the shell). Every fork here is on the path of the session's
/// first command, so it forks nothing in the common case: the env comes in
/// through `read` (a builtin; it reads a pipe a byte at a time, so an env
/// of more lines than [`ENV_READ_LINES`] or more bytes than
/// [`ENV_READ_BYTES`] comes through `head -c` instead, `$5` then 0), and
/// `mkdir` runs only for a working dir that does not exist yet. `idle` and
/// `lifetime` are written in place, with no rename: the idle loop skips a
/// file caught between its truncation and its one write.
const CLAIM: &str = r#"set -u
s="${SANDFLEET_STATE_DIR:?}"
if [ -f "$s/watchdog" ]; then echo >"$s/activity"; else : >"$s/active"; fi 2>/dev/null
set -C
if ! true 2>/dev/null >"$s/claimed"; then printf 'this sandbox already serves a session\n' >&2; exit 125; fi
set +C
umask 077
if [ "$5" -gt 0 ]; then
  e=
  n=0
  while [ "$n" -lt "$5" ] && IFS= read -r l; do
    e="$e$l
"
    n=$(( n + 1 ))
  done
  if [ "$n" -ne "$5" ]; then printf 'the env ended after %s of %s lines\n' "$n" "$5" >&2; exit 125; fi
  printf '%s' "$e" >"$s/session.env" || exit 125
elif [ "$4" -gt 0 ]; then
  head -c "$4" >"$s/session.env" || exit 125
fi
if [ ! -d "$1" ]; then mkdir -p -- "$1" || exit 125; fi
printf '%s\n' "$3" >"$s/lifetime" || exit 125
printf '%s\n' "$2" >"$s/idle" || exit 125
"#;

/// An env of at most this many lines reaches the claim wrapper through the
/// `read` builtin; a longer one through `head -c`.
pub const ENV_READ_LINES: usize = 64;

/// An env of at most this many bytes reaches the claim wrapper through the
/// `read` builtin (a system call per byte); a longer one through `head -c`.
pub const ENV_READ_BYTES: usize = 4096;

/// Exits 0 when the sandbox was claimed (the claim wrapper ran), 1 if not.
const CLAIMED: &str = r#"test -e "${SANDFLEET_STATE_DIR:?}/claimed""#;

/// The pod's own command: wait until nobody has talked to the sandbox for
/// `$SANDFLEET_IDLE_SECS` seconds, then exit (the Job completes and the
/// service deletes it). A wrapper marks activity by writing a line to
/// `activity`, which the loop empties again (truncating, where removing
/// would fork `rm` every second of a busy session and make the next mark
/// allocate a new file; wrappers from before `activity` create `active`,
/// which it still removes); a running command keeps a `running.<pid>` file
/// whose process is alive.
/// Once a pool member is claimed, the session's idle timeout (`idle`) and
/// remaining lifetime (`lifetime`, counted from the claim) take over from
/// the pool's values (a value read while the claim wrapper writes it, an
/// empty file, is skipped until the next second).
///
/// The loop is also the run wrapper's watchdog (see [`RUN`]): it leaves its
/// pid in `watchdog`, and a `running.<pid>` that holds `deadline pgid .`
/// (the `.` tells a complete line from one caught mid-write) gets its
/// command's group killed once `/proc/uptime` has passed the deadline, the
/// deadline written to `timeout.<pid>` first. A wrapper that has finished
/// writes `done` there instead (so a pid used again is never taken for a
/// running command); for a command that was its own wrapper, the loop
/// does, once it sees the pid gone, after killing what is left of its group
/// (Linux hands out no pid that still names a process group, so until
/// then the group is the command's). The loop removes finished files
/// sixteen at a time, with one `rm`.
///
/// It waits its second with `read -t 1` on a FIFO in the state dir that
/// nobody writes, where the shell's `read` has `-t` (bash, busybox ash, ksh,
/// zsh), and with `sleep 1` elsewhere (dash): the first wait tells which,
/// by `/proc/uptime`. With `read -t` the loop forks only that `rm`; else
/// one `sleep` a second, which costs more than all the rest of the loop (a
/// process start in a VM traps on glibc's CPU-feature probes). Its pod
/// starts it through [`IDLE_LAUNCH`], under bash where the image has bash.
///
/// A warm pool member's loop running under bash with a pipe for its stdin
/// (the pod's `stdin: true`) waits its second on its stdin instead, and
/// takes its claim from there (`handover`; [`handover_message`] is what a
/// claimer writes through `pods/attach`): it checks the numbers, reads the
/// working dir and the env's lines (5 s for each at most), creates
/// `claimed` exclusively as the claim exec ([`claim_argv`]) does, so of the
/// two ways one claim at most gets through, writes what that exec writes,
/// and answers `sandfleet-claim NONCE ok` (or why not) on its stdout, where
/// the claimer's attach reads it. No process is started for it (`mkdir`
/// only for a working dir that does not exist yet). It says so in
/// `handover` before it writes `watchdog`, for the readiness probe
/// ([`prepare_argv`]). A line arriving cuts its second short; a stdin that
/// ends puts it back on its FIFO.
pub const IDLE_LOOP: &str = r#"set -u
s="${SANDFLEET_STATE_DIR:?}"
idle="${SANDFLEET_IDLE_SECS:?}"
trap 'exit 0' TERM INT
echo >"$s/activity"
# A pool member started with a pipe for stdin takes its session's values
# from it, under bash (`read -t`): see `handover`. Said before `watchdog`.
hand=
if [ -n "${BASH_VERSION:-}" ] && [ -p /dev/stdin ]; then
  um=$(umask)
  hand=1
  echo stdin >"$s/handover"
fi
printf '%s\n' "$$" >"$s/watchdog"
handover() {
  r=ok
  for v in "$2" "$3" "$4"; do case $v in ''|*[!0-9]*) r=bad ;; esac; done
  wd=
  e=
  k=0
  if [ "$r" = ok ]; then
    IFS= read -t 5 -r wd || r=short
    while [ "$r" = ok ] && [ "$k" -lt "$4" ]; do
      l=
      if IFS= read -t 5 -r l; then e="$e$l
"; k=$(( k + 1 )); else r=short; fi
    done
  fi
  if [ "$r" = ok ]; then
    set -C
    if ! true 2>/dev/null >"$s/claimed"; then r=refused; fi
    set +C
  fi
  if [ "$r" = ok ]; then
    umask 077
    { printf '%s' "$e" >"$s/session.env" && { [ -d "$wd" ] || mkdir -p -- "$wd"; } \
      && printf '%s\n' "$3" >"$s/lifetime" && printf '%s\n' "$2" >"$s/idle"; } 2>/dev/null || r=failed
    umask "$um"
    echo >"$s/activity"
  fi
  printf 'sandfleet-claim %s %s\n' "$1" "$r"
}
wait_hand() {
  hl=
  IFS= read -t 1 -r hl
  case $? in
    0) ;;
    1) hand=; tick; return ;;
    *)
      # The second ended mid-line (a hand-over in several writes): the rest follows.
      [ -n "$hl" ] || return
      hr=
      IFS= read -t 5 -r hr || return
      hl=$hl$hr ;;
  esac
  set -f
  set -- $hl
  set +f
  if [ "${1:-}" = sandfleet-claim ]; then handover "${2:-}" "${3:-}" "${4:-}" "${5:-}"; fi
}
centis() {
  c=
  read -r c _ 2>/dev/null </proc/uptime
  case $c in [1-9]*.[0-9][0-9]) c=${c%.*}${c#*.} ;; *) c=0 ;; esac
}
tick() {
  tick() { sleep 1; }
  # Tried in a subshell first: a failed redirection of `exec` ends the shell.
  { [ -p "$s/tick" ] || mkfifo -m 600 "$s/tick"; } 2>/dev/null && (exec 3<>"$s/tick") 2>/dev/null || { sleep 1; return; }
  exec 3<>"$s/tick"
  centis
  t0=$c
  { read -t 1 _ <&3; } 2>/dev/null
  centis
  if [ "$t0" -gt 0 ] && [ $(( c - t0 )) -ge 90 ]; then tick() { read -t 1 _ <&3; }; else exec 3<&-; sleep 1; fi
}
n=0
life=0
max=
while [ "$n" -lt "$idle" ]; do
  if [ -n "$hand" ]; then wait_hand; else tick; fi
  if [ -f "$s/idle" ] && read -r v <"$s/idle"; then idle=$v; fi
  if [ -f "$s/lifetime" ]; then
    if read -r v <"$s/lifetime"; then max=$v; fi
    life=$(( life + 1 ))
    if [ -n "$max" ] && [ "$life" -ge "$max" ]; then exit 0; fi
  fi
  busy=
  now=
  set --
  for r in "$s"/running.* "$s"/timeout.*; do
    [ -e "$r" ] || continue
    p=${r##*.}
    dl=
    pg=
    end=
    case $r in */running.*) read -r dl pg end 2>/dev/null <"$r" ;; esac
    if [ "$dl" != done ] && [ "$end" = . ] && ! kill -0 "$p" 2>/dev/null; then
      # A command that ended: what it left in its group goes, once.
      kill -s KILL -- "-$pg" 2>/dev/null || kill -s KILL "-$pg" 2>/dev/null
      echo done >"$r"
      dl=done
    fi
    if [ "$dl" = done ] || ! kill -0 "$p" 2>/dev/null; then set -- "$@" "$r"; continue; fi
    case $r in */timeout.*) continue ;; esac
    busy=1
    if [ "$end" = . ]; then
      if [ -z "$now" ] && read -r now _ 2>/dev/null </proc/uptime; then now=${now%.*}; fi
      if [ -n "$now" ] && [ "$now" -ge "$dl" ]; then
        printf '%s\n' "$dl" >"$s/timeout.$p"
        kill -s KILL -- "-$pg" 2>/dev/null || kill -s KILL "-$pg" 2>/dev/null
      fi
    fi
  done
  if [ "$#" -ge 16 ]; then rm -f -- "$@"; fi
  a=$busy
  if [ -s "$s/activity" ]; then : >"$s/activity"; a=1; fi
  # A wrapper older than `activity` marks `active`.
  if [ -e "$s/active" ]; then rm -f "$s/active"; a=1; fi
  if [ -n "$a" ]; then n=0; else n=$(( n + 1 )); fi
done
"#;

/// Starts the idle loop, `$1`, under bash when this shell is not bash and
/// the image has it (bash's `read -t` spares the loop a `sleep` a second;
/// see [`IDLE_LOOP`]), else under this shell. `command -v` is a builtin: a
/// shell that stays costs no process.
pub const IDLE_LAUNCH: &str = r#"if [ -z "${BASH_VERSION:-}" ] && command -v bash >/dev/null 2>&1; then exec bash -c "$1" sandfleet-session; fi
eval "$1""#;

/// The session pod's command as the shell gets it: [`IDLE_LAUNCH`] with the
/// loop as its argument. (A pod carries it escaped for Kubernetes'
/// `$(VAR)` expansion.)
pub fn idle_argv() -> Vec<String> {
    argv_named(IDLE_LAUNCH, "sandfleet-session", &[IDLE_LOOP])
}

/// `["/bin/sh", "-c", WRAPPER, "sandfleet", args...]`.
fn argv(script: &str, args: &[&str]) -> Vec<String> {
    argv_named(script, ARGV0, args)
}

/// `["/bin/sh", "-c", WRAPPER, argv0, args...]`.
fn argv_named(script: &str, argv0: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        script.to_owned(),
        argv0.to_owned(),
    ];
    v.extend(args.iter().map(|a| (*a).to_owned()));
    v
}

/// Whole seconds of the watchdog: rounded up, at least one.
pub fn timeout_secs(timeout: std::time::Duration) -> u64 {
    let s = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    s.max(1)
}

/// The argv running `command` in `workdir` with `timeout`.
/// Its `$0` is `/bin/sh`: a command the wrapper evaluates itself sees what
/// it would see under `/bin/sh -c`, in `$0` and in the shell's messages.
pub fn run_argv(workdir: &str, command: &str, timeout: std::time::Duration) -> Vec<String> {
    argv_named(
        RUN,
        "/bin/sh",
        &[workdir, &timeout_secs(timeout).to_string(), command],
    )
}

/// The argv writing `len` bytes of stdin to `path` with `mode` (octal digits).
pub fn write_argv(workdir: &str, path: &str, mode: &str, len: usize) -> Vec<String> {
    argv(WRITE, &[workdir, path, mode, &len.to_string()])
}

/// The argv printing at most `limit` bytes of `path`.
pub fn read_argv(workdir: &str, path: &str, limit: usize) -> Vec<String> {
    argv(READ, &[workdir, path, &limit.to_string()])
}

/// The argv creating the working dir.
pub fn prepare_argv(workdir: &str) -> Vec<String> {
    argv(PREPARE, &[workdir])
}

/// The argv claiming a pool member for a session (stdin: `env`, the text
/// of [`env_file`]).
pub fn claim_argv(
    workdir: &str,
    idle: std::time::Duration,
    lifetime: std::time::Duration,
    env: &str,
) -> Vec<String> {
    // Every line of an env file ends with a newline, so `read` takes it whole.
    let lines = env.bytes().filter(|b| *b == b'\n').count();
    let by_read = lines <= ENV_READ_LINES && env.len() <= ENV_READ_BYTES;
    argv(
        CLAIM,
        &[
            workdir,
            &idle.as_secs().max(1).to_string(),
            &lifetime.as_secs().max(1).to_string(),
            &env.len().to_string(),
            &(if by_read { lines } else { 0 }).to_string(),
        ],
    )
}

/// What a claimer writes to a pool member's stdin to hand it a session
/// (the idle loop's `handover`, see [`IDLE_LOOP`]): a header line
/// `sandfleet-claim NONCE IDLE LIFETIME LINES`, the working dir on a line of
/// its own, then the `LINES` lines of `env` ([`env_file`]). The loop answers
/// on its stdout with `sandfleet-claim NONCE ok` (or `refused`: it already
/// serves a session; `short`, `bad`, `failed`). `None` when the values do not
/// fit that path: a working dir with a newline, or an env of more lines
/// than [`ENV_READ_LINES`] or bytes than [`ENV_READ_BYTES`] (the loop reads
/// its stdin a byte at a time); those take the claim exec ([`claim_argv`]).
pub fn handover_message(
    nonce: &str,
    workdir: &str,
    idle: std::time::Duration,
    lifetime: std::time::Duration,
    env: &str,
) -> Option<String> {
    let lines = env.bytes().filter(|b| *b == b'\n').count();
    if workdir.contains('\n') || lines > ENV_READ_LINES || env.len() > ENV_READ_BYTES {
        return None;
    }
    Some(format!(
        "{HANDOVER_TAG} {nonce} {} {} {lines}\n{workdir}\n{env}",
        idle.as_secs().max(1),
        lifetime.as_secs().max(1),
    ))
}

/// What the readiness probe ([`prepare_argv`]) prints while the sandbox's
/// idle loop has not started yet.
pub const LOOP_STARTING: &str = "starting";

/// The first word of a hand-over and of the loop's answer to it.
pub const HANDOVER_TAG: &str = "sandfleet-claim";

/// The argv asking whether the sandbox was claimed (exit 0) or not (1).
pub fn claimed_argv() -> Vec<String> {
    argv(CLAIMED, &[])
}

/// A session's env as a file the run wrapper sources: one `export` line per
/// variable, each value single-quoted (a `'` becomes `'\''`), so a value is
/// never parsed as shell. Names are identifiers ([`super::SessionSpec::validate`]).
pub fn env_file(env: &std::collections::BTreeMap<String, String>) -> String {
    env.iter()
        .map(|(k, v)| format!("export {k}='{}'\n", v.replace('\'', r"'\''")))
        .collect()
}

/// Whether an exit code means the watchdog killed the command: 124 from a
/// wrapper that outlived it, 137 (SIGKILL) from a wrapper that was the
/// command (see [`RUN`]), either only once the timeout had passed.
pub fn timed_out(
    exit_code: i32,
    elapsed: std::time::Duration,
    timeout: std::time::Duration,
) -> bool {
    (exit_code == TIMEOUT_EXIT || exit_code == KILLED_EXIT)
        && elapsed.as_secs_f64() >= timeout_secs(timeout) as f64
}

/// Keeps at most `limit` bytes of a stream, remembering whether more came.
#[derive(Debug, Default)]
pub(crate) struct Bounded {
    pub(crate) bytes: Vec<u8>,
    pub(crate) truncated: bool,
    limit: usize,
}

impl Bounded {
    pub(crate) fn new(limit: usize) -> Bounded {
        Bounded {
            bytes: Vec::new(),
            truncated: false,
            limit,
        }
    }

    /// The bytes kept, as text without surrounding white space (a
    /// wrapper's one-line answer or error message).
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).trim().to_owned()
    }

    pub(crate) fn push(&mut self, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.bytes.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.bytes
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timeouts_round_up_to_whole_seconds() {
        assert_eq!(timeout_secs(Duration::from_millis(1)), 1);
        assert_eq!(timeout_secs(Duration::from_millis(1500)), 2);
        assert_eq!(timeout_secs(Duration::from_secs(3)), 3);
        assert_eq!(timeout_secs(Duration::ZERO), 1);
    }

    #[test]
    fn a_command_exiting_124_early_is_not_a_timeout() {
        let t = Duration::from_secs(5);
        assert!(!timed_out(124, Duration::from_millis(20), t));
        assert!(timed_out(124, Duration::from_millis(5_010), t));
        assert!(timed_out(137, Duration::from_secs(6), t));
        assert!(!timed_out(137, Duration::from_millis(20), t));
        assert!(!timed_out(1, Duration::from_secs(6), t));
    }

    #[test]
    fn user_values_are_arguments_never_script_text() {
        let evil = "$(touch /tmp/pwned) `id` ; rm -rf /";
        let v = run_argv(evil, evil, Duration::from_secs(1));
        assert_eq!(v[2], RUN, "the script is the constant");
        assert_eq!(&v[4..], &[evil.to_owned(), "1".into(), evil.to_owned()]);
        let w = write_argv(evil, evil, "644", 3);
        assert_eq!(w[2], WRITE);
    }

    #[test]
    fn a_small_env_is_read_by_lines_and_a_large_one_by_head() {
        let mut env = std::collections::BTreeMap::new();
        env.insert("A".to_owned(), "one\ntwo".to_owned());
        env.insert("B".to_owned(), "it's".to_owned());
        let claim =
            |text: &str| claim_argv(".", Duration::from_secs(60), Duration::from_secs(600), text);
        let text = env_file(&env);
        let v = claim(&text);
        assert_eq!(v[2], CLAIM);
        assert_eq!(v[7], text.len().to_string());
        assert_eq!(v[8], "3", "a value's newline makes a line of its own");
        env.insert("BIG".to_owned(), "x".repeat(ENV_READ_BYTES));
        let text = env_file(&env);
        let v = claim(&text);
        assert_eq!(v[7], text.len().to_string());
        assert_eq!(v[8], "0", "past the limit, head -c reads the bytes");
    }

    #[test]
    fn bounded_keeps_the_head_and_flags_the_rest() {
        let mut b = Bounded::new(4);
        b.push(b"ab");
        b.push(b"cdef");
        assert_eq!(b.bytes, b"abcd");
        assert!(b.truncated);
    }
}
