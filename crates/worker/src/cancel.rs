//! Cancellation as the worker sees it (design decision 14): an in-memory
//! index of every cancel on the cancellations stream, the tasks this worker
//! holds (so a cancel reaches a running attempt), and a read barrier.
//!
//! [`Cancels`] is fed by [`feed`] (RabbitMQ: the whole cancellations stream,
//! read from its first retained message, so a worker that starts or
//! reconnects later sees every cancel still retained) or by
//! [`Cancels::apply`] directly (in-memory tests, the demo). Before an attempt
//! starts, the dispatch loop [`Cancels::watch`]es its task and passes the
//! [`Cancels::barrier`]: the worker publishes a marker to the stream and
//! waits to read it back, so every cancel confirmed before the marker is in
//! the index. A cancel confirmed later fires the watch while the attempt
//! runs. Together: no attempt starts after its cancel was acknowledged and
//! read, and a running one is stopped.
//!
//! Concurrent barriers share markers (group commit): a caller joins the
//! round whose marker is not published yet, and one marker read back
//! releases every caller that joined before it was published. A round
//! already published does not cover a cancel confirmed after it, so nobody
//! joins it: at most one round is in flight while the next one collects,
//! and a barrier waits for at most two marker round trips. A burst of
//! deliveries costs a few markers instead of one each.
//!
//! A fed index is [caught up](Cancels::caught_up) once the feed has read the
//! stream up to its tail (its first marker came back). The dispatch loop
//! takes no task before that, so a freshly started worker never meets its
//! first deliveries with a feed that is still subscribing or replaying the
//! stream; a feed lost later still makes the barrier release the attempt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sandfleet_amqp::{
    Amqp, AmqpError, Consumer, ConsumerOptions, Publisher, StreamOffset, Topology,
};
use sandfleet_proto::{CancelInfo, CancelTarget, Cancellation, Task, TaskId};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

/// How long a barrier waits for its marker to come back before the attempt
/// is released for later (the stream or the broker is unwell).
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the feed waits for its first marker before it publishes another
/// (and says that it is still reading): a long stream is replayed at start.
const CATCH_UP_PATIENCE: Duration = Duration::from_secs(30);

/// Why the read barrier could not be passed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BarrierError {
    /// The marker could not be published.
    #[error("cancellations marker not published: {0}")]
    Publish(String),
    /// The cancellations feed has not started yet.
    #[error("the cancellations stream is not being read yet")]
    NotFed,
    /// The marker did not come back within [`BARRIER_TIMEOUT`].
    #[error("cancellations stream not read back within {0:?}")]
    Timeout(Duration),
}

/// The pure index: which tasks are cancelled.
#[derive(Debug, Default)]
pub struct CancelIndex {
    by_id: HashMap<TaskId, Cancellation>,
    /// Per supersede key, the supersede with the newest `created_before`
    /// (every older task with the key is cancelled by it).
    by_key: HashMap<String, Cancellation>,
}

impl CancelIndex {
    /// Records a cancel. Markers are ignored.
    pub fn apply(&mut self, c: Cancellation) {
        match &c.target {
            CancelTarget::Task { task_id } => {
                self.by_id.entry(*task_id).or_insert(c);
            }
            CancelTarget::Supersede {
                supersede_key,
                created_before,
                ..
            } => {
                let newer = self.by_key.get(supersede_key).is_none_or(|old| {
                    matches!(&old.target, CancelTarget::Supersede { created_before: b, .. } if b < created_before)
                });
                if newer {
                    self.by_key.insert(supersede_key.clone(), c);
                }
            }
            CancelTarget::Marker => {}
        }
    }

    /// Whether `task` is cancelled, and by whom.
    pub fn check(&self, task: &Task) -> Option<CancelInfo> {
        self.by_id
            .get(&task.id)
            .and_then(|c| c.applies_to(task))
            .or_else(|| {
                let key = task.supersede_key.as_ref()?;
                self.by_key.get(key)?.applies_to(task)
            })
    }

