//! Fair sharing between tenants and keys when the fleet is saturated
//! (`docs/fairness.md`).
//!
//! Producers spread tasks over the task queue shards by a hash of their
//! fairness key (`topology.task_shards`). A [`FairBroker`] consumes every
//! shard through one inner [`Broker`] each (in production a
//! [`crate::rabbit::RabbitBroker`] per shard queue, so reconnects, pausing,
//! releases and the delivery-lost signal work exactly as on the single
//! queue), keeps the few deliveries each shard prefetched in a buffer, and
//! hands the dispatch loop the one the [`Scheduler`] picks: hierarchical
//! weighted round robin, tenants first, then the keys of the chosen tenant.
//!
//! The [`Scheduler`] is a pure state machine (unit-tested below); the broker
//! around it only moves deliveries. Per-key caps are enforced by not taking a
//! capped key's delivery: it stays unacked in the buffer (no requeueing nack,
//! which would spend the delivery limit), and after `max_hold` it goes back
//! to its shard as a fresh copy ([`Delivery::release`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use sandfleet_proto::FairKey;
use sandfleet_settings::FairnessSettings;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::broker::{Broker, BrokerError, ChannelLimit, Delivery, RetryMessage};
use crate::metrics::Metrics;
use crate::rabbit::RabbitBroker;
use sandfleet_amqp::{Amqp, Publisher, Topology};

/// Key and tenant of a delivery whose body names neither (it is rejected by
/// the decode anyway; it must not stall behind a cap meanwhile).
const UNKNOWN: &str = "unknown";

/// Weights and caps, resolved from [`FairnessSettings`].
#[derive(Debug, Clone)]
pub struct Weights {
    default_weight: u32,
    default_key_cap: u32,
    tenants: HashMap<String, (u32, u32)>,
    keys: HashMap<String, (u32, u32)>,
}

impl Weights {
    /// From the `fairness` section.
    pub fn new(s: &FairnessSettings) -> Weights {
        let map = |l: &[sandfleet_settings::FairShare]| {
            l.iter()
                .map(|f| (f.name.clone(), (f.weight.max(1), f.cap)))
                .collect()
        };
        Weights {
            default_weight: s.default_weight.max(1),
            default_key_cap: s.default_key_cap,
            tenants: map(&s.tenants),
            keys: map(&s.keys),
        }
    }

    fn tenant(&self, name: &str) -> (u32, u32) {
        self.tenants
            .get(name)
            .copied()
            .unwrap_or((self.default_weight, 0))
    }

    fn key(&self, name: &str) -> (u32, u32) {
        self.keys
            .get(name)
            .copied()
            .unwrap_or((self.default_weight, self.default_key_cap))
    }

    /// True for tenants and keys configured by name (always named in metrics).
    fn listed(&self, name: &str) -> bool {
        self.tenants.contains_key(name) || self.keys.contains_key(name)
    }
}

#[derive(Debug, Default)]
struct KeyState {
    /// Service received, in tasks / weight (stride scheduling's pass).
    pass: f64,
    running: u32,
}

#[derive(Debug, Default)]
struct TenantState {
    pass: f64,
    running: u32,
    /// Virtual time among this tenant's keys: the pass of the key chosen last.
    vtime: f64,
    keys: HashMap<String, KeyState>,
}

/// Hierarchical weighted round robin over the keys that have work at hand.
///
/// Each pick charges the chosen tenant `1 / tenant weight` and the chosen key
/// `1 / key weight` (stride scheduling: the deficit round-robin family with a
/// cost of one task). The tenant with the least charge among the tenants
/// with an eligible candidate wins, then the key with the least charge within
/// it. A tenant or key that was absent starts at the current virtual time
/// (the charge of the last winner), so idling banks no credit and a newcomer
/// is not starved by old debts either.
#[derive(Debug)]
pub struct Scheduler {
    weights: Weights,
    tenants: HashMap<String, TenantState>,
    vtime: f64,
    picks: u64,
}

