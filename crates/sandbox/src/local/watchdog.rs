//! The local executor's side of the script's stdout: the bounded log, and
//! the per-step watchdog that runs here instead of in the script
//! ([`ScriptOptions::executor_watchdog`](crate::script::ScriptOptions::executor_watchdog)).
//!
//! The script prints `::sandfleet:: step <i> begin` just before it starts
//! step `i` and `::sandfleet:: step <i> end ...` after the step's output
//! tail, so the markers on its stdout say which step runs since when. When a
//! step's timeout passes, the watchdog does what the script's own would: it
//! creates `timeout.<i>` in the state directory, sends TERM to the step's
//! process group (its pid is in `step.pid`; the step runs in a session of its
//! own) and KILL after the grace period. That saves a subshell and a `sleep`
//! per step.
//!
//! Marker lines a step prints itself reach stdout only inside its output
//! tail, after the step ended: a forged `begin` arms a clock that the next
//! real `begin` replaces, a forged `end` stops the clock of a step that has
//! already ended. A step can confuse its own timeout that way, not another
//! task's; the task's deadline holds regardless.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process, kill_process_group};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe::Receiver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::script::MARKER;

/// Longest line prefix kept for marker detection: a marker is
/// `::sandfleet:: step <index> begin|end ...`, far shorter.
const MARKER_LINE_BYTES: usize = 64;

/// What the watchdog is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No step runs (or its end was seen).
    Idle,
    /// Step `index` runs; its timeout passes at `until`.
    Running { index: usize, until: Instant },
    /// Step `index` was sent TERM; KILL follows at `until`.
    Stopping {
        index: usize,
        pid: Pid,
        until: Instant,
    },
}

/// What to do now that the watchdog's deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Nothing (the step had already ended).
    None,
    /// Mark step `index` as timed out and send TERM to the group of `pid`.
    Terminate { index: usize, pid: Pid },
    /// Send KILL to the group of `pid`.
    Kill { pid: Pid },
}

/// The per-step watchdog: a state machine fed the script's stdout.
#[derive(Debug)]
pub(crate) struct Watchdog {
    timeouts: Vec<Duration>,
    grace: Duration,
    state: State,
    /// The start of the line being read (up to [`MARKER_LINE_BYTES`]).
    line: Vec<u8>,
}

impl Watchdog {
    /// A watchdog for steps with these timeouts, indexed like the task's steps.
    pub(crate) fn new(timeouts: Vec<Duration>, grace: Duration) -> Watchdog {
        Watchdog {
            timeouts,
            grace,
            state: State::Idle,
            line: Vec::with_capacity(MARKER_LINE_BYTES),
        }
    }

    /// Reads a chunk of the script's stdout, received at `now`.
    pub(crate) fn feed(&mut self, bytes: &[u8], now: Instant) {
        let mut rest = bytes;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            self.take(&rest[..nl]);
            self.on_line(now);
            self.line.clear();
            rest = &rest[nl + 1..];
        }
        self.take(rest);
    }

    fn take(&mut self, part: &[u8]) {
        let room = MARKER_LINE_BYTES.saturating_sub(self.line.len());
        self.line.extend_from_slice(&part[..part.len().min(room)]);
    }

    fn on_line(&mut self, now: Instant) {
        let Some(rest) = self
            .line
            .strip_prefix(MARKER.as_bytes())
            .and_then(|r| r.strip_prefix(b" step "))
        else {
            return;
        };
        let Ok(rest) = std::str::from_utf8(rest) else {
            return;
        };
        let mut words = rest.split(' ');
        let (Some(index), Some(what)) = (
            words.next().and_then(|w| w.parse::<usize>().ok()),
            words.next(),
        ) else {
            return;
        };
        match what {
            "begin" => {
                if let Some(timeout) = self.timeouts.get(index) {
                    self.state = State::Running {
                        index,
                        until: now + *timeout,
                    };
                }
            }
            "end" => {
                let current = match self.state {
                    State::Running { index, .. } | State::Stopping { index, .. } => Some(index),
                    State::Idle => None,
                };
                if current == Some(index) {
                    self.state = State::Idle;
                }
            }
            _ => {}
        }
    }

    /// When the watchdog next needs to act, if it does.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Idle => None,
            State::Running { until, .. } | State::Stopping { until, .. } => Some(until),
        }
    }

    /// The deadline passed at `now`; `step_pid` is what `step.pid` holds
    /// (empty once the script saw the step end).
    pub(crate) fn fire(&mut self, now: Instant, step_pid: Option<Pid>) -> Action {
        match self.state {
            State::Running { index, .. } => match step_pid {
                Some(pid) => {
                    self.state = State::Stopping {
                        index,
                        pid,
                        until: now + self.grace,
                    };
                    Action::Terminate { index, pid }
                }
                None => {
                    self.state = State::Idle;
                    Action::None
                }
            },
            State::Stopping { pid, .. } => {
                self.state = State::Idle;
                Action::Kill { pid }
            }
            State::Idle => Action::None,
        }
    }
}

