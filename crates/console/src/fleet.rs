//! What the pages show, gathered in the background.
//!
//! One task refreshes the [`Overview`] every `console.refresh_secs`: queue
//! depths (a passive declare per queue: exact and current, where the
//! management API's figures lag by seconds), each worker's `/readyz`,
//! `/metrics` and `/tasks`, and the sessions service's list. Another reads
//! the results stream from its first retained record and keeps the newest
//! `console.results_kept` results in memory, deduplicated by
//! `(task, attempt)` (results are delivered at least once). Each change
//! publishes a new overview on a watch channel: the overview page's
//! server-sent events follow it.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sandfleet_amqp::{Amqp, StreamOffset, Topology};
use sandfleet_ops::stream::{Next, StreamReader};
use sandfleet_ops::workers::{self, WorkerStatus};
use sandfleet_proto::{TaskId, TaskResult};
use sandfleet_sessions::pool::PoolInfo;
use sandfleet_sessions::wire::SessionInfo;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The depth of one queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueDepth {
    /// What it is (`tasks`, `retry 30s`, `dead letters`).
    pub role: String,
    /// The queue's name.
    pub name: String,
    /// Messages ready; `None` with `error` when it could not be asked.
    pub ready: Option<u32>,
    /// Why the depth is unknown.
    pub error: Option<String>,
}

/// The sessions panel.
#[derive(Debug, Clone)]
pub enum Sessions {
    /// No sessions service is configured: the panel is left out.
    NotConfigured,
    /// What the service said.
    Listed {
        /// The sessions the console's token sees.
        sessions: Vec<SessionInfo>,
        /// The warm pools with their counts.
        pools: Vec<PoolInfo>,
    },
    /// It did not answer.
    Unavailable(String),
}

/// One fairness key's figures, summed over the workers that answered
/// (`docs/fairness.md`, "Metrics").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FairRow {
    /// The tenant the key belongs to.
    pub tenant: String,
    /// The key (a repository by default); `other` past a worker's label bound.
    pub key: String,
    /// Deliveries the workers hold waiting for their fair schedulers.
    pub queued: u64,
    /// Tasks of the key running now.
    pub running: u64,
    /// Tasks of the key started since the workers started.
    pub served: u64,
}

/// The fairness samples in a worker's `/metrics` text, one row per
/// tenant and key.
pub fn fair_rows(text: &str) -> Vec<FairRow> {
    let mut rows: BTreeMap<(String, String), FairRow> = BTreeMap::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        if !matches!(
            name,
            "sandfleet_fair_queued" | "sandfleet_fair_running" | "sandfleet_fair_served_total"
        ) {
            continue;
        }
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let labels = parse_labels(labels);
        let label = |n: &str| {
            labels
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let (tenant, key) = (label("tenant"), label("key"));
        let row = rows
            .entry((tenant.clone(), key.clone()))
            .or_insert_with(|| FairRow {
                tenant,
                key,
                ..FairRow::default()
            });
        // Gauges and counters of tasks: whole numbers, never negative.
        let n = value.max(0.0) as u64;
        match name {
            "sandfleet_fair_queued" => row.queued = n,
            "sandfleet_fair_running" => row.running = n,
            _ => row.served = n,
        }
    }
    rows.into_values().collect()
}

/// `a="x",b="y\"z"` → pairs, with the text format's escapes undone.
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let name: String = chars
            .by_ref()
            .skip_while(|c| *c == ',' || c.is_whitespace())
            .take_while(|c| *c != '=')
            .collect();
        if name.is_empty() || chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => break,
                },
                c => value.push(c),
            }
        }
        out.push((name, value));
    }
}

/// Adds one worker's rows into the fleet's.
fn add_rows(total: &mut BTreeMap<(String, String), FairRow>, rows: Vec<FairRow>) {
    for r in rows {
        let t = total
            .entry((r.tenant.clone(), r.key.clone()))
            .or_insert_with(|| FairRow {
                tenant: r.tenant.clone(),
                key: r.key.clone(),
                ..FairRow::default()
            });
        t.queued += r.queued;
        t.running += r.running;
        t.served += r.served;
    }
}

/// Everything the overview shows.
#[derive(Debug, Clone)]
pub struct Overview {
    /// When it was gathered.
    pub at: DateTime<Utc>,
    /// Tasks, each retry tier, dead letters.
    pub queues: Vec<QueueDepth>,
    /// One per configured worker.
    pub workers: Vec<WorkerStatus>,
    /// Sessions, when a sessions service is configured.
    pub sessions: Sessions,
    /// Per tenant and key, summed over the workers, ordered by tenant then
    /// key; empty when no worker shares fairly (`topology.task_shards` 0).
    pub fair: Vec<FairRow>,
    /// The newest results (newest first), for the overview's short list.
    pub recent: Vec<TaskResult>,
}

/// The results the console has read, newest last.
#[derive(Debug, Default)]
pub struct ResultLog {
    items: VecDeque<TaskResult>,
    seen: HashSet<(TaskId, u32, bool)>,
    cap: usize,
}