impl Scheduler {
    /// A scheduler with these weights and caps.
    pub fn new(weights: Weights) -> Scheduler {
        Scheduler {
            weights,
            tenants: HashMap::new(),
            vtime: 0.0,
            picks: 0,
        }
    }

    /// True when `k` may start one more task (neither it nor its tenant is
    /// at its cap).
    pub fn eligible(&self, k: &FairKey) -> bool {
        let (_, tcap) = self.weights.tenant(&k.tenant);
        let (_, kcap) = self.weights.key(&k.key);
        let t = self.tenants.get(&k.tenant);
        let trun = t.map_or(0, |t| t.running);
        let krun = t.and_then(|t| t.keys.get(&k.key)).map_or(0, |s| s.running);
        (tcap == 0 || trun < tcap) && (kcap == 0 || krun < kcap)
    }

    /// The index in `candidates` (oldest first) of the delivery to start
    /// next, counted as running until [`Scheduler::finished`]; `None` when
    /// every candidate is capped.
    pub fn pick(&mut self, candidates: &[&FairKey]) -> Option<usize> {
        let eligible: Vec<usize> = (0..candidates.len())
            .filter(|&i| self.eligible(candidates[i]))
            .collect();
        if eligible.is_empty() {
            return None;
        }
        // Tenant level.
        let mut tenant: Option<(f64, &str)> = None;
        for &i in &eligible {
            let name = candidates[i].tenant.as_str();
            let st = self.tenants.entry(name.to_owned()).or_default();
            st.pass = st.pass.max(self.vtime);
            if tenant.is_none_or(|(p, n)| (st.pass, name) < (p, n)) {
                tenant = Some((st.pass, name));
            }
        }
        let (tpass, tname) = tenant?;
        let tname = tname.to_owned();
        let (tw, _) = self.weights.tenant(&tname);
        let kweights: HashMap<&str, u32> = eligible
            .iter()
            .filter(|&&i| candidates[i].tenant == tname)
            .map(|&i| {
                let k = candidates[i].key.as_str();
                (k, self.weights.key(k).0)
            })
            .collect();
        let st = self.tenants.get_mut(&tname)?;
        self.vtime = tpass;
        st.pass = tpass + 1.0 / f64::from(tw);
        // Key level, within the tenant.
        let mut key: Option<(f64, &str)> = None;
        for &name in kweights.keys() {
            let ks = st.keys.entry(name.to_owned()).or_default();
            ks.pass = ks.pass.max(st.vtime);
            if key.is_none_or(|(p, n)| (ks.pass, name) < (p, n)) {
                key = Some((ks.pass, name));
            }
        }
        let (kpass, kname) = key?;
        let kw = kweights.get(kname).copied().unwrap_or(1);
        st.vtime = kpass;
        let ks = st.keys.entry(kname.to_owned()).or_default();
        ks.pass = kpass + 1.0 / f64::from(kw);
        ks.running += 1;
        st.running += 1;
        let chosen = eligible
            .into_iter()
            .find(|&i| candidates[i].tenant == tname && candidates[i].key == kname);
        self.picks += 1;
        if self.picks.is_multiple_of(1024) {
            self.forget_idle();
        }
        chosen
    }

    /// A task started by [`Scheduler::pick`] is over (settled or lost).
    pub fn finished(&mut self, k: &FairKey) {
        if let Some(t) = self.tenants.get_mut(&k.tenant) {
            t.running = t.running.saturating_sub(1);
            if let Some(s) = t.keys.get_mut(&k.key) {
                s.running = s.running.saturating_sub(1);
            }
        }
    }

    /// Tasks of `k` running (started and not finished).
    pub fn running(&self, k: &FairKey) -> u32 {
        self.tenants
            .get(&k.tenant)
            .and_then(|t| t.keys.get(&k.key))
            .map_or(0, |s| s.running)
    }

    /// Drops the state of tenants and keys that run nothing and owe nothing:
    /// coming back, they would start at the virtual time anyway. Bounds the
    /// memory to the keys active recently.
    fn forget_idle(&mut self) {
        let vtime = self.vtime;
        self.tenants.retain(|_, t| {
            let tv = t.vtime;
            t.keys.retain(|_, k| k.running > 0 || k.pass > tv);
            t.running > 0 || t.pass > vtime || !t.keys.is_empty()
        });
    }
}

