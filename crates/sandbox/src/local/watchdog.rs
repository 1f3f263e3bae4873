//! The local executor's side of the script's stdout: the bounded log, and
//! the per-step watchdog that runs here instead of in the script
//! ([`ScriptOptions::executor_watchdog`](crate::script::ScriptOptions::executor_watchdog)).
//!
//! The script prints `::sandfleet:: step <i> begin` just before it starts
//! step `i` and `::sandfleet:: step <i> end ...` after the step's output
//! tail, so the markers on its stdout say which step runs since when. When a
//! step's timeout passes, the watchdog does what the script's own would: it
//! creates `timeout.<i>` in the state directory, sends TERM to the step's
//! processes and KILL after the grace period. That saves a subshell and a
//! `sleep` per step.
//!
//! The step runs in the sandbox's process group, beside the script (no
//! `setsid`, which would cost a program start per step). Its processes are
//! found in that group ([`step_processes`]): the step (its pid is in
//! `step.pid`), everything below it, and whatever was orphaned in the group
//! (a background child whose parent exited), but not the script and its
//! own children other than the step (its helpers that print a step's output
//! tail). A step that leaves the group on purpose (`setsid`) is out of
//! reach, as it is out of a group kill.
//!
//! Marker lines a step prints itself reach stdout only inside its output
//! tail, after the step ended: a forged `begin` arms a clock that the next
//! real `begin` replaces, a forged `end` stops the clock of a step that has
//! already ended. A step can confuse its own timeout that way, not another
//! task's; the task's deadline holds regardless.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};
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
    /// Mark step `index` as timed out and send TERM to the processes of
    /// the step whose pid is `pid`.
    Terminate { index: usize, pid: Pid },
    /// Send KILL to the processes of the step whose pid is `pid`.
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
/// directory, `group` the sandbox's process group.
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
    group: Option<Pid>,
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
                if let (Some(w), Some(group)) = (watchdog.as_mut(), group) {
                    let action = w.fire(Instant::now(), read_pid(&state.join("step.pid")));
                    // Off the async threads: it reads /proc.
                    let state = state.clone();
                    let _ = tokio::task::spawn_blocking(move || act(action, &state, group)).await;
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

fn act(action: Action, state: &Path, group: Pid) {
    // The script is the group's leader, or its child under bubblewrap.
    let script = read_pid(&state.join("script.pid")).unwrap_or(group);
    match action {
        Action::None => {}
        Action::Terminate { index, pid } => {
            // Before the signal: the script reads it once the step is gone.
            let _ = std::fs::File::create(state.join(format!("timeout.{index}")));
            for p in step_processes(&group_members(group), group, script, pid) {
                let _ = kill_process(p, Signal::TERM);
            }
        }
        Action::Kill { pid } => {
            // Until none is left: a process may have forked between the
            // listing and its signal. Every one is stopped before any is
            // killed: a shell still running while its child dies would
            // report it ("Killed" in the step's log) or start another.
            for _ in 0..16 {
                let targets = step_processes(&group_members(group), group, script, pid);
                if targets.is_empty() {
                    break;
                }
                for p in &targets {
                    let _ = kill_process(*p, Signal::STOP);
                }
                for p in targets {
                    let _ = kill_process(p, Signal::KILL);
                }
            }
        }
    }
}

/// The live processes of process group `group`, each with its parent.
fn group_members(group: Pid) -> HashMap<Pid, Option<Pid>> {
    let mut members = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return members;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
            .and_then(Pid::from_raw)
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
        let mut fields = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_ascii_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|f| f.parse::<i32>().ok());
        let pgrp = fields.next().and_then(|f| f.parse::<i32>().ok());
        // Zombies are dead already (and their parent may never reap them).
        if pgrp == Some(group.as_raw_nonzero().get()) && !matches!(state, Some("Z" | "X") | None) {
            members.insert(pid, ppid.and_then(Pid::from_raw));
        }
    }
    members
}

/// The processes of step `step` among the `members` of the sandbox's group
/// (process → parent): the step, its descendants, and the orphans (a
/// process whose parent is outside the group: a background child whose
/// parent exited), with theirs. Not the group's leader, not the script, and
/// not the script's other children (its helpers, such as the `tail` that
/// prints an output tail) with theirs. After the step has ended, the next
/// step is a child of the script too, so it is never taken for this one.
pub(crate) fn step_processes(
    members: &HashMap<Pid, Option<Pid>>,
    group: Pid,
    script: Pid,
    step: Pid,
) -> Vec<Pid> {
    members
        .keys()
        .copied()
        .filter(|&p| {
            let mut cur = p;
            // Bounded: parent links cannot loop, but a listing is not atomic.
            for _ in 0..=members.len() {
                if cur == step {
                    return true;
                }
                if cur == script || cur == group {
                    return false;
                }
                match members.get(&cur).copied().flatten() {
                    Some(parent) if members.contains_key(&parent) => cur = parent,
                    // The top of an orphaned subtree.
                    _ => return true,
                }
            }
            false
        })
        .collect()
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
    fn a_steps_processes_are_found_in_the_group_but_not_the_script_or_its_helpers() {
        // 10 leads the group (the script); 11 is the step, 12 and 13 below
        // it; 14 an orphan of an earlier step (its parent, 1, is outside the
        // group) with its child 15; 16 the script's own helper and 17 below it.
        let members: HashMap<Pid, Option<Pid>> = [
            (10, 2),
            (11, 10),
            (12, 11),
            (13, 12),
            (14, 1),
            (15, 14),
            (16, 10),
            (17, 16),
        ]
        .into_iter()
        .map(|(p, pp)| (pid(p), Pid::from_raw(pp)))
        .collect();
        let mut found = step_processes(&members, pid(10), pid(10), pid(11));
        found.sort_unstable_by_key(|p| p.as_raw_nonzero());
        assert_eq!(found, [11, 12, 13, 14, 15].map(pid));
        // Under bubblewrap the leader (9) is the script's parent.
        let mut members = members;
        members.insert(pid(9), Pid::from_raw(2));
        members.insert(pid(10), Some(pid(9)));
        let mut found = step_processes(&members, pid(9), pid(10), pid(11));
        found.sort_unstable_by_key(|p| p.as_raw_nonzero());
        assert_eq!(found, [11, 12, 13, 14, 15].map(pid));
        // The step has ended (its children were orphaned) and the next one
        // (18) runs: only the orphans are the old step's.
        members.remove(&pid(11));
        members.insert(pid(18), Some(pid(10)));
        members.insert(pid(12), Pid::from_raw(1));
        let mut found = step_processes(&members, pid(9), pid(10), pid(11));
        found.sort_unstable_by_key(|p| p.as_raw_nonzero());
        assert_eq!(found, [12, 13, 14, 15].map(pid));
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
