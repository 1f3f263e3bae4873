//! `sandfleet results tail`: read the results stream from an offset or a time.

use std::time::Duration;

use chrono::Utc;
use sandfleet_amqp::{Amqp, Consumer, ConsumerOptions, StreamOffset};
use sandfleet_gateway::allowlist::Allowlist;
use sandfleet_proto::{Outcome, TaskResult};
use sandfleet_settings::Settings;
use tokio_util::sync::CancellationToken;

use crate::args::{ResultsCommand, TailArgs};
use crate::broker;
use crate::exit::{CliError, CliResult, Exit};
use crate::output::Output;
use crate::timearg;

/// Runs a `results` subcommand.
pub async fn run(
    cmd: &ResultsCommand,
    settings: &Settings,
    out: Output,
    shutdown: CancellationToken,
) -> CliResult<Exit> {
    match cmd {
        ResultsCommand::Tail(a) => tail(a, settings, out, shutdown).await,
    }
}

/// Parses `--from`.
pub fn parse_offset(s: &str) -> CliResult<StreamOffset> {
    match s {
        "first" => Ok(StreamOffset::First),
        "last" => Ok(StreamOffset::Last),
        "next" => Ok(StreamOffset::Next),
        n => n.parse::<u64>().map(StreamOffset::Offset).map_err(|_| {
            CliError::Usage(format!(
                "--from {n:?}: expected first, last, next or a number"
            ))
        }),
    }
}

/// Parses outcome names (`failed`, `timed_out`, ...).
pub fn parse_outcomes(names: &[String]) -> CliResult<Vec<Outcome>> {
    names
        .iter()
        .map(|n| n.parse::<Outcome>().map_err(CliError::Usage))
        .collect()
}

/// Reads results from the stream, one at a time, until `idle` passes without
/// one (when `idle` is set) or `shutdown` fires. Each decoded result is handed
/// to `each`, which returns false to stop. Undecodable messages are skipped
/// with a warning.
pub async fn read_stream(
    amqp: &Amqp,
    stream: &str,
    offset: StreamOffset,
    idle: Option<Duration>,
    shutdown: &CancellationToken,
    mut each: impl FnMut(TaskResult) -> bool,
) -> CliResult<()> {
    let opts = ConsumerOptions::new(stream, 500)
        .stream_offset(offset)
        .tag("sandfleet-cli-results");
    let mut consumer = Consumer::start(amqp, opts)
        .await
        .map_err(broker::amqp_error)?;
    loop {
        let next = async {
            match idle {
                Some(d) => tokio::time::timeout(d, consumer.next_delivery())
                    .await
                    .ok()
                    .flatten(),
                None => consumer.next_delivery().await,
            }
        };
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            d = next => d,
        };
        let Some(d) = delivery else { break };
        // Stream consumers must ack to receive more (credit); acking does not remove anything.
        let _ = d.ack().await;
        match serde_json::from_slice::<TaskResult>(d.body()) {
            Ok(r) => {
                if !each(r) {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(offset = ?d.stream_offset(), error = %e, "skipping a message that is not a result")
            }
        }
    }
    consumer.cancel();
    Ok(())
}

/// A result as one table row.
pub fn row(r: &TaskResult) -> String {
    let repo = r
        .source
        .as_ref()
        .map(|s| s.repository.as_str())
        .unwrap_or("-");
    let exit = r
        .exit_code
        .map(|c| c.to_string())
        .unwrap_or_else(|| "-".to_owned());
    let state = if r.is_final { "final" } else { "retrying" };
    let err = r.error.as_deref().unwrap_or("");
    format!(
        "{}  {}  {:>2}  {:<17} {:<8} {:>4}  {:<28} {}",
        r.finished_at.format("%Y-%m-%d %H:%M:%S"),
        r.task_id,
        r.attempt,
        r.outcome.as_str(),
        state,
        exit,
        repo,
        err
    )
}

/// The header line of [`row`].
pub fn header() -> String {
    format!(
        "{:<19}  {:<36}  {:>2}  {:<17} {:<8} {:>4}  {:<28} {}",
        "FINISHED", "TASK", "AT", "OUTCOME", "STATE", "EXIT", "REPOSITORY", "ERROR"
    )
}

async fn tail(
    a: &TailArgs,
    settings: &Settings,
    out: Output,
    shutdown: CancellationToken,
) -> CliResult<Exit> {
    let offset = match &a.since {
        Some(s) => StreamOffset::Timestamp(timearg::parse_time(s, Utc::now())?.timestamp()),
        None => parse_offset(&a.from)?,
    };
    let since = a
        .since
        .as_deref()
        .map(|s| timearg::parse_time(s, Utc::now()))
        .transpose()?;
    let outcomes = parse_outcomes(&a.outcomes)?;
    let repos = Allowlist::new(&a.repos);
    let idle = if a.follow {
        None
    } else {
        Some(timearg::parse_duration(&a.idle_timeout)?)
    };
    let amqp = broker::connect(settings, "cli").await?;
    let stream = broker::topology(settings).results_stream;
    out.human(header());
    let mut shown = 0usize;
    let limit = a.limit.unwrap_or(usize::MAX);
    read_stream(&amqp, &stream, offset, idle, &shutdown, |r| {
        // Stream timestamps have chunk resolution: filter precisely here.
        let keep = since.is_none_or(|s| r.finished_at >= s)
            && (outcomes.is_empty() || outcomes.contains(&r.outcome))
            && (a.repos.is_empty()
                || r.source
                    .as_ref()
                    .is_some_and(|s| repos.allows(&s.repository)))
            && (!a.final_only || r.is_final);
        if keep {
            out.emit(row(&r), &serde_json::to_value(&r).unwrap_or_default());
            shown += 1;
        }
        shown < limit
    })
    .await?;
    Ok(Exit::Ok)
}