    /// Cancels recorded (for metrics and tests).
    pub fn len(&self) -> usize {
        self.by_id.len() + self.by_key.len()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A watched task: fires when a cancel for it is applied.
#[derive(Debug, Clone)]
pub struct CancelWatch {
    token: CancellationToken,
    info: Arc<OnceLock<CancelInfo>>,
}

impl CancelWatch {
    fn fire(&self, info: CancelInfo) {
        let _ = self.info.set(info);
        self.token.cancel();
    }

    /// Who cancelled, once fired.
    pub fn info(&self) -> Option<&CancelInfo> {
        self.info.get()
    }

    /// Resolves once fired (cancel-safe).
    pub async fn fired(&self) {
        self.token.cancelled().await;
    }
}

/// Removes its watch from the registry when dropped.
pub struct WatchGuard {
    cancels: Arc<Cancels>,
    id: Uuid,
    /// The watch itself.
    pub watch: CancelWatch,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let mut s = self.cancels.lock();
        s.watched.remove(&self.id);
    }
}

/// Publishes a marker and waits up to the given time to read it back.
type Barrier = Arc<
    dyn Fn(Duration) -> futures::future::BoxFuture<'static, Result<ReadTo, BarrierError>>
        + Send
        + Sync,
>;

/// How far a passed barrier read the cancellations stream: the offset of
/// the marker read back. Every cancel at a lower offset is in the index; one
/// at a higher offset was confirmed after the marker was published, so it
/// may race the attempt's start (and then stops it while it runs). `None`
/// when there is no stream (the in-memory index).
pub type ReadTo = Option<u64>;

/// The marker rounds of the barrier (group commit, see the module docs).
#[derive(Default)]
struct Rounds {
    /// The round collecting callers: its marker is not published yet.
    collecting: Option<Round>,
    /// Whether a task is publishing rounds (at most one, see [`drive`]).
    driving: bool,
}

/// One marker shared by the callers that joined before it was published.
struct Round {
    /// The round's outcome, once its marker is read back or it failed.
    done: tokio::sync::watch::Sender<Option<Result<ReadTo, BarrierError>>>,
}

#[derive(Default)]
struct State {
    index: CancelIndex,
    watched: HashMap<Uuid, (Task, CancelWatch)>,
    /// Markers published by this worker, waiting to be read back (with
    /// their stream offset).
    markers: HashMap<Uuid, oneshot::Sender<ReadTo>>,
}

/// The index, the watched tasks and the barrier, shared by the dispatch
/// loop and the feed.
pub struct Cancels {
    state: Mutex<State>,
    barrier: OnceLock<Barrier>,
    rounds: Arc<Mutex<Rounds>>,
    /// True when a [`feed`] will install the barrier: until then nothing
    /// may start.
    fed: bool,
    /// True once every cancel on the stream when the feed started is in the
    /// index (always true without a feed).
    caught_up: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Cancels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancels")
            .field("recorded", &self.lock().index.len())
            .finish_non_exhaustive()
    }
}

impl Cancels {
    /// An empty index with no feed: the barrier passes at once (in-memory
    /// tests and the demo, where [`Cancels::apply`] is called directly).
    pub fn new() -> Arc<Cancels> {
        Arc::new(Cancels {
            state: Mutex::default(),
            barrier: OnceLock::new(),
            rounds: Arc::default(),
            fed: false,
            caught_up: tokio::sync::watch::Sender::new(true),
        })
    }