/// The script's stdout as read so far: at most `cap` bytes are kept.
#[derive(Debug, Default)]
pub(crate) struct Log {
    pub(crate) bytes: Vec<u8>,
    /// True when more than the cap arrived.
    pub(crate) cut: bool,
}

impl Log {
    fn push(&mut self, chunk: &[u8], cap: usize) {
        let room = cap.saturating_sub(self.bytes.len());
        if chunk.len() > room {
            self.cut = true;
        }
        self.bytes
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
}

/// Reads the script's stdout until end of file, or until `stop` fires: then
/// what is in the pipe, without waiting for end of file. Keeps `cap` bytes
/// and acts as the watchdog of the steps. `state` is the script's state
/// directory.
///
/// The executor fires `stop` once the script has exited: everything it
/// printed is in the pipe by then, while end of file would also wait for
/// every killed process of its group that inherited the pipe (the parent
/// watcher) to be scheduled and exit.
pub(crate) async fn pump(
    mut out: Receiver,
    cap: usize,
    mut watchdog: Option<Watchdog>,
    state: PathBuf,
    stop: CancellationToken,
) -> Log {
    enum Next {
        Read(std::io::Result<usize>),
        Fire,
        Stop,
    }
    let mut log = Log::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let deadline = watchdog.as_ref().and_then(Watchdog::deadline);
        let next = tokio::select! {
            // Cancel-safe: a read that loses the race has read nothing.
            r = out.read(&mut buf) => Next::Read(r),
            () = sleep_until(deadline), if deadline.is_some() => Next::Fire,
            () = stop.cancelled() => Next::Stop,
        };
        match next {
            Next::Read(Ok(0) | Err(_)) => return log,
            Next::Read(Ok(n)) => {
                log.push(&buf[..n], cap);
                if let Some(w) = watchdog.as_mut() {
                    w.feed(&buf[..n], Instant::now());
                }
            }
            Next::Fire => {
                if let Some(w) = watchdog.as_mut() {
                    act(
                        w.fire(Instant::now(), read_pid(&state.join("step.pid"))),
                        &state,
                    );
                }
            }
            Next::Stop => {
                // Plain non-blocking reads until the pipe is empty: tokio's
                // `try_read` trusts readiness the reactor may not have seen yet.
                use std::io::Read;
                let Ok(fd) = out.into_nonblocking_fd() else {
                    return log;
                };
                let mut pipe = std::fs::File::from(fd);
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.push(&buf[..n], cap);
                }
                return log;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn act(action: Action, state: &Path) {
    match action {
        Action::None => {}
        Action::Terminate { index, pid } => {
            // Before the signal: the script reads it once the step is gone.
            let _ = std::fs::File::create(state.join(format!("timeout.{index}")));
            signal_step(pid, Signal::TERM);
        }
        Action::Kill { pid } => signal_step(pid, Signal::KILL),
    }
}

/// Signals the step's process group; the step itself when it has no group
/// yet (the subshell that is about to `exec setsid`).
fn signal_step(pid: Pid, signal: Signal) {
    if kill_process_group(pid, signal).is_err() {
        let _ = kill_process(pid, signal);
    }
}

pub(crate) fn read_pid(path: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(path).ok()?;
    Pid::from_raw(text.trim().parse().ok()?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn pid(n: i32) -> Pid {
        Pid::from_raw(n).unwrap()
    }

    fn dog() -> Watchdog {
        Watchdog::new(
            vec![Duration::from_secs(5), Duration::from_secs(30)],
            Duration::from_secs(2),
        )
    }

    #[test]
    fn a_step_past_its_timeout_gets_term_then_kill_after_the_grace() {
        let t0 = Instant::now();
        let mut w = dog();
        assert_eq!(w.deadline(), None);
        // A marker split across reads.
        w.feed(b"::sandfleet:: step 0 be", t0);
        w.feed(b"gin\n", t0);
        assert_eq!(w.deadline(), Some(t0 + Duration::from_secs(5)));
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(
            w.fire(t1, Some(pid(42))),
            Action::Terminate {
                index: 0,
                pid: pid(42)
            }
        );
        assert_eq!(w.deadline(), Some(t1 + Duration::from_secs(2)));
        assert_eq!(w.fire(t1, Some(pid(42))), Action::Kill { pid: pid(42) });
        assert_eq!(w.deadline(), None);
    }

    #[test]
    fn a_step_that_ends_in_time_disarms_it() {
        let t0 = Instant::now();
        let mut w = dog();
        w.feed(b"::sandfleet:: step 0 begin\nsome output\n", t0);
        w.feed(
            b"::sandfleet:: step 0 end 0 12 ok\n::sandfleet:: step 1 begin\n",
            t0,
        );
        // Step 1's own timeout, from its begin.
        assert_eq!(w.deadline(), Some(t0 + Duration::from_secs(30)));
        w.feed(b"::sandfleet:: step 1 end 1 40 fail\n", t0);
        assert_eq!(w.deadline(), None);
    }

    #[test]
    fn a_step_already_gone_at_its_timeout_is_left_alone() {
        let t0 = Instant::now();
        let mut w = dog();
        w.feed(b"::sandfleet:: step 0 begin\n", t0);
        assert_eq!(w.fire(t0 + Duration::from_secs(5), None), Action::None);
        assert_eq!(w.deadline(), None);
    }

    #[test]
    fn markers_in_step_output_do_not_outlast_the_next_real_begin() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut w = dog();
        w.feed(b"::sandfleet:: step 0 begin\n", t0);
        // Step 0's tail forges a begin of step 1 and a long line.
        let long = vec![b'x'; 10_000];
        w.feed(&long, t0);
        w.feed(
            b"\n::sandfleet:: step 1 begin\n::sandfleet:: step 0 end 0 3 ok\n",
            t0,
        );
        w.feed(b"::sandfleet:: step 1 begin\n", t1);
        assert_eq!(w.deadline(), Some(t1 + Duration::from_secs(30)));
        // Unknown steps and other lines arm nothing.
        let mut w = dog();
        w.feed(
            b"::sandfleet:: step 7 begin\nx ::sandfleet:: step 0 begin\n",
            t0,
        );
        assert_eq!(w.deadline(), None);
    }

    #[test]
    fn the_log_keeps_its_cap_and_says_it_was_cut() {
        let mut log = Log::default();
        log.push(b"0123456789", 16);
        assert!(!log.cut);
        log.push(b"0123456789", 16);
        assert_eq!(log.bytes.len(), 16);
        assert!(log.cut);
    }
}
