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

/// Exit code of a wrapper that could not do its job (no working dir, write
/// failed); its stderr says why.
pub const SETUP_EXIT: i32 = 125;

/// Runs `$3` with `/bin/sh -c` in working dir `$1`, killing it with its
/// whole process tree after `$2` seconds. Techniques as in the task script
/// ([`crate::script`]): the command gets a session of its own (`setsid`) when
/// the image has it, else the watchdog walks `/proc` to kill its tree; the
/// watchdog's `sleep` is killed through the pid it records. Leftover
/// background children die with the command (a session runs commands one
/// after another; nothing outlives its command).
const RUN: &str = r#"set -u
IFS=' 	
'
s="${SANDFLEET_STATE_DIR:-/tmp}"
: >"$s/active" 2>/dev/null
: >"$s/running.$$" 2>/dev/null
# A claimed pool member's env arrived at claim time (see CLAIM), not in the pod spec.
if [ -f "$s/session.env" ]; then . "$s/session.env"; fi
cd -- "$1" || exit 125
t=$2
if command -v setsid >/dev/null 2>&1; then sid=setsid; else sid=; fi
kill_tree() {
  kill -s STOP "$1" 2>/dev/null || return 0
  for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do kill_tree "$c" "$2"; done
  kill -s "$2" "$1" 2>/dev/null
  kill -s CONT "$1" 2>/dev/null
  return 0
}
kill_cmd() {
  if [ -n "$sid" ]; then
    kill -s "$1" -- "-$pid" 2>/dev/null || kill -s "$1" "-$pid" 2>/dev/null || :
  else
    kill_tree "$pid" "$1"
  fi
}
$sid /bin/sh -c "$3" </dev/null &
pid=$!
# Torn down mid-command: take the command's tree along (it is in its own session).
trap 'kill_cmd KILL; rm -f "$s/running.$$"; exit 143' TERM INT HUP
(
  sleep "$t" & printf '%s\n' "$!" >"$s/watchdog.$$"
  wait "$!"
  : >"$s/timeout.$$"
  kill_cmd KILL
) </dev/null >/dev/null 2>&1 &
wd=$!
wait "$pid"
rc=$?
kill -s KILL "$wd" 2>/dev/null
wait "$wd" 2>/dev/null
if [ -f "$s/watchdog.$$" ] && read -r w <"$s/watchdog.$$"; then kill -s KILL "$w" 2>/dev/null; fi
if [ -n "$sid" ]; then kill_cmd KILL; fi
rm -f "$s/running.$$" "$s/watchdog.$$"
: >"$s/active" 2>/dev/null
if [ -e "$s/timeout.$$" ]; then rm -f "$s/timeout.$$"; exit 124; fi
exit "$rc"
"#;

/// Writes exactly `$4` bytes of stdin to `$2` (relative to working dir `$1`),
/// creating parent dirs, then sets mode `$3`. Reading a known length (not
/// to EOF) lets the caller keep the stream open for the exit status, which
/// `v4.channel.k8s.io` could not do after closing stdin.
const WRITE: &str = r#"set -u
s="${SANDFLEET_STATE_DIR:-/tmp}"
: >"$s/active" 2>/dev/null
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
: >"$s/active" 2>/dev/null
cd -- "$1" || exit 125
if [ ! -e "$2" ]; then printf 'no such file\n' >&2; exit 2; fi
if [ ! -f "$2" ]; then printf 'not a regular file\n' >&2; exit 2; fi
head -c "$3" -- "$2"
"#;

/// Creates working dir `$1` (the readiness probe of a new session).
const PREPARE: &str = r#"set -u
s="${SANDFLEET_STATE_DIR:-/tmp}"
: >"$s/active" 2>/dev/null
mkdir -p -- "$1"
"#;

