//! `sandfleet replay`: re-enqueue failed builds as new tasks.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sandfleet_amqp::{Amqp, StreamOffset};
use sandfleet_gateway::TaskSink;
use sandfleet_ops::batch::ReplayBatch;
use sandfleet_producer::Producer;
use sandfleet_proto::Task;
use sandfleet_settings::Settings;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::args::ReplayArgs;
use crate::broker;
use crate::commands::dlq;
use crate::commands::results::{parse_outcomes, read_stream};
use crate::exit::{CliError, CliResult, Exit};
use crate::ledger::ReplayLedger;
use crate::output::{Output, diag};
use crate::replay::{Candidate, ItemStatus, ReplayFilter, Summary, origin, parse_jsonl};
use crate::timearg;

/// Builds the filter from the flags.
pub fn filter(a: &ReplayArgs) -> CliResult<ReplayFilter> {
    let now = Utc::now();
    Ok(ReplayFilter {
        since: a
            .since
            .as_deref()
            .map(|s| timearg::parse_time(s, now))
            .transpose()?,
        until: a
            .until
            .as_deref()
            .map(|s| timearg::parse_time(s, now))
            .transpose()?,
        repos: a.repos.clone(),
        outcomes: parse_outcomes(&a.outcomes)?,
        tasks: a.tasks.clone(),
    })
}

/// Paces sends to `rate` per second (0: unpaced).
struct Pacer {
    interval: Option<tokio::time::Interval>,
}

impl Pacer {
    fn new(rate: f64) -> Pacer {
        let interval = (rate > 0.0).then(|| {
            let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        Pacer { interval }
    }

    async fn wait(&mut self) {
        if let Some(i) = &mut self.interval {
            i.tick().await;
        }
    }
}

/// Runs `replay`: checks the arguments, connects, reads the source, sends.
pub async fn run(
    a: &ReplayArgs,
    settings: &Settings,
    out: Output,
    shutdown: CancellationToken,
) -> CliResult<Exit> {
    if a.rate < 0.0 || !a.rate.is_finite() {
        return Err(CliError::Usage(
            "--rate must be a positive number of tasks per second (0: unlimited)".to_owned(),
        ));
    }
    if a.batch.is_empty() || a.batch.contains(char::is_whitespace) {
        return Err(CliError::Usage(
            "--batch must be a non-empty key without spaces".to_owned(),
        ));
    }
    let filter = filter(a)?;
    let idle = timearg::parse_duration(&a.idle_timeout)?;
    let producer = broker::connect_sink(settings).await?;
    let amqp = producer.producer().amqp().clone();
    let checker = producer.producer().clone();
    let sink: Arc<dyn TaskSink> = Arc::new(producer);
    let topology = broker::topology(settings);
    let ledger = ReplayLedger::open(
        &amqp,
        &settings.topology.prefix,
        &settings.topology.results_max_age,
    )
    .await?;
    let batch = ReplayBatch::start(&ledger, &a.batch, a.force).await?;

    let mut summary = Summary::default();
    let mut run = Run {
        a,
        out,
        sink,
        checker,
        ledger: &ledger,
        batch,
        pacer: Pacer::new(a.rate),
        progress: progress_bar(out),
        sent: 0,
    };

    if a.from_dlq {
        run.replay_dlq(
            &amqp,
            &topology.dead_queue,
            &filter,
            &mut summary,
            &shutdown,
        )
        .await?;
    } else if a.from_results {
        let start = match filter.since {
            Some(s) => StreamOffset::Timestamp(s.timestamp()),
            None => StreamOffset::First,
        };
        // Keep only the selected results (with their task): a week of
        // results is large, the failures to replay are few.
        let mut candidates = Vec::new();
        let mut read = 0usize;
        read_stream(
            &amqp,
            &topology.results_stream,
            start,
            Some(idle),
            &shutdown,
            |r| {
                // Results are published when they finish, so the stream is
                // in finish-time order give or take clock skew between
                // workers: well past --until, the scan can stop.
                if filter
                    .until
                    .is_some_and(|u| r.finished_at >= u + chrono::Duration::minutes(5))
                {
                    return false;
                }
                read += 1;
                if filter.matches_result(&r) {
                    candidates.push(Candidate::Result(Box::new(r)));
                }
                true
            },
        )
        .await?;
        summary.read += read - candidates.len();
        run.candidates(candidates, &filter, &mut summary, &shutdown)
            .await;
    } else if let Some(path) = &a.from_file {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
                .map_err(|e| CliError::Usage(format!("stdin: {e}")))?
        } else {
            std::fs::read_to_string(path)
                .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?
        };
        let candidates =
            parse_jsonl(&text).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
        run.candidates(candidates, &filter, &mut summary, &shutdown)
            .await;
    }
    if let Some(pb) = &run.progress {
        pb.finish_and_clear();
    }
    let verb = if a.dry_run { "dry run: " } else { "" };
    out.emit(
        format!(
            "{verb}{} read, {} matched, {} sent, {} would be sent, {} would fail, {} already replayed (batch {:?}), {} failed",
            summary.read, summary.matched, summary.sent, summary.would_send, summary.would_fail, summary.already_replayed, a.batch, summary.failed
        ),
        &json!({ "summary": summary, "batch": a.batch, "dry_run": a.dry_run }),
    );
    // A dry run exits as the real run would.
    Ok(
        match (
            summary.sent + summary.would_send,
            summary.failed + summary.would_fail,
        ) {
            (_, 0) => Exit::Ok,
            (0, _) => Exit::Failure,
            _ => Exit::Partial,
        },
    )
}

fn progress_bar(out: Output) -> Option<indicatif::ProgressBar> {
    if out.json || !std::io::stderr().is_terminal() {
        return None;
    }
    // The length is set once the source is read (every source is read
    // before anything is sent); until then it spins.
    let pb = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{bar:30}] {pos}/{len} candidates, {msg} [{elapsed} < {eta}]",
    ) {
        pb.set_style(style);
    }
    pb.enable_steady_tick(Duration::from_millis(120));
    Some(pb)
}