impl ResultLog {
    /// Keeps at most `cap` results.
    pub fn new(cap: usize) -> ResultLog {
        ResultLog {
            items: VecDeque::new(),
            seen: HashSet::new(),
            cap: cap.max(1),
        }
    }

    /// Adds a result; false when it was already there (a redelivery).
    pub fn push(&mut self, r: TaskResult) -> bool {
        if !self.seen.insert((r.task_id, r.attempt, r.is_final)) {
            return false;
        }
        self.items.push_back(r);
        while self.items.len() > self.cap {
            if let Some(old) = self.items.pop_front() {
                self.seen.remove(&(old.task_id, old.attempt, old.is_final));
            }
        }
        true
    }

    /// Newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &TaskResult> {
        self.items.iter().rev()
    }

    /// Every result of one task, by attempt.
    pub fn of_task(&self, id: TaskId) -> Vec<TaskResult> {
        let mut v: Vec<TaskResult> = self
            .items
            .iter()
            .filter(|r| r.task_id == id)
            .cloned()
            .collect();
        v.sort_by_key(|r| (r.attempt, r.is_final));
        v
    }
}

/// The shared state the pages read.
#[derive(Debug)]
pub struct Fleet {
    /// The broker.
    pub amqp: Amqp,
    /// Queue and exchange names.
    pub topology: Topology,
    /// Results read so far.
    pub results: RwLock<ResultLog>,
    overview_tx: watch::Sender<Arc<Overview>>,
}

/// What [`Fleet::start`] needs.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Worker HTTP endpoints.
    pub workers: Vec<String>,
    /// Sessions service URL and token.
    pub sessions: Option<(String, String)>,
    /// How often the overview is gathered.
    pub refresh: Duration,
    /// How many results are kept.
    pub results_kept: usize,
}

impl Fleet {
    /// Starts gathering; the tasks stop when `shutdown` fires.
    pub fn start(
        amqp: Amqp,
        topology: Topology,
        config: FleetConfig,
        shutdown: CancellationToken,
    ) -> Arc<Fleet> {
        let (overview_tx, _) = watch::channel(Arc::new(Overview {
            at: Utc::now(),
            queues: Vec::new(),
            workers: Vec::new(),
            sessions: if config.sessions.is_some() {
                Sessions::Listed {
                    sessions: Vec::new(),
                    pools: Vec::new(),
                }
            } else {
                Sessions::NotConfigured
            },
            fair: Vec::new(),
            recent: Vec::new(),
        }));
        let fleet = Arc::new(Fleet {
            amqp,
            topology,
            results: RwLock::new(ResultLog::new(config.results_kept)),
            overview_tx,
        });
        let (kick_tx, kick_rx) = watch::channel(());
        tokio::spawn(read_results(fleet.clone(), kick_tx, shutdown.clone()));
        tokio::spawn(refresh(fleet.clone(), config, kick_rx, shutdown));
        fleet
    }

    /// The latest overview.
    pub fn overview(&self) -> Arc<Overview> {
        self.overview_tx.borrow().clone()
    }

    /// Follows the overview as it changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Overview>> {
        self.overview_tx.subscribe()
    }

    /// The newest results, newest first.
    pub fn recent(&self, n: usize) -> Vec<TaskResult> {
        self.results
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .newest_first()
            .take(n)
            .cloned()
            .collect()
    }

    /// Gathers a fresh overview now.
    pub async fn gather(&self, config: &FleetConfig, client: &reqwest::Client) -> Overview {
        let mut depths = Vec::new();
        // With fair sharing the backlog waits in the shards: the tasks card
        // counts `<p>.tasks` and every shard, as the worker's queue gauge does.
        let mut ready = Some(0u32);
        let mut error = None;
        for q in self.topology.task_queues() {
            match self.amqp.queue_depth(&q).await {
                Ok(n) => ready = ready.map(|r| r.saturating_add(n)),
                Err(e) => {
                    ready = None;
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        depths.push(QueueDepth {
            role: "tasks".to_owned(),
            name: if self.topology.task_shards.is_empty() {
                self.topology.tasks_queue.clone()
            } else {
                format!(
                    "{} + {} shards",
                    self.topology.tasks_queue,
                    self.topology.task_shards.len()
                )
            },
            ready,
            error,
        });
        let mut queues = Vec::new();
        for tier in &self.topology.retry_tiers {
            queues.push((
                format!("retry {}s", tier.delay.as_secs()),
                tier.queue.clone(),
            ));
        }
        queues.push(("dead letters".to_owned(), self.topology.dead_queue.clone()));
        for (role, name) in queues {
            let (ready, error) = match self.amqp.queue_depth(&name).await {
                Ok(n) => (Some(n), None),
                Err(e) => (None, Some(e.to_string())),
            };
            depths.push(QueueDepth {
                role,
                name,
                ready,
                error,
            });
        }
        let probed = futures::future::join_all(
            config
                .workers
                .iter()
                .map(|u| workers::probe_with_metrics(client, u)),
        )
        .await;
        let mut fair = BTreeMap::new();
        let mut workers = Vec::with_capacity(probed.len());
        for (status, metrics) in probed {
            if let Some(text) = metrics {
                add_rows(&mut fair, fair_rows(&text));
            }
            workers.push(status);
        }
        let sessions = match &config.sessions {
            None => Sessions::NotConfigured,
            Some((url, token)) => {
                let client = sandfleet_sessions::SessionsClient::new(url.clone(), token.clone());
                match futures::future::try_join(client.list(), client.pools()).await {
                    Ok((sessions, pools)) => Sessions::Listed { sessions, pools },
                    Err(e) => Sessions::Unavailable(e.to_string()),
                }
            }
        };
        Overview {
            at: Utc::now(),
            queues: depths,
            workers,
            sessions,
            fair: fair.into_values().collect(),
            recent: self.recent(10),
        }
    }
}

async fn refresh(
    fleet: Arc<Fleet>,
    config: FleetConfig,
    mut kick: watch::Receiver<()>,
    shutdown: CancellationToken,
) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the HTTP client; the overview stays empty");
            return;
        }
    };
    let mut tick = tokio::time::interval(config.refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            // A new result: show it now rather than at the next tick.
            changed = kick.changed() => if changed.is_err() { return; },
        }
        let overview = fleet.gather(&config, &client).await;
        fleet.overview_tx.send_replace(Arc::new(overview));
    }
}

