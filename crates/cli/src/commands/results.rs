//! `sandfleet results tail` and `results get`: read the results stream from
//! an offset or a time, filter, and print; `get` gathers one task's attempts.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use chrono::Utc;
use sandfleet_amqp::{Amqp, StreamOffset};
use sandfleet_gateway::allowlist::Allowlist;
use sandfleet_proto::{Outcome, TaskResult};
use sandfleet_settings::Settings;
use tokio_util::sync::CancellationToken;

use crate::args::{GetArgs, ResultsCommand, TailArgs};
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
        ResultsCommand::Get(a) => get(a, settings, out, shutdown).await,
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

// The reader is shared with the operator console.
pub use sandfleet_ops::stream::{Next, StreamReader};

/// The consumer tag of the CLI's stream readers.
const READER_TAG: &str = "sandfleet-cli-results";

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
    let mut reader = StreamReader::open(amqp, stream, offset, READER_TAG).await?;
    while let Next::Result(r) = reader.next(idle, shutdown).await {
        if !each(*r) {
            break;
        }
    }
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

/// Which results `results tail` prints.
#[derive(Debug)]
struct TailFilter {
    since: Option<chrono::DateTime<Utc>>,
    outcomes: Vec<Outcome>,
    repos: Option<Allowlist>,
    tasks: Vec<uuid::Uuid>,
    final_only: bool,
}

impl TailFilter {
    fn keeps(&self, r: &TaskResult) -> bool {
        // Stream timestamps have chunk resolution: filter precisely here.
        self.since.is_none_or(|s| r.finished_at >= s)
            && (self.outcomes.is_empty() || self.outcomes.contains(&r.outcome))
            && self.repos.as_ref().is_none_or(|repos| {
                r.source
                    .as_ref()
                    .is_some_and(|s| repos.allows(&s.repository))
            })
            && (self.tasks.is_empty() || self.tasks.contains(&r.task_id))
            && (!self.final_only || r.is_final)
    }
}

/// Keeps the last `n` items pushed: `results tail --last N`.
#[derive(Debug)]
pub struct LastN<T> {
    n: usize,
    items: VecDeque<T>,
}

impl<T> LastN<T> {
    /// Keeps at most `n`.
    pub fn new(n: usize) -> LastN<T> {
        LastN {
            n,
            items: VecDeque::with_capacity(n.min(1024)),
        }
    }

    /// Adds one, dropping the oldest beyond `n`.
    pub fn push(&mut self, item: T) {
        if self.n == 0 {
            return;
        }
        if self.items.len() == self.n {
            self.items.pop_front();
        }
        self.items.push_back(item);
    }

    /// The kept items, oldest first.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.items.drain(..)
    }
}

async fn tail(
    a: &TailArgs,
    settings: &Settings,
    out: Output,
    shutdown: CancellationToken,
) -> CliResult<Exit> {
    let now = Utc::now();
    let since = a
        .since
        .as_deref()
        .map(|s| timearg::parse_time(s, now))
        .transpose()?;
    let offset = match (since, a.from.as_deref()) {
        (Some(t), _) => StreamOffset::Timestamp(t.timestamp()),
        (None, Some(from)) => parse_offset(from)?,
        // "The last N" needs everything retained before now.
        (None, None) if a.last.is_some() => StreamOffset::First,
        (None, None) => StreamOffset::Last,
    };
    let filter = TailFilter {
        since,
        outcomes: parse_outcomes(&a.outcomes)?,
        repos: (!a.repos.is_empty()).then(|| Allowlist::new(&a.repos)),
        tasks: a.tasks.clone(),
        final_only: a.final_only,
    };
    let idle = timearg::parse_duration(&a.idle_timeout)?;
    let amqp = broker::connect(settings, "cli").await?;
    let stream = broker::topology(settings).results_stream;
    let mut reader = StreamReader::open(&amqp, &stream, offset, READER_TAG).await?;
    out.human(header());
    let limit = a.limit.unwrap_or(usize::MAX);
    let mut shown = 0usize;
    let print = |r: &TaskResult, shown: &mut usize| {
        out.emit(row(r), &serde_json::to_value(r).unwrap_or_default());
        *shown += 1;
    };
    // With --last, collect until caught up (idle), print the last N, then
    // stop or (with --follow) go on printing as they come.
    let mut last = a.last.map(LastN::new);
    loop {
        let wait = if a.follow && last.is_none() {
            None
        } else {
            Some(idle)
        };
        match reader.next(wait, &shutdown).await {
            Next::Result(r) if filter.keeps(&r) => match &mut last {
                Some(buffer) => buffer.push(r),
                None => {
                    print(&r, &mut shown);
                    if shown >= limit {
                        break;
                    }
                }
            },
            Next::Result(_) => {}
            Next::Idle => match last.take() {
                Some(mut buffer) => {
                    for r in buffer.drain() {
                        if shown < limit {
                            print(&r, &mut shown);
                        }
                    }
                    if !a.follow || shown >= limit {
                        break;
                    }
                }
                None => break,
            },
            Next::End => break,
        }
    }
    Ok(Exit::Ok)
}

/// Every attempt of one task, as the stream holds them (deduplicated by
/// attempt: results are delivered at least once).
#[derive(Debug, Default)]
pub struct TaskHistory {
    /// The attempts, in the order they arrived.
    pub attempts: Vec<TaskResult>,
    seen: HashSet<u32>,
}