/// Names keys and tenants in metric labels, up to a bound: the listed ones
/// always, then the first `limit` others seen; the rest are `other`.
#[derive(Debug)]
struct LabelBudget {
    limit: usize,
    named: HashSet<String>,
}

impl LabelBudget {
    fn label(&mut self, weights: &Weights, name: &str) -> String {
        if weights.listed(name) || self.named.contains(name) {
            return name.to_owned();
        }
        if self.named.len() < self.limit {
            self.named.insert(name.to_owned());
            return name.to_owned();
        }
        "other".to_owned()
    }
}

struct Held<D> {
    delivery: D,
    key: FairKey,
    source: usize,
    since: Instant,
}

/// The scheduler's choice, and the deliveries held too long to hand back.
type Choice<D> = (Option<FairDelivery<D>>, Vec<Held<D>>);

struct State<D> {
    scheduler: Scheduler,
    buffer: VecDeque<Held<D>>,
    labels: LabelBudget,
    /// Per source: tasks from it running here, and its channel's bound.
    running: Vec<u16>,
    limiters: Vec<Option<Arc<dyn ChannelLimit>>>,
}

struct Shared<D> {
    state: Mutex<State<D>>,
    /// Woken when a delivery arrives or a running task finishes.
    changed: Notify,
    metrics: Option<Arc<Metrics>>,
    /// Per source: the bound its channel should have (applied by
    /// [`apply_limits`]).
    targets: Vec<watch::Sender<u16>>,
    per_shard: u16,
}

impl<D> Shared<D> {
    /// Asks for source `i`'s channel bound to be its running tasks plus the
    /// buffer, now (always notifies, so a new channel gets it too).
    fn retarget(&self, st: &State<D>, i: usize) {
        let target = self.per_shard.saturating_add(st.running[i]);
        if let Some(t) = self.targets.get(i) {
            t.send_modify(|v| *v = target);
        }
    }
}

/// Keeps source `i`'s channel bound at its target: no worker holds more of
/// a shard than it runs plus `prefetch_per_shard`.
async fn apply_limits<D: Send + 'static>(
    i: usize,
    shared: Arc<Shared<D>>,
    mut target: watch::Receiver<u16>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = target.changed() => if r.is_err() { return },
        }
        let n = *target.borrow_and_update();
        let limiter = shared.lock().limiters.get(i).cloned().flatten();
        if let Some(l) = limiter
            && let Err(e) = l.set(n).await
        {
            debug!(error = %e, source = i, "setting a shard channel's bound");
        }
    }
}

impl<D> Shared<D> {
    fn lock(&self) -> MutexGuard<'_, State<D>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn labels<D>(st: &mut State<D>, k: &FairKey) -> (String, String) {
    let w = st.scheduler.weights.clone();
    (st.labels.label(&w, &k.tenant), st.labels.label(&w, &k.key))
}

/// The task queue shards as one [`Broker`], choosing fairly between them.
pub struct FairBroker<B: Broker> {
    sources: Vec<Arc<B>>,
    /// One per source: free buffer places (`prefetch_per_shard`).
    room: Vec<Arc<Semaphore>>,
    shared: Arc<Shared<B::Delivery>>,
    max_hold: Duration,
    queue_name: String,
    stop: CancellationToken,
    /// False until every source is subscribed (at start, after a resume).
    warm: std::sync::atomic::AtomicBool,
}

/// How long, once every shard is subscribed, the first choice waits for the
/// shards' first deliveries: without it the first tasks would go to whichever
/// shard happened to deliver first.
const WARM_UP_GRACE: Duration = Duration::from_millis(200);

/// The longest the first choice waits for every shard to be subscribed.
const WARM_UP_LIMIT: Duration = Duration::from_secs(5);

impl<B: Broker> std::fmt::Debug for FairBroker<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairBroker")
            .field("sources", &self.sources.len())
            .field("queue", &self.queue_name)
            .finish()
    }
}

