//! `sandfleet cancel TASK_ID...`: record a cancel of each task (confirmed by
//! the broker) on the cancellations stream every worker reads.

use sandfleet_gateway::TaskSink;
use sandfleet_gateway::sink::CancelAnswer;
use sandfleet_proto::TaskId;
use sandfleet_settings::Settings;
use serde_json::json;

use crate::args::CancelArgs;
use crate::exit::{CliError, CliResult, Exit};
use crate::output::Output;

/// Cancels every task given; one line per task. Exit 0 when every cancel was
/// recorded, 4 when some task was unknown or already finished (each line
/// says which), 3 when the broker could not confirm.
pub async fn run(a: &CancelArgs, settings: &Settings, out: Output) -> CliResult<Exit> {
    let ids = a
        .task_ids
        .iter()
        .map(|s| {
            s.parse::<TaskId>()
                .map_err(|e| CliError::Usage(format!("{s:?} is not a task id: {e}")))
        })
        .collect::<CliResult<Vec<_>>>()?;
    let by = a.by.clone().unwrap_or_else(|| {
        std::env::var("USER")
            .map(|u| format!("cli:{u}"))
            .unwrap_or_else(|_| "cli".to_owned())
    });
    let sink = crate::broker::connect_sink(settings).await?;
    let mut all_recorded = true;
    for id in ids {
        match sink.cancel(id, &by, &a.reason).await {
            Ok(CancelAnswer::Recorded(cancel_id)) => out.emit(
                format!("{id}: cancel recorded ({cancel_id})"),
                &json!({ "task_id": id, "status": "recorded", "cancel_id": cancel_id }),
            ),
            Ok(CancelAnswer::AlreadyFinished(outcome)) => {
                all_recorded = false;
                out.emit(
                    format!("{id}: already finished ({outcome}); nothing to cancel"),
                    &json!({ "task_id": id, "status": "already_finished", "outcome": outcome }),
                );
            }
            Ok(CancelAnswer::Unknown(why)) => {
                all_recorded = false;
                out.emit(
                    format!("{id}: {why}"),
                    &json!({ "task_id": id, "status": "unknown", "reason": why }),
                );
            }
            Err(e) if e.is_transient() => return Err(CliError::Broker(e.to_string())),
            Err(e) => return Err(CliError::Usage(e.to_string())),
        }
    }
    Ok(if all_recorded {
        Exit::Ok
    } else {
        Exit::Partial
    })
}