struct Run<'a> {
    a: &'a ReplayArgs,
    out: Output,
    sink: Arc<dyn TaskSink>,
    /// The producer's own checks, for a dry run.
    checker: Producer,
    ledger: &'a ReplayLedger,
    /// The batch: its ledger keys and the builds this run saw.
    batch: ReplayBatch<'a>,
    pacer: Pacer,
    progress: Option<indicatif::ProgressBar>,
    sent: u64,
}

impl Run<'_> {
    fn at_limit(&self, s: &Summary) -> bool {
        self.a.limit.is_some_and(|l| s.sent + s.would_send >= l)
    }

    fn set_total(&self, n: usize) {
        if let Some(pb) = &self.progress {
            pb.set_length(n as u64);
        }
    }

    fn tick(&self) {
        if let Some(pb) = &self.progress {
            pb.inc(1);
        }
    }

    /// Replays one selected original; returns what happened.
    async fn one(&mut self, original: &Task) -> ItemStatus {
        let origin = origin(original);
        // Only real sends are paced (as before the batch moved to
        // sandfleet-ops): skips and dry runs go at once.
        if !self.a.dry_run && !self.batch.already_replayed(original) {
            self.pacer.wait().await;
        }
        let dry_run = self.a.dry_run.then_some(&self.checker);
        let replayed = self.batch.one(original, &*self.sink, dry_run).await;
        let (status, task, error) = (replayed.status, replayed.task, replayed.error);
        if let Some(e) = replayed.unrecorded {
            diag(format_args!(
                "sandfleet: task {} was enqueued but not recorded in {}: {e}",
                task.id,
                self.ledger.queue()
            ));
        }
        // The build's origin, and the task it was read from when that is a
        // replay itself.
        let of = if origin == original.id {
            origin.to_string()
        } else {
            format!("{origin} (via {})", original.id)
        };
        let line = match status {
            ItemStatus::Sent => format!(
                "sent        {} (replay of {of}) {}",
                task.id, original.source.repository
            ),
            ItemStatus::WouldSend => format!(
                "would send  replay of {of} {} {}",
                original.source.repository, original.source.commit
            ),
            ItemStatus::WouldFail => format!(
                "would fail  replay of {of}: {}",
                error.as_deref().unwrap_or_default()
            ),
            ItemStatus::AlreadyReplayed => format!(
                "skipped     {of} already replayed in batch {:?}",
                self.a.batch
            ),
            ItemStatus::Failed => format!(
                "failed      replay of {of}: {}",
                error.as_deref().unwrap_or_default()
            ),
        };
        let task_id = (status == ItemStatus::Sent).then_some(task.id);
        let json = json!({
            "status": status.as_str(), "replay_of": origin, "read_from": original.id,
            "task_id": task_id, "idempotency_key": task.idempotency_key,
            "repository": original.source.repository, "error": error,
        });
        match &self.progress {
            Some(pb) => {
                pb.suspend(|| self.out.emit(&line, &json));
                if status == ItemStatus::Sent {
                    self.sent += 1;
                    pb.set_message(format!("{} sent", self.sent));
                }
            }
            None => self.out.emit(&line, &json),
        }
        status
    }

    async fn candidates(
        &mut self,
        cands: Vec<Candidate>,
        filter: &ReplayFilter,
        s: &mut Summary,
        shutdown: &CancellationToken,
    ) {
        self.set_total(cands.len());
        for c in &cands {
            if shutdown.is_cancelled() || self.at_limit(s) {
                break;
            }
            s.read += 1;
            self.tick();
            let Some(task) = c.selected(filter) else {
                continue;
            };
            if !self.batch.first_of_build(task) {
                continue;
            }
            s.matched += 1;
            let st = self.one(task).await;
            s.count(st);
        }
    }

    async fn replay_dlq(
        &mut self,
        amqp: &Amqp,
        queue: &str,
        filter: &ReplayFilter,
        s: &mut Summary,
        shutdown: &CancellationToken,
    ) -> CliResult<()> {
        let deliveries = dlq::read(amqp, queue, usize::MAX).await?;
        self.set_total(deliveries.len());
        let mut keep = Vec::new();
        for d in deliveries {
            if shutdown.is_cancelled() || self.at_limit(s) {
                keep.push(d);
                continue;
            }
            s.read += 1;
            self.tick();
            let task: Option<Task> = serde_json::from_slice(d.body()).ok();
            let Some(task) =
                task.filter(|t| filter.matches_task(t) && self.batch.first_of_build(t))
            else {
                keep.push(d);
                continue;
            };
            s.matched += 1;
            let st = self.one(&task).await;
            s.count(st);
            if st == ItemStatus::Sent {
                // The replay stands in for the dead letter now.
                if let Err(e) = d.ack().await {
                    tracing::warn!(error = %e, task = %task.id, "could not remove a replayed dead letter");
                }
            } else {
                keep.push(d);
            }
        }
        dlq::give_back(&keep).await;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_pacer_holds_sends_to_the_rate() {
        let start = tokio::time::Instant::now();
        let mut pacer = Pacer::new(10.0);
        for _ in 0..5 {
            pacer.wait().await;
        }
        // The first send goes at once, the next four 100 ms apart.
        assert_eq!(start.elapsed(), Duration::from_millis(400));
        let start = tokio::time::Instant::now();
        let mut unpaced = Pacer::new(0.0);
        for _ in 0..100 {
            unpaced.wait().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