    /// An empty index that a [`feed`] will fill: the barrier fails
    /// ([`BarrierError::NotFed`]) until the feed has started, and the index
    /// is not [caught up](Cancels::caught_up) until the feed has read the
    /// stream up to its tail.
    pub fn fed_from_stream() -> Arc<Cancels> {
        Arc::new(Cancels {
            state: Mutex::default(),
            barrier: OnceLock::new(),
            rounds: Arc::default(),
            fed: true,
            caught_up: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Whether the index holds every cancel that was on the stream when the
    /// feed started.
    pub fn is_caught_up(&self) -> bool {
        *self.caught_up.borrow()
    }

    /// Resolves once [`Cancels::is_caught_up`] (cancel-safe).
    pub async fn caught_up(&self) {
        let mut rx = self.caught_up.subscribe();
        // The sender lives in `self`, so the wait cannot fail while we borrow it.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Records that the feed has read the stream up to its tail.
    pub(crate) fn set_caught_up(&self) {
        self.caught_up.send_replace(true);
    }

    /// Test seam for the dispatch loop's tests: a fed index whose feed has
    /// caught up, with a barrier that passes at once (there is no stream).
    #[cfg(test)]
    pub(crate) fn caught_up_without_stream(&self) {
        let _ = self.barrier.set(Arc::new(|_| Box::pin(async { Ok(None) })));
        self.set_caught_up();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Records a cancel and fires the watches of the tasks it applies to.
    pub fn apply(&self, c: Cancellation) {
        self.apply_read(c, None);
    }

    /// [`Cancels::apply`] for a cancel read from the stream at `offset`.
    fn apply_read(&self, c: Cancellation, offset: Option<u64>) {
        let mut s = self.lock();
        if let CancelTarget::Marker = c.target {
            if let Some(tx) = s.markers.remove(&c.id) {
                let _ = tx.send(offset);
            }
            return;
        }
        for (task, watch) in s.watched.values() {
            if let Some(info) = c.applies_to(task) {
                watch.fire(info);
            }
        }
        s.index.apply(c);
    }

    /// Whether `task` is cancelled.
    pub fn check(&self, task: &Task) -> Option<CancelInfo> {
        self.lock().index.check(task)
    }

    /// Watches `task` until the guard drops; fires at once when it is
    /// already cancelled.
    pub fn watch(self: &Arc<Self>, task: &Task) -> WatchGuard {
        let watch = CancelWatch {
            token: CancellationToken::new(),
            info: Arc::new(OnceLock::new()),
        };
        let id = Uuid::new_v4();
        let mut s = self.lock();
        if let Some(info) = s.index.check(task) {
            watch.fire(info);
        }
        s.watched.insert(id, (task.clone(), watch.clone()));
        drop(s);
        WatchGuard {
            cancels: self.clone(),
            id,
            watch,
        }
    }

    /// Waits until every cancel confirmed before this call is in the index
    /// (see the module docs). Passes at once without a feed.
    ///
    /// Concurrent callers share one marker: a caller joins the round whose
    /// marker is not published yet, so the marker that releases it was
    /// published after this call. Fails with [`BarrierError::Timeout`] when
    /// no such marker came back within [`BARRIER_TIMEOUT`] of the call, and
    /// with the round's [`BarrierError::Publish`] when its marker could not
    /// be published. Passed, it tells how far it read ([`ReadTo`]).
    pub async fn barrier(&self) -> Result<ReadTo, BarrierError> {
        let Some(publish) = self.barrier.get() else {
            return if self.fed {
                Err(BarrierError::NotFed)
            } else {
                Ok(None)
            };
        };
        let mut done = {
            let mut rounds = lock(&self.rounds);
            let done = rounds
                .collecting
                .get_or_insert_with(|| Round {
                    done: tokio::sync::watch::Sender::new(None),
                })
                .done
                .subscribe();
            if !rounds.driving {
                rounds.driving = true;
                tokio::spawn(drive(self.rounds.clone(), publish.clone()));
            }
            done
        };
        match tokio::time::timeout(BARRIER_TIMEOUT, done.wait_for(Option::is_some)).await {
            Ok(Ok(outcome)) => outcome.clone().unwrap_or(Ok(None)),
            // The driver is gone without an outcome (the runtime is
            // shutting down), or the round took too long.
            Ok(Err(_)) | Err(_) => Err(BarrierError::Timeout(BARRIER_TIMEOUT)),
        }
    }

    /// Cancels recorded.
    pub fn recorded(&self) -> usize {
        self.lock().index.len()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Publishes the collecting round's marker and waits for it, then the next
/// round's, until no caller waits; one driver at a time, so at most one
/// marker is in flight. A round is taken out of `collecting` right before
/// its marker is published: whoever joined it called the barrier before.
async fn drive(rounds: Arc<Mutex<Rounds>>, publish: Barrier) {
    loop {
        let round = {
            let mut r = lock(&rounds);
            match r.collecting.take() {
                Some(round) => round,
                None => {
                    r.driving = false;
                    return;
                }
            }
        };
        // Every caller of this round gave up waiting: nobody to release.
        if round.done.receiver_count() == 0 {
            continue;
        }
        let outcome = publish(BARRIER_TIMEOUT).await;
        round.done.send_replace(Some(outcome));
    }
}

/// Feeds `cancels` from the cancellations stream until `stop`, and installs
/// the marker barrier. Reads from the first retained message; the consumer
/// resumes after its last offset when the connection comes back. Marks the
/// index caught up once a marker published after subscribing is read back.
pub async fn feed(
    amqp: &Amqp,
    topology: &Topology,
    publisher: Publisher,
    cancels: Arc<Cancels>,
    worker: String,
    stop: CancellationToken,
) -> Result<(), AmqpError> {
    let options = ConsumerOptions::new(&topology.cancellations_stream, 1000)
        .tag("sandfleet-cancellations")
        .stream_offset(StreamOffset::First);
    let mut consumer = Consumer::start(amqp, options).await?;
    let exchange = topology.cancellations_exchange.clone();
    let weak = Arc::downgrade(&cancels);
    let barrier: Barrier = Arc::new(move |patience| {
        let publisher = publisher.clone();
        let exchange = exchange.clone();
        let weak = weak.clone();
        let worker = worker.clone();
        Box::pin(async move {
            let marker = Cancellation::marker(worker);
            let (tx, rx) = oneshot::channel();
            if let Some(c) = weak.upgrade() {
                c.lock().markers.insert(marker.id, tx);
            }
            let forget = |id| {
                if let Some(c) = weak.upgrade() {
                    c.lock().markers.remove(&id);
                }
            };
            let body = serde_json::to_vec(&marker).unwrap_or_default();
            let msg = sandfleet_amqp::OutgoingMessage::new(&exchange, "", body)
                .message_id(marker.id.to_string())
                .kind(sandfleet_proto::CANCELLATION_MESSAGE_TYPE);
            let confirm = match publisher.send(&msg).await {
                Ok(confirm) => confirm,
                Err(e) => {
                    forget(marker.id);
                    return Err(BarrierError::Publish(e.to_string()));
                }
            };
            // Read back, the marker is on the stream: its confirm, which
            // the broker sends about when readers see it, is not waited for
            // unless it comes first and says the publish failed.
            let back = async {
                tokio::pin!(confirm, rx);
                tokio::select! {
                    r = &mut rx => r.map_err(|_| BarrierError::Timeout(patience)),
                    c = &mut confirm => match c {
                        Ok(()) => rx.await.map_err(|_| BarrierError::Timeout(patience)),
                        Err(e) => Err(BarrierError::Publish(e.to_string())),
                    },
                }
            };
            match tokio::time::timeout(patience, back).await {
                Ok(Ok(read_to)) => Ok(read_to),
                Ok(Err(e)) => {
                    forget(marker.id);
                    Err(e)
                }
                Err(_) => {
                    forget(marker.id);
                    Err(BarrierError::Timeout(patience))
                }
            }
        })
    });
    let _ = cancels.barrier.set(barrier.clone());
    // Polled beside the reads below, which bring its marker back.
    let catch_up = catch_up(barrier, cancels.clone());
    tokio::pin!(catch_up);
    let mut caught_up = cancels.is_caught_up();
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => break,
            () = &mut catch_up, if !caught_up => {
                caught_up = true;
                continue;
            }
            d = consumer.next_delivery() => match d {
                Some(d) => d,
                None => break,
            },
        };
        // Applied before it is acked: the ack only returns stream credit,
        // and a marker read back releases its barrier a frame sooner.
        match serde_json::from_slice::<Cancellation>(delivery.body()) {
            Ok(c) if c.validate().is_ok() => {
                debug!(cancel = %c.id, "cancellation read");
                cancels.apply_read(c, delivery.stream_offset());
            }
            Ok(c) => warn!(cancel = %c.id, "ignoring an invalid cancellation"),
            Err(e) => warn!(error = %e, "ignoring an undecodable cancellation"),
        }
        let _ = delivery.ack().await;
    }
    consumer.cancel();
    Ok(())
}

/// Publishes markers until one is read back, then marks `cancels` caught up.
async fn catch_up(barrier: Barrier, cancels: Arc<Cancels>) {
    let started = std::time::Instant::now();
    loop {
        match barrier(CATCH_UP_PATIENCE).await {
            Ok(_) => {
                info!(
                    recorded = cancels.recorded(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "cancellations stream read up to its tail"
                );
                cancels.set_caught_up();
                return;
            }
            Err(e @ BarrierError::Timeout(_)) => {
                warn!(error = %e, recorded = cancels.recorded(), "still reading the cancellations stream");
            }
            Err(e) => {
                warn!(error = %e, "cannot publish the catch-up marker; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Runs [`feed`] until `stop`, starting it again after a failure to
/// subscribe (broker down at start).
pub async fn run_feed(
    amqp: Amqp,
    topology: Topology,
    publisher: Publisher,
    cancels: Arc<Cancels>,
    worker: String,
    stop: CancellationToken,
) {
    loop {
        let fed = feed(
            &amqp,
            &topology,
            publisher.clone(),
            cancels.clone(),
            worker.clone(),
            stop.clone(),
        )
        .await;
        match fed {
            Ok(()) => return,
            Err(e) => warn!(error = %e, "cannot read the cancellations stream; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The error text of a cancelled result: `cancelled by <by>: <reason>`.
pub fn describe(info: &CancelInfo) -> String {
    format!("cancelled by {}: {}", info.by, info.reason)
}

/// A supersede cutoff for tests and callers that build one by hand.
pub fn supersede(key: &str, superseded_by: TaskId, created_before: DateTime<Utc>) -> Cancellation {
    let mut c = Cancellation::task(superseded_by, "supersede", "superseded");
    c.target = CancelTarget::Supersede {
        supersede_key: key.to_owned(),
        superseded_by,
        created_before,
    };
    c.reason = format!("superseded by the newer task {superseded_by}");
    c
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use sandfleet_proto::{Provider, SandboxSpec, Source};

    fn task(key: Option<&str>) -> Task {
        let mut t = Task::fix_attempt(
            Source::new(Provider::Api, "acme/widgets", "4f2a9c1"),
            SandboxSpec::new("alpine:3", 60),
        );
        t.supersede_key = key.map(Into::into);
        t
    }

    #[tokio::test]
    async fn a_watch_fires_for_a_cancel_applied_before_or_after_it() {
        let cancels = Cancels::new();
        let (early, late, spared) = (task(None), task(None), task(None));
        cancels.apply(Cancellation::task(early.id, "ops", "early"));
        let g1 = cancels.watch(&early);
        assert_eq!(g1.watch.info().unwrap().reason, "early");
        let g2 = cancels.watch(&late);
        let g3 = cancels.watch(&spared);
        assert!(g2.watch.info().is_none());
        cancels.apply(Cancellation::task(late.id, "ops", "late"));
        tokio::time::timeout(Duration::from_secs(1), g2.watch.fired())
            .await
            .unwrap();
        assert_eq!(g2.watch.info().unwrap().by, "ops");
        assert!(g3.watch.info().is_none());
        drop((g1, g2, g3));
        assert!(cancels.lock().watched.is_empty(), "guards unregister");
        assert!(cancels.barrier().await.is_ok(), "no feed: passes");
    }

    #[test]
    fn the_newest_supersede_of_a_key_wins() {
        let cancels = Cancels::new();
        let mut t1 = task(Some("k"));
        t1.created_at -= chrono::Duration::seconds(20);
        let mut t2 = task(Some("k"));
        t2.created_at -= chrono::Duration::seconds(10);
        let t3 = task(Some("k"));
        let g1 = cancels.watch(&t1);
        cancels.apply(Cancellation::supersede_by(&t2).unwrap());
        assert_eq!(g1.watch.info().unwrap().superseded_by, Some(t2.id));
        assert!(cancels.check(&t2).is_none());
        cancels.apply(Cancellation::supersede_by(&t3).unwrap());
        // An older supersede arriving late does not roll the cutoff back.
        cancels.apply(supersede("k", t1.id, t1.created_at));
        assert_eq!(cancels.check(&t2).unwrap().superseded_by, Some(t3.id));
        assert!(cancels.check(&t3).is_none());
        assert!(cancels.check(&task(Some("other"))).is_none());
    }
}
