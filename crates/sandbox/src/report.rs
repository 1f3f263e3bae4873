//! Turns what the script left behind (its summary and its output) into the
//! per-step results, the bounded log tail and the artifacts of an
//! [`Execution`](crate::Execution). Shared by both executors.

use sandfleet_proto::{Artifact, StepResult, Task};

use crate::script::{ParsedLog, StepStatus, Summary};

/// The parts of an execution that come from the script's output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// One result per declared step.
    pub steps: Vec<StepResult>,
    /// The log without artifact sections.
    pub log_tail: String,
    /// True when output was dropped anywhere.
    pub log_truncated: bool,
    /// Artifacts found in the workspace.
    pub artifacts: Vec<Artifact>,
}

/// Builds the report. `log_cut` says the log itself was cut short (it hit
/// the read limit), on top of any per-step truncation the script marked.
pub fn assemble(task: &Task, summary: &Summary, log: &ParsedLog, log_cut: bool) -> Report {
    let steps: Vec<StepResult> = task
        .steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let line = summary.steps.iter().find(|s| s.index == i);
            let output = log.steps.get(&i);
            StepResult {
                name: step.name.clone(),
                exit_code: line.map(|l| l.exit_code),
                duration_ms: line.map_or(0, |l| l.duration_ms),
                timed_out: line.is_some_and(|l| l.status == StepStatus::Timeout),
                skipped: line.is_none() && output.is_none(),
                output_tail: output.map(|o| o.text.clone()).unwrap_or_default(),
                output_truncated: output.is_some_and(|o| o.truncated || !o.complete),
            }
        })
        .collect();
    let artifacts = task
        .artifacts
        .iter()
        .enumerate()
        .filter_map(|(i, path)| {
            let a = log.artifacts.get(&i)?;
            let shown_all = a.complete && a.content.len() as u64 == a.size_bytes;
            let content = match std::str::from_utf8(&a.content) {
                Ok(s) => Some(s.to_owned()),
                // A cut in the middle of a UTF-8 sequence: keep the valid prefix.
                Err(e) if e.error_len().is_none() && !shown_all => {
                    Some(String::from_utf8_lossy(&a.content[..e.valid_up_to()]).into_owned())
                }
                Err(_) => None,
            };
            Some(Artifact {
                path: path.clone(),
                size_bytes: a.size_bytes,
                truncated: !shown_all || content.is_none(),
                content,
            })
        })
        .collect();
    let log_truncated = log_cut || steps.iter().any(|s| s.output_truncated);
    Report {
        steps,
        log_tail: log.text.clone(),
        log_truncated,
        artifacts,
    }
}