async fn read_results(fleet: Arc<Fleet>, kick: watch::Sender<()>, shutdown: CancellationToken) {
    // Reads from the first retained record; after a broker outage it starts
    // over, and the log drops what it already holds.
    let mut delay = Duration::from_millis(500);
    while !shutdown.is_cancelled() {
        let reader = StreamReader::open(
            &fleet.amqp,
            &fleet.topology.results_stream,
            StreamOffset::First,
            "sandfleet-console-results",
        )
        .await;
        match reader {
            Ok(mut reader) => {
                delay = Duration::from_millis(500);
                loop {
                    match reader.next(None, &shutdown).await {
                        Next::Result(r) => {
                            let added = fleet
                                .results
                                .write()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(*r);
                            if added {
                                kick.send_replace(());
                            }
                        }
                        Next::Idle => {}
                        Next::End => break,
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the results stream; retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn result(id: TaskId, attempt: u32, is_final: bool) -> TaskResult {
        serde_json::from_value(serde_json::json!({
            "schema_version": 1, "task_id": id, "attempt": attempt, "outcome": "failed",
            "final": is_final, "finished_at": Utc::now(), "worker": "w",
        }))
        .unwrap()
    }

    #[test]
    fn fair_rows_are_read_from_worker_metrics_and_summed_over_workers() {
        let a = "# HELP sandfleet_fair_queued Deliveries held\n\
# TYPE sandfleet_fair_queued gauge
sandfleet_fair_queued{tenant=\"acme\",key=\"acme/web\"} 2
sandfleet_fair_running{tenant=\"acme\",key=\"acme/web\"} 3
sandfleet_fair_served_total{tenant=\"acme\",key=\"acme/web\"} 40
sandfleet_fair_served_total{tenant=\"odd\",key=\"odd/q\\\"x\\\\y\"} 1
sandfleet_tasks_total{outcome=\"succeeded\"} 7
sandfleet_tasks_in_flight 3
";
        let rows = fair_rows(a);
        assert_eq!(
            rows,
            vec![
                FairRow {
                    tenant: "acme".into(),
                    key: "acme/web".into(),
                    queued: 2,
                    running: 3,
                    served: 40
                },
                FairRow {
                    tenant: "odd".into(),
                    key: r#"odd/q"x\y"#.into(),
                    queued: 0,
                    running: 0,
                    served: 1
                },
            ]
        );
        let b = "sandfleet_fair_running{tenant=\"acme\",key=\"acme/web\"} 1\n\
                 sandfleet_fair_served_total{tenant=\"acme\",key=\"acme/web\"} 2\n";
        let mut total = BTreeMap::new();
        add_rows(&mut total, rows);
        add_rows(&mut total, fair_rows(b));
        let web = &total[&("acme".to_owned(), "acme/web".to_owned())];
        assert_eq!((web.queued, web.running, web.served), (2, 4, 42));
        assert!(fair_rows("sandfleet_tasks_in_flight 3\n").is_empty());
    }

    #[test]
    fn the_log_drops_redeliveries_and_keeps_the_newest() {
        let mut log = ResultLog::new(3);
        let a = uuid::Uuid::now_v7();
        let b = uuid::Uuid::now_v7();
        assert!(log.push(result(a, 1, false)));
        assert!(!log.push(result(a, 1, false)), "a redelivery is dropped");
        assert!(log.push(result(a, 2, true)));
        assert!(log.push(result(b, 1, true)));
        assert_eq!(log.of_task(a).len(), 2);
        // Over the cap: the oldest goes, and may be read again later.
        assert!(log.push(result(b, 2, true)));
        let newest: Vec<(TaskId, u32)> =
            log.newest_first().map(|r| (r.task_id, r.attempt)).collect();
        assert_eq!(newest, vec![(b, 2), (b, 1), (a, 2)]);
        assert!(log.push(result(a, 1, false)));
    }
}
