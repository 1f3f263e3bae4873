//! Human or JSON output on stdout; diagnostics go to stderr.

use std::io::Write;

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
        let mut out = std::io::stdout().lock();
        // A closed pipe (`| head`) is not an error worth a panic.
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    }
}