impl TaskHistory {
    /// Adds a result of the task; false when that attempt was seen already.
    pub fn add(&mut self, r: TaskResult) -> bool {
        if !self.seen.insert(r.attempt) {
            return false;
        }
        self.attempts.push(r);
        true
    }

    /// The final result, once one arrived.
    pub fn final_result(&self) -> Option<&TaskResult> {
        self.attempts.iter().find(|r| r.is_final)
    }
}

/// One attempt for a person: the header line, the error, one line per step.
pub fn describe_attempt(r: &TaskResult) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let state = if r.is_final { "final" } else { "retrying" };
    let exit = r
        .exit_code
        .map(|c| format!(", exit {c}"))
        .unwrap_or_default();
    let _ = write!(
        s,
        "attempt {}: {} ({state}{exit}), finished {}",
        r.attempt,
        r.outcome.as_str(),
        r.finished_at.format("%Y-%m-%d %H:%M:%S UTC"),
    );
    if let Some(started) = r.started_at {
        let took = (r.finished_at - started).num_milliseconds().max(0) as f64 / 1000.0;
        let _ = write!(s, " after {took:.1}s");
    }
    let _ = write!(s, " on {}", r.worker);
    if let Some(sandbox) = &r.sandbox {
        let _ = write!(s, ", sandbox {sandbox}");
    }
    if let Some(e) = &r.error {
        let _ = write!(s, "\n  error: {e}");
    }
    for step in &r.steps {
        let status = if step.skipped {
            "skipped".to_owned()
        } else if step.timed_out {
            "timed out".to_owned()
        } else {
            step.exit_code
                .map(|c| format!("exit {c}"))
                .unwrap_or_else(|| "-".to_owned())
        };
        let _ = write!(
            s,
            "\n  step {:<16} {:<10} {:>8.1}s",
            step.name,
            status,
            step.duration_ms as f64 / 1000.0
        );
    }
    s
}

/// The last `n` lines of `log`.
pub fn last_lines(log: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

async fn get(
    a: &GetArgs,
    settings: &Settings,
    out: Output,
    shutdown: CancellationToken,
) -> CliResult<Exit> {
    let offset = match &a.since {
        Some(s) => StreamOffset::Timestamp(timearg::parse_time(s, Utc::now())?.timestamp()),
        None => StreamOffset::First,
    };
    let idle = timearg::parse_duration(&a.idle_timeout)?;
    let amqp = broker::connect(settings, "cli").await?;
    let stream = broker::topology(settings).results_stream;
    let mut reader = StreamReader::open(&amqp, &stream, offset, READER_TAG).await?;
    let mut history = TaskHistory::default();
    let mut caught_up = false;
    loop {
        // Following: print attempts as they arrive once the past is read.
        let wait = if a.follow && caught_up {
            None
        } else {
            Some(idle)
        };
        match reader.next(wait, &shutdown).await {
            Next::Result(r) if r.task_id == a.task => {
                let r = *r;
                let is_final = r.is_final;
                if history.add(r.clone()) && caught_up {
                    print_attempt(&r, a.log_lines, out);
                }
                if is_final && a.follow {
                    if !caught_up {
                        print_history(&history, a.log_lines, out);
                    }
                    return Ok(Exit::Ok);
                }
            }
            Next::Result(_) => {}
            Next::Idle if !caught_up => {
                caught_up = true;
                print_history(&history, a.log_lines, out);
                if !a.follow {
                    break;
                }
                if history.attempts.is_empty() {
                    out.human(format!("waiting for results of task {}...", a.task));
                }
            }
            Next::Idle | Next::End => break,
        }
    }
    if history.attempts.is_empty() {
        return Err(CliError::Failed(format!(
            "no results for task {} in the stream {stream}{} (results are kept for topology.results_max_age)",
            a.task,
            if a.since.is_some() { " since then" } else { "" }
        )));
    }
    Ok(Exit::Ok)
}

fn print_history(history: &TaskHistory, log_lines: usize, out: Output) {
    for r in &history.attempts {
        print_attempt(r, log_lines, out);
    }
}

/// Prints an attempt; the log tail only for the final one (that is the one a
/// person reads; `--json` has every attempt's log).
fn print_attempt(r: &TaskResult, log_lines: usize, out: Output) {
    let mut human = describe_attempt(r);
    if r.is_final && log_lines > 0 && !r.log_tail.is_empty() {
        let lines = last_lines(&r.log_tail, log_lines);
        human.push_str(&format!(
            "\n  log (last {} lines{}):",
            lines.len(),
            if r.log_truncated {
                ", truncated by the worker"
            } else {
                ""
            }
        ));
        for l in lines {
            human.push_str("\n    ");
            human.push_str(l);
        }
    }
    out.emit(human, &serde_json::to_value(r).unwrap_or_default());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn last_n_keeps_the_newest() {
        let mut b = LastN::new(3);
        for i in 0..10 {
            b.push(i);
        }
        assert_eq!(b.drain().collect::<Vec<_>>(), vec![7, 8, 9]);
        let mut none = LastN::new(0);
        none.push(1);
        assert_eq!(none.drain().count(), 0);
    }

    #[test]
    fn last_lines_of_a_log() {
        assert_eq!(last_lines("a\nb\nc\n", 2), vec!["b", "c"]);
        assert_eq!(last_lines("a", 5), vec!["a"]);
        assert!(last_lines("", 5).is_empty());
    }
}