/// Takes a warm pool member for one session, without restarting it: makes
/// working dir `$1`, writes the session's env (`$4` bytes of stdin, `export`
/// lines, mode 600) where the run wrapper sources it, and hands the idle
/// loop the session's idle timeout `$2` and max lifetime `$3` (seconds from
/// now). A member that was already claimed refuses (exit 125): a sandbox
/// serves one session, and `claimed` is created exclusively (`set -C`; with
/// `true`, a regular builtin, since a failed redirection of `:` ends the
/// shell). It forks only `head` (for a non-empty env) and `mkdir` (for a
/// working dir that does not exist yet): every fork here is on the path of
/// the session's first command. `idle` and `lifetime` are written in place,
/// with no rename: the idle loop skips a file caught between its truncation
/// and its one write.
const CLAIM: &str = r#"set -u
s="${SANDFLEET_STATE_DIR:?}"
: >"$s/active"
set -C
if ! true 2>/dev/null >"$s/claimed"; then printf 'this sandbox already serves a session\n' >&2; exit 125; fi
set +C
umask 077
if [ "$4" -gt 0 ]; then head -c "$4" >"$s/session.env" || exit 125; fi
if [ ! -d "$1" ]; then mkdir -p -- "$1" || exit 125; fi
printf '%s\n' "$3" >"$s/lifetime" || exit 125
printf '%s\n' "$2" >"$s/idle" || exit 125
"#;

/// Exits 0 when the sandbox was claimed (the claim wrapper ran), 1 if not.
const CLAIMED: &str = r#"test -e "${SANDFLEET_STATE_DIR:?}/claimed""#;

/// The pod's own command: wait until nobody has talked to the sandbox for
/// `$SANDFLEET_IDLE_SECS` seconds, then exit (the Job completes and the
/// service deletes it). A wrapper marks activity by creating `active`; a
/// running command keeps a `running.<pid>` file whose process is alive.
/// Once a pool member is claimed, the session's idle timeout (`idle`) and
/// remaining lifetime (`lifetime`, counted from the claim) take over from
/// the pool's values (a value read while the claim wrapper writes it, an
/// empty file, is skipped until the next second); `read` is a builtin, so
/// the loop forks only `sleep`.
pub const IDLE_LOOP: &str = r#"set -u
s="${SANDFLEET_STATE_DIR:?}"
idle="${SANDFLEET_IDLE_SECS:?}"
trap 'exit 0' TERM INT
: >"$s/active"
n=0
life=0
max=
while [ "$n" -lt "$idle" ]; do
  sleep 1
  if [ -f "$s/idle" ] && read -r v <"$s/idle"; then idle=$v; fi
  if [ -f "$s/lifetime" ]; then
    if read -r v <"$s/lifetime"; then max=$v; fi
    life=$(( life + 1 ))
    if [ -n "$max" ] && [ "$life" -ge "$max" ]; then exit 0; fi
  fi
  busy=
  for r in "$s"/running.*; do
    if [ -e "$r" ] && kill -0 "${r##*.}" 2>/dev/null; then busy=1; fi
  done
  if [ -e "$s/active" ] || [ -n "$busy" ]; then rm -f "$s/active"; n=0; else n=$(( n + 1 )); fi
done
"#;

/// `["/bin/sh", "-c", WRAPPER, "sandfleet", args...]`.
fn argv(script: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        script.to_owned(),
        ARGV0.to_owned(),
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
pub fn run_argv(workdir: &str, command: &str, timeout: std::time::Duration) -> Vec<String> {
    argv(RUN, &[workdir, &timeout_secs(timeout).to_string(), command])
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

/// The argv claiming a pool member for a session (stdin: `env_len` bytes of
/// [`env_file`]).
pub fn claim_argv(
    workdir: &str,
    idle: std::time::Duration,
    lifetime: std::time::Duration,
    env_len: usize,
) -> Vec<String> {
    argv(
        CLAIM,
        &[
            workdir,
            &idle.as_secs().max(1).to_string(),
            &lifetime.as_secs().max(1).to_string(),
            &env_len.to_string(),
        ],
    )
}

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

/// Whether an exit code means the watchdog killed the command.
pub fn timed_out(
    exit_code: i32,
    elapsed: std::time::Duration,
    timeout: std::time::Duration,
) -> bool {
    exit_code == TIMEOUT_EXIT && elapsed.as_secs_f64() >= timeout_secs(timeout) as f64
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
        assert!(!timed_out(137, Duration::from_secs(6), t));
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
    fn bounded_keeps_the_head_and_flags_the_rest() {
        let mut b = Bounded::new(4);
        b.push(b"ab");
        b.push(b"cdef");
        assert_eq!(b.bytes, b"abcd");
        assert!(b.truncated);
    }
}
