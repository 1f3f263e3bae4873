//! Human or JSON output on stdout; diagnostics go to stderr.
//!
//! A closed stdout (the reader of `| head -1` went away) ends the command
//! quietly, as it ends any Unix tool: the failed write, or the pipe's error
//! readiness seen by [`watch_stdout`], cancels [`stdout_closed`], which
//! [`run`](crate::run) ties to the command's shutdown token. Nothing is
//! printed about it and the command exits with its usual status.

use std::io::Write;
use std::sync::LazyLock;

use tokio_util::sync::CancellationToken;

/// Cancelled once stdout's reader is gone; process-wide because stdout is.
static STDOUT_CLOSED: LazyLock<CancellationToken> = LazyLock::new(CancellationToken::new);

/// A token cancelled when stdout is found closed (a write failed with
/// `EPIPE`, or [`watch_stdout`] saw the pipe's reader go away).
pub fn stdout_closed() -> CancellationToken {
    STDOUT_CLOSED.clone()
}

/// Watches stdout in the background and cancels [`stdout_closed`] as soon as
/// the reader of a pipe on stdout goes away, so a command that is waiting
/// (`results tail --follow | head -1` between two results) ends at once
/// rather than at its next write. A pipe's write end reports `POLLERR` once
/// no reader is left; terminals, files and /dev/null never do, so for them
/// the watcher just waits (on a thread of its own, which the process does not
/// wait for on exit).
pub fn watch_stdout() {
    #[cfg(unix)]
    {
        use rustix::event::{PollFd, PollFlags, poll};
        let spawned = std::thread::Builder::new()
            .name("stdout-watch".to_owned())
            .spawn(|| {
                let stdout = std::io::stdout();
                loop {
                    // No events asked for: poll reports only errors and hang-ups.
                    let mut fds = [PollFd::new(&stdout, PollFlags::empty())];
                    match poll(&mut fds, None) {
                        Ok(_) if fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP) => {
                            STDOUT_CLOSED.cancel();
                            return;
                        }
                        // Interrupted by a signal, or woken without an error.
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        // Not pollable (should not happen for an open fd): give up watching.
                        Err(_) => return,
                    }
                }
            });
        // Without the thread, a closed pipe is still noticed at the next write.
        drop(spawned);
    }
}

/// Writes command output: human text by default, one JSON object per line
/// with `--json`.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// True with `--json`.
    pub json: bool,
}

impl Output {
    /// Prints `human` or `json`, whichever the mode asks for.
    pub fn emit(&self, human: impl std::fmt::Display, json: &serde_json::Value) {
        if self.json {
            self.line(json);
        } else {
            self.line(human);
        }
    }

    /// Prints only in human mode.
    pub fn human(&self, human: impl std::fmt::Display) {
        if !self.json {
            self.line(human);
        }
    }

    /// Prints only in JSON mode.
    pub fn json(&self, json: &serde_json::Value) {
        if self.json {
            self.line(json);
        }
    }

    fn line(&self, s: impl std::fmt::Display) {
        if STDOUT_CLOSED.is_cancelled() {
            return;
        }
        let mut out = std::io::stdout().lock();
        let written = writeln!(out, "{s}").and_then(|()| out.flush());
        // A closed pipe (`| head`) ends the command, quietly; other write
        // errors (a full disk) lose this line only.
        if let Err(e) = written
            && e.kind() == std::io::ErrorKind::BrokenPipe
        {
            STDOUT_CLOSED.cancel();
        }
    }
}

/// One line on stderr, like `eprintln!` without its panic when stderr is
/// closed (`2>&1 | head -1`).
pub fn diag(line: impl std::fmt::Display) {
    sandfleet_telemetry::eprint_line(line);
}