impl<B: Broker> FairBroker<B> {
    /// Consumes every source (the task queue and its shards), holding at
    /// most `settings.prefetch_per_shard` received deliveries per source;
    /// `queue_name` names the total depth in metrics (the HPA's signal).
    pub fn new(
        sources: Vec<B>,
        settings: &FairnessSettings,
        queue_name: String,
        metrics: Option<Arc<Metrics>>,
    ) -> FairBroker<B> {
        let per = usize::from(settings.prefetch_per_shard.max(1));
        let n = sources.len();
        let (targets, receivers): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| watch::channel(settings.prefetch_per_shard.max(1)))
            .unzip();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                scheduler: Scheduler::new(Weights::new(settings)),
                buffer: VecDeque::new(),
                labels: LabelBudget {
                    limit: settings.metric_keys,
                    named: HashSet::new(),
                },
                running: vec![0; n],
                limiters: (0..n).map(|_| None).collect(),
            }),
            changed: Notify::new(),
            metrics,
            targets,
            per_shard: settings.prefetch_per_shard.max(1),
        });
        let stop = CancellationToken::new();
        for (i, rx) in receivers.into_iter().enumerate() {
            tokio::spawn(apply_limits(i, shared.clone(), rx, stop.clone()));
        }
        let sources: Vec<Arc<B>> = sources.into_iter().map(Arc::new).collect();
        let room: Vec<Arc<Semaphore>> = sources
            .iter()
            .map(|_| Arc::new(Semaphore::new(per)))
            .collect();
        for (i, source) in sources.iter().enumerate() {
            tokio::spawn(pump(
                i,
                source.clone(),
                room[i].clone(),
                shared.clone(),
                stop.clone(),
            ));
        }
        FairBroker {
            sources,
            room,
            shared,
            max_hold: Duration::from_secs(settings.max_hold_secs.max(1)),
            queue_name,
            stop,
            warm: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Waits (once) until every shard is subscribed and has had a moment to
    /// deliver, so the first choices see every shard's head.
    async fn warm_up(&self) {
        use std::sync::atomic::Ordering;
        if self.warm.load(Ordering::Acquire) {
            return;
        }
        let until = Instant::now() + WARM_UP_LIMIT;
        while !self.sources.iter().all(|s| s.is_connected()) && Instant::now() < until {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        tokio::select! {
            _ = self.stop.cancelled() => return,
            _ = tokio::time::sleep(WARM_UP_GRACE) => {}
        }
        self.warm.store(true, Ordering::Release);
    }

    /// Tasks of `k` this worker runs now.
    pub fn running(&self, k: &FairKey) -> u32 {
        self.shared.lock().scheduler.running(k)
    }

    /// Hands every buffered delivery back to its shard (fresh copies).
    async fn release_buffer(&self) {
        let held: Vec<Held<B::Delivery>> = {
            let mut st = self.shared.lock();
            let held: Vec<_> = st.buffer.drain(..).collect();
            for h in &held {
                let (t, k) = labels(&mut st, &h.key);
                if let Some(m) = &self.shared.metrics {
                    m.fair_queued(&t, &k, -1);
                }
            }
            held
        };
        for h in held {
            self.room[h.source].add_permits(1);
            if let Err(e) = h.delivery.release().await {
                debug!(error = %e, "release of a buffered delivery");
            }
        }
    }

    /// Takes the scheduler's choice out of the buffer, or the deliveries held
    /// past `max_hold` to hand back.
    fn choose(&self) -> Choice<B::Delivery> {
        let mut st = self.shared.lock();
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut i = 0;
        while i < st.buffer.len() {
            if now.duration_since(st.buffer[i].since) >= self.max_hold {
                if let Some(h) = st.buffer.remove(i) {
                    expired.push(h);
                }
            } else {
                i += 1;
            }
        }
        for h in &expired {
            let (t, k) = labels(&mut st, &h.key);
            if let Some(m) = &self.shared.metrics {
                m.fair_queued(&t, &k, -1);
            }
        }
        let keys: Vec<FairKey> = st.buffer.iter().map(|h| h.key.clone()).collect();
        let refs: Vec<&FairKey> = keys.iter().collect();
        let Some(i) = st.scheduler.pick(&refs) else {
            return (None, expired);
        };
        let Some(h) = st.buffer.remove(i) else {
            return (None, expired);
        };
        let (t, k) = labels(&mut st, &h.key);
        if let Some(m) = &self.shared.metrics {
            m.fair_queued(&t, &k, -1);
            m.fair_started(&t, &k);
        }
        st.running[h.source] = st.running[h.source].saturating_add(1);
        self.shared.retarget(&st, h.source);
        drop(st);
        self.room[h.source].add_permits(1);
        let finish = Finish {
            shared: self.shared.clone(),
            key: h.key,
            source: h.source,
            labels: (t, k),
        };
        (
            Some(FairDelivery {
                inner: h.delivery,
                _finish: finish,
            }),
            expired,
        )
    }
}

/// The production fair broker: a [`RabbitBroker`] on `<p>.tasks` and on each
/// shard, its retries through the one ladder. Each one's prefetch is
/// `prefetch_per_shard` plus the worker's concurrency: the tasks a worker
/// runs stay unacked on the channel they came on, so a shard whose tasks
/// run here must still be able to put its next delivery in front of the
/// scheduler.
pub fn rabbit_shards(
    amqp: &Amqp,
    topology: &Topology,
    publisher: &Publisher,
    settings: &FairnessSettings,
    concurrency: u16,
    metrics: Arc<Metrics>,
) -> FairBroker<RabbitBroker> {
    let prefetch = settings.prefetch_per_shard.saturating_add(concurrency);
    let sources = topology
        .task_queues()
        .into_iter()
        .map(|queue| {
            let mut t = topology.clone();
            // Releases of a delivery go back to the queue it came from.
            t.tasks_queue = queue;
            RabbitBroker::new(amqp.clone(), t, publisher.clone(), prefetch)
        })
        .collect();
    FairBroker::new(
        sources,
        settings,
        topology.tasks_queue.clone(),
        Some(metrics),
    )
}

/// Moves one source's deliveries into the shared buffer while it has room.
async fn pump<B: Broker>(
    index: usize,
    source: Arc<B>,
    room: Arc<Semaphore>,
    shared: Arc<Shared<B::Delivery>>,
    stop: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = room.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let d = tokio::select! {
            _ = stop.cancelled() => return,
            // Cancel-safe by the Broker contract.
            d = source.next_delivery() => d,
        };
        match d {
            Ok(d) => {
                // The place stays taken until the delivery leaves the buffer.
                permit.forget();
                let key = FairKey::peek(d.body()).unwrap_or_else(|| FairKey {
                    tenant: UNKNOWN.to_owned(),
                    key: UNKNOWN.to_owned(),
                });
                {
                    let mut st = shared.lock();
                    let stale = st.limiters[index].as_ref().is_none_or(|l| !l.is_open());
                    if stale && let Some(l) = d.channel_limit() {
                        // A new channel (first delivery, or a resubscribe):
                        // it gets its bound now.
                        st.limiters[index] = Some(l);
                        shared.retarget(&st, index);
                    }
                    let (t, k) = labels(&mut st, &key);
                    if let Some(m) = &shared.metrics {
                        m.fair_queued(&t, &k, 1);
                    }
                    st.buffer.push_back(Held {
                        delivery: d,
                        key,
                        source: index,
                        since: Instant::now(),
                    });
                }
                shared.changed.notify_waiters();
                shared.changed.notify_one();
            }
            Err(BrokerError::Closed) => return,
            Err(e) => {
                drop(permit);
                warn!(error = %e, source = index, "task queue shard unavailable");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

#[async_trait]
impl<B: Broker> Broker for FairBroker<B> {
    type Delivery = FairDelivery<B::Delivery>;

    async fn next_delivery(&self) -> Result<Self::Delivery, BrokerError> {
        self.warm_up().await;
        loop {
            if self.stop.is_cancelled() {
                return Err(BrokerError::Closed);
            }
            // Registered before looking, so a change between the look and
            // the wait is not missed.
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (chosen, expired) = self.choose();
            for h in expired {
                self.room[h.source].add_permits(1);
                // Held past max_hold behind a cap: back to its shard as a
                // fresh copy, so the consumer timeout never hits it.
                if let Err(e) = h.delivery.release().await {
                    debug!(error = %e, "release of a held delivery");
                }
            }
            if let Some(d) = chosen {
                return Ok(d);
            }
            tokio::select! {
                _ = self.stop.cancelled() => return Err(BrokerError::Closed),
                _ = &mut changed => {}
                // Re-checks holds even when nothing happens.
                _ = tokio::time::sleep(self.max_hold) => {}
            }
        }
    }

    async fn publish_retry(&self, msg: RetryMessage) -> Result<(), BrokerError> {
        match self.sources.first() {
            Some(s) => s.publish_retry(msg).await,
            None => Err(BrokerError::Closed),
        }
    }

    async fn pause(&self) -> Result<(), BrokerError> {
        for s in &self.sources {
            s.pause().await?;
        }
        self.release_buffer().await;
        Ok(())
    }

    async fn resume(&self) -> Result<(), BrokerError> {
        self.warm.store(false, std::sync::atomic::Ordering::Release);
        for s in &self.sources {
            s.resume().await?;
        }
        Ok(())
    }

    async fn queue_depth(&self) -> Result<u64, BrokerError> {
        let mut total = 0;
        for s in &self.sources {
            total += s.queue_depth().await?;
        }
        Ok(total)
    }

    fn queue_name(&self) -> String {
        self.queue_name.clone()
    }

    fn delivery_limit(&self) -> Option<u32> {
        self.sources.first().and_then(|s| s.delivery_limit())
    }

    fn is_connected(&self) -> bool {
        self.sources.iter().all(|s| s.is_connected())
    }

    async fn close(&self) -> Result<(), BrokerError> {
        for s in &self.sources {
            s.pause().await?;
        }
        self.release_buffer().await;
        self.stop.cancel();
        for s in &self.sources {
            s.close().await?;
        }
        Ok(())
    }
}

/// Marks the task finished for the scheduler when its delivery is settled,
/// lost or dropped.
struct Finish<D> {
    shared: Arc<Shared<D>>,
    key: FairKey,
    source: usize,
    labels: (String, String),
}

impl<D> Drop for Finish<D> {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.scheduler.finished(&self.key);
            st.running[self.source] = st.running[self.source].saturating_sub(1);
            self.shared.retarget(&st, self.source);
        }
        if let Some(m) = &self.shared.metrics {
            m.fair_finished(&self.labels.0, &self.labels.1);
        }
        // A capped key may be eligible again.
        self.shared.changed.notify_waiters();
        self.shared.changed.notify_one();
    }
}

/// A delivery chosen by the [`FairBroker`]; settles like the inner one.
pub struct FairDelivery<D> {
    inner: D,
    _finish: Finish<D>,
}

impl<D: Delivery> std::fmt::Debug for FairDelivery<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairDelivery")
            .field("key", &self._finish.key)
            .finish()
    }
}

