//! Where log lines go: stderr, written so that a closed stderr never
//! panics or stalls the process, with colour only for a person at a terminal.

use std::io::{IsTerminal, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Writes to the process's stderr and swallows every write error.
///
/// A log line that cannot be written (the reader of a `2>&1 | head -1` pipe
/// went away: `EPIPE`) is dropped. The alternatives are worse: `eprintln!`
/// panics on a closed stderr, and tracing-subscriber reports a failed write
/// with `eprintln!` too, so one closed pipe would panic whichever thread
/// logged next — including a client library's I/O thread, which leaves its
/// caller waiting forever.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuietStderr;

impl Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Claim the whole buffer written either way, so `write_all` ends.
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for QuietStderr {
    type Writer = QuietStderr;
    fn make_writer(&'a self) -> QuietStderr {
        QuietStderr
    }
}

/// Prints one line to stderr, like `eprintln!` but without its panic when
/// stderr is closed. For the few messages a binary writes outside `tracing`
/// (its final error, "received SIGTERM").
pub fn eprint_line(line: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Whether log lines get ANSI colour: only when stderr is a terminal and
/// `NO_COLOR` (<https://no-color.org>) is unset or empty. Pod logs, files and
/// pipes get plain text.
pub fn use_colour() -> bool {
    colour_wanted(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// [`use_colour`] as a pure decision: `stderr_is_terminal` and the value of
/// `NO_COLOR` in, yes or no out.
pub fn colour_wanted(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::colour_wanted;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(true, None));
        assert!(
            colour_wanted(true, Some(OsStr::new(""))),
            "empty NO_COLOR is unset"
        );
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(
            !colour_wanted(false, None),
            "pipes and files get plain text"
        );
    }
}
