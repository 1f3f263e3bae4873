//! `sandfleet task validate FILE...`: the checks `enqueue` makes, without
//! publishing anything or needing a broker.

use std::io::Read;
use std::path::Path;

use sandfleet_proto::{FieldError, RejectReason, Task};
use sandfleet_settings::Settings;
use serde_json::json;

use crate::args::{TaskCommand, ValidateArgs};
use crate::exit::{CliError, CliResult, Exit};
use crate::output::Output;

/// Runs a `task` subcommand.
pub fn run(cmd: &TaskCommand, settings: &Settings, out: Output) -> CliResult<Exit> {
    match cmd {
        TaskCommand::Validate(a) => validate(a, settings, out),
    }
}

/// Why a task file would be refused: every problem found, one per entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The field (`steps[0].run`), or `-` for the message as a whole.
    pub path: String,
    /// The rule's short name (`max_len`, `malformed_json`, `deadline_too_long`).
    pub rule: String,
    /// What is wrong.
    pub message: String,
}

impl From<&FieldError> for Problem {
    fn from(e: &FieldError) -> Problem {
        Problem {
            path: e.path.clone(),
            rule: e.rule.to_owned(),
            message: e.message.clone(),
        }
    }
}

/// Checks one task document the way intake does (size, JSON, schema version,
/// structure, every field rule, the consumer-timeout budget): the id of a
/// valid task, or every problem found.
pub fn check(bytes: &[u8], settings: &Settings) -> Result<Task, Vec<Problem>> {
    let limits = &settings.limits;
    // decode_task stops at the first kind of problem (a message that is not
    // JSON has no fields to check); past the structure, validate_intake
    // lists every field rule and the budget together.
    match sandfleet_proto::decode_task(bytes, limits) {
        Ok(_) => {}
        Err(RejectReason::Invalid { errors, .. })
            if !errors.errors().iter().any(|e| e.rule == "structure") => {}
        Err(RejectReason::Invalid { errors, .. }) => {
            return Err(errors.errors().iter().map(Problem::from).collect());
        }
        Err(other) => {
            return Err(vec![Problem {
                path: "-".to_owned(),
                rule: other.code().to_owned(),
                message: other.to_string(),
            }]);
        }
    }
    let task: Task = serde_json::from_slice(bytes).map_err(|e| {
        vec![Problem {
            path: "-".to_owned(),
            rule: "structure".to_owned(),
            message: e.to_string(),
        }]
    })?;
    sandfleet_proto::validate_intake(&task, limits).map_err(|errors| {
        errors
            .errors()
            .iter()
            .map(Problem::from)
            .collect::<Vec<_>>()
    })?;
    Ok(task)
}

fn read(path: &Path) -> CliResult<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| CliError::Usage(format!("stdin: {e}")))?;
        Ok(buf)
    } else {
        std::fs::read(path).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
    }
}

fn validate(a: &ValidateArgs, settings: &Settings, out: Output) -> CliResult<Exit> {
    let mut invalid = 0usize;
    for path in &a.files {
        let name = path.display().to_string();
        let bytes = read(path)?;
        match check(&bytes, settings) {
            Ok(task) => out.emit(
                format!("{name}: valid (task {})", task.id),
                &json!({"file": name, "valid": true, "task_id": task.id}),
            ),
            Err(problems) => {
                invalid += 1;
                let mut human = format!(
                    "{name}: invalid ({} problem{})",
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" }
                );
                for p in &problems {
                    human.push_str(&format!("\n  {}: {} ({})", p.path, p.message, p.rule));
                }
                let errors: Vec<_> = problems
                    .iter()
                    .map(|p| json!({"path": p.path, "rule": p.rule, "message": p.message}))
                    .collect();
                out.emit(
                    human,
                    &json!({"file": name, "valid": false, "errors": errors}),
                );
            }
        }
    }
    if invalid == 0 {
        Ok(Exit::Ok)
    } else {
        Err(CliError::Usage(format!(
            "{invalid} of {} task files are invalid",
            a.files.len()
        )))
    }
}