#[async_trait]
impl<D: Delivery> Delivery for FairDelivery<D> {
    fn body(&self) -> &[u8] {
        self.inner.body()
    }
    fn attempt(&self) -> u32 {
        self.inner.attempt()
    }
    fn traceparent(&self) -> Option<&str> {
        self.inner.traceparent()
    }
    fn redelivered(&self) -> bool {
        self.inner.redelivered()
    }
    fn delivery_count(&self) -> u32 {
        self.inner.delivery_count()
    }
    fn lost(&self) -> CancellationToken {
        self.inner.lost()
    }
    async fn ack(self) -> Result<(), BrokerError> {
        self.inner.ack().await
    }
    async fn dead_letter(self, code: &str, reason: &str) -> Result<(), BrokerError> {
        self.inner.dead_letter(code, reason).await
    }
    async fn release(self) -> Result<(), BrokerError> {
        self.inner.release().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use sandfleet_settings::FairShare;

    fn k(tenant: &str, key: &str) -> FairKey {
        FairKey {
            tenant: tenant.into(),
            key: key.into(),
        }
    }

    fn share(name: &str, weight: u32, cap: u32) -> FairShare {
        FairShare {
            name: name.into(),
            weight,
            cap,
        }
    }

    /// Runs `n` picks with every key always having work; tasks finish at once.
    fn serve(s: &mut Scheduler, keys: &[FairKey], n: usize) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for _ in 0..n {
            let refs: Vec<&FairKey> = keys.iter().collect();
            let i = s.pick(&refs).unwrap();
            *out.entry(keys[i].key.clone()).or_default() += 1;
            s.finished(&keys[i]);
        }
        out
    }

