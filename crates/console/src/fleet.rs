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

use std::collections::{HashSet, VecDeque};
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
        let mut queues = vec![("tasks".to_owned(), self.topology.tasks_queue.clone())];
        for tier in &self.topology.retry_tiers {
            queues.push((
                format!("retry {}s", tier.delay.as_secs()),
                tier.queue.clone(),
            ));
        }
        queues.push(("dead letters".to_owned(), self.topology.dead_queue.clone()));
        let mut depths = Vec::new();
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
        let workers =
            futures::future::join_all(config.workers.iter().map(|u| workers::probe(client, u)))
                .await;
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
