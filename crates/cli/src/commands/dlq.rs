//! `sandfleet dlq list | requeue | purge`.
//!
//! Reading, requeueing and purging are shared with the operator console
//! ([`sandfleet_ops::dlq`]); this module prints and asks for confirmation.
//! Every dead letter has a handle an operator can pass to `--task`: its task
//! id, or for a message without one `raw-` and the first 12 hex digits of the
//! body's SHA-256 ([`raw_handle`]).

use std::io::{BufRead, IsTerminal, Write};

use sandfleet_amqp::Amqp;
pub use sandfleet_ops::dlq::{
    DeadLetter, RAW_HANDLE_PREFIX, describe, give_back, raw_handle, read,
};
use sandfleet_settings::Settings;
use serde_json::json;

use crate::args::{DlqCommand, DlqPurgeArgs, DlqRequeueArgs};
use crate::broker;
use crate::exit::{CliError, CliResult, Exit};
use crate::output::{Output, diag};

/// Runs a `dlq` subcommand.
pub async fn run(cmd: &DlqCommand, settings: &Settings, out: Output) -> CliResult<Exit> {
    let amqp = broker::connect(settings, "cli").await?;
    let topology = broker::topology(settings);
    match cmd {
        DlqCommand::List(a) => list(&amqp, &topology.dead_queue, a.limit, out).await,
        DlqCommand::Requeue(a) => {
            requeue(
                &amqp,
                &topology.dead_queue,
                &topology.tasks_exchange,
                a,
                out,
            )
            .await
        }
        DlqCommand::Purge(a) => purge(&amqp, &topology.dead_queue, a, out).await,
    }
}

async fn list(amqp: &Amqp, queue: &str, limit: usize, out: Output) -> CliResult<Exit> {
    // The messages are handed back before printing: a reader that stops
    // early (`| head`) must not leave them held.
    let letters = sandfleet_ops::dlq::list(amqp, queue, limit).await?;
    if letters.is_empty() {
        out.human(format!("{queue} is empty"));
        return Ok(Exit::Ok);
    }
    let table = table(&letters);
    out.human(&table[0]);
    for (dl, line) in letters.iter().zip(&table[1..]) {
        out.emit(line, &serde_json::to_value(dl).unwrap_or_default());
    }
    Ok(Exit::Ok)
}

/// The `dlq list` table: a header and one line per letter, each column as
/// wide as its widest cell (REASON last, unpadded).
pub fn table(letters: &[DeadLetter]) -> Vec<String> {
    let dash = || "-".to_owned();
    let rows: Vec<[String; 6]> = letters
        .iter()
        .map(|dl| {
            [
                dl.handle.clone(),
                dl.code.clone().unwrap_or_else(dash),
                dl.attempt.map(|a| a.to_string()).unwrap_or_else(dash),
                dl.death_count.map(|a| a.to_string()).unwrap_or_else(dash),
                dl.repository.clone().unwrap_or_else(dash),
                dl.reason.clone().unwrap_or_else(dash),
            ]
        })
        .collect();
    let header = ["TASK", "CODE", "ATTEMPT", "DEATHS", "REPOSITORY", "REASON"].map(str::to_owned);
    let mut width = [0usize; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |r: &[String; 6]| {
        format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:<w4$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
            w4 = width[4],
        )
    };
    std::iter::once(&header)
        .chain(&rows)
        .map(|r| line(r).trim_end().to_owned())
        .collect()
}

async fn requeue(
    amqp: &Amqp,
    queue: &str,
    tasks_exchange: &str,
    a: &DlqRequeueArgs,
    out: Output,
) -> CliResult<Exit> {
    let wanted: Vec<String> = a.tasks.iter().map(|t| t.trim().to_lowercase()).collect();
    let report = sandfleet_ops::dlq::requeue(amqp, queue, tasks_exchange, |dl| {
        a.all || wanted.contains(&dl.handle.to_lowercase())
    })
    .await?;
    for r in &report.requeued {
        out.emit(
            format!("requeued {} as attempt {}", r.letter.handle, r.attempt),
            &json!({"requeued": r.letter.handle, "task_id": r.letter.task_id, "attempt": r.attempt}),
        );
    }
    for (dl, e) in &report.failed {
        diag(format_args!(
            "sandfleet: could not requeue {}: {e}",
            dl.handle
        ));
    }
    for id in wanted.iter().filter(|id| !report.selected.contains(*id)) {
        diag(format_args!(
            "sandfleet: {id} is not in {queue} (`sandfleet dlq list` shows the handles)"
        ));
    }
    let (moved, failed) = (report.requeued.len(), report.failed.len());
    out.emit(
        format!("{moved} requeued, {failed} failed"),
        &json!({"requeued_total": moved, "failed": failed}),
    );
    Ok(match (moved, failed) {
        (_, 0) if moved > 0 || a.all => Exit::Ok,
        (0, 0) => {
            return Err(CliError::Failed(
                "no dead-lettered task matched the selection".to_owned(),
            ));
        }
        (0, _) => Exit::Failure,
        _ => Exit::Partial,
    })
}

async fn purge(amqp: &Amqp, queue: &str, a: &DlqPurgeArgs, out: Output) -> CliResult<Exit> {
    let depth = amqp.queue_depth(queue).await.map_err(broker::amqp_error)?;
    if !a.yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::Usage(
                "refusing to purge without confirmation: pass --yes (stdin is not a terminal)"
                    .to_owned(),
            ));
        }
        eprint!("Delete all {depth} messages in {queue}? Type 'purge' to confirm: ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        if line.trim() != "purge" {
            diag("not purged");
            return Ok(Exit::Failure);
        }
    }
    let purged = sandfleet_ops::dlq::purge(amqp, queue).await?;
    out.emit(
        format!("purged {purged} messages from {queue}"),
        &json!({"purged": purged, "queue": queue}),
    );
    Ok(Exit::Ok)
}