    #[test]
    fn equal_weights_share_equally_whatever_the_backlog() {
        let mut s = Scheduler::new(Weights::new(&FairnessSettings::default()));
        let keys: Vec<_> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|r| k(r, &format!("{r}/repo")))
            .collect();
        let got = serve(&mut s, &keys, 500);
        assert!(got.values().all(|&n| n == 100), "{got:?}");
    }

    #[test]
    fn weights_set_the_shares() {
        let settings = FairnessSettings {
            tenants: vec![share("a", 3, 0)],
            ..FairnessSettings::default()
        };
        let mut s = Scheduler::new(Weights::new(&settings));
        let keys = vec![k("a", "a/x"), k("b", "b/x")];
        let got = serve(&mut s, &keys, 400);
        assert_eq!(got["a/x"], 300);
        assert_eq!(got["b/x"], 100);
    }

    #[test]
    fn a_tenant_split_over_twenty_keys_gets_its_tenant_share_only() {
        let mut s = Scheduler::new(Weights::new(&FairnessSettings::default()));
        let mut keys: Vec<_> = (0..20).map(|i| k("big", &format!("big/r{i}"))).collect();
        keys.push(k("small", "small/r"));
        let got = serve(&mut s, &keys, 400);
        assert_eq!(got["small/r"], 200);
        let big: usize = got
            .iter()
            .filter(|(k, _)| k.starts_with("big/"))
            .map(|(_, n)| n)
            .sum();
        assert_eq!(big, 200);
        // And the big tenant's keys share its half evenly.
        assert!((0..20).all(|i| got[&format!("big/r{i}")] == 10), "{got:?}");
    }

    #[test]
    fn a_key_returning_from_idle_banks_no_credit() {
        let mut s = Scheduler::new(Weights::new(&FairnessSettings::default()));
        let a = k("a", "a/x");
        let b = k("b", "b/x");
        // Only `a` has work for a long while.
        serve(&mut s, std::slice::from_ref(&a), 1000);
        // Then both: `b` does not get 1000 picks in a row.
        let got = serve(&mut s, &[a.clone(), b.clone()], 100);
        assert_eq!(got["a/x"], 50);
        assert_eq!(got["b/x"], 50);
    }

    #[test]
    fn caps_hold_and_free_up_when_tasks_finish() {
        let settings = FairnessSettings {
            keys: vec![share("a/x", 1, 2)],
            ..FairnessSettings::default()
        };
        let mut s = Scheduler::new(Weights::new(&settings));
        let a = k("a", "a/x");
        let refs = [&a];
        assert_eq!(s.pick(&refs), Some(0));
        assert_eq!(s.pick(&refs), Some(0));
        assert_eq!(s.pick(&refs), None, "third task over the cap of 2");
        let b = k("b", "b/x");
        assert_eq!(s.pick(&[&a, &b]), Some(1), "another key is not held up");
        s.finished(&a);
        assert_eq!(s.running(&a), 1);
        assert_eq!(s.pick(&refs), Some(0));
    }

    #[test]
    fn the_oldest_delivery_of_the_chosen_key_goes_first() {
        let mut s = Scheduler::new(Weights::new(&FairnessSettings::default()));
        let a = k("a", "a/x");
        let b = k("b", "b/x");
        assert_eq!(s.pick(&[&b, &a, &b]), Some(1));
        assert_eq!(s.pick(&[&b, &a, &b]), Some(0));
    }
}
