//! Warm pools: the service keeps each configured pool full and serves
//! `pool: NAME` creates from it.
//!
//! Every replica runs the same manager: a watch on session Jobs feeds a
//! [`PoolIndex`] with the members (and the per-token session count with the
//! owned ones); after each change (and every second, for max age) the
//! index's [`plan`](PoolIndex::plan) says what to create and delete, and the
//! manager does it. Member names are deterministic, so two replicas acting
//! on the same view create each member once (the second gets 409), and
//! deletes carry the resourceVersion they were planned on, so a member
//! claimed meanwhile is never deleted. A claim is a conditional patch
//! ([`KubeSessions::claim_member`]); losing it moves on to the next member,
//! and an empty pool is a cold start, never an error.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::watcher;
use sandfleet_sandbox::session::kubernetes::pool::ClaimOutcome;
use sandfleet_sandbox::session::kubernetes::{SESSION_SELECTOR, SessionMeta, pod};
use sandfleet_sandbox::session::pool::{Candidate, MemberState, PoolIndex, PoolTemplate};
use sandfleet_sandbox::session::{KubeSessions, SessionBackend as _, SessionId, SessionSpec};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::LABEL_OWNER;
use crate::metrics::Metrics;

/// A member still warming after this long is taken for broken and replaced.
const WARM_TIMEOUT: Duration = Duration::from_secs(600);

/// A member warming this long with no local creator is adopted: its
/// creator (another replica) may have died before marking it idle.
const ADOPT_AFTER: Duration = Duration::from_secs(10);

/// Members one replica starts at once. A burst of claims refills at once but
/// not all at once: a hundred Job creates, pod watches and readiness execs
/// in the same instant would slow the claims of that burst (same API server,
/// same replica) more than a slightly later refill costs.
const START_CONCURRENCY: usize = 8;

/// How long another replica's claim keeps its slot's refill that replica's
/// alone: it refills at once, and this replica steps in only if it has not
/// (it died, or its start failed).
const REFILL_GRACE: Duration = Duration::from_secs(10);

/// How often the plan runs without a change (max age, stuck members).
const TICK: Duration = Duration::from_secs(1);

/// How long the plan waits after a change for the changes that come with
/// it: a burst of claims is hundreds of watch events, and a plan scans
/// every member. A refill starts this much later; the plan runs a few dozen
/// times a second at most instead of once per event.
const SETTLE: Duration = Duration::from_millis(20);

/// The pools of the `[[sessions.pools]]` settings (validated at load).
pub fn templates(settings: &sandfleet_settings::SessionsSettings) -> Vec<PoolTemplate> {
    settings
        .pools
        .iter()
        .map(|p| PoolTemplate {
            name: p.name.clone(),
            image: p.image.clone(),
            resources: sandfleet_proto::Resources {
                cpu_request: p.cpu_request.clone(),
                cpu_limit: p.cpu_limit.clone(),
                memory_request: p.memory_request.clone(),
                memory_limit: p.memory_limit.clone(),
            },
            size: p.size,
            max_age: Duration::from_secs(p.max_age_secs),
        })
        .collect()
}

/// A pool as the list endpoint shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolInfo {
    /// The pool's name.
    pub name: String,
    /// Its image.
    pub image: String,
    /// Idle members it keeps.
    pub size: usize,
    /// Idle members now.
    pub idle: usize,
    /// Members starting now.
    pub warming: usize,
    /// Members serving sessions now.
    pub claimed: usize,
    /// Max age of an idle member, seconds.
    pub max_age_secs: u64,
}

/// The warm pools of one replica.
pub struct Pools {
    backend: KubeSessions,
    templates: Vec<PoolTemplate>,
    /// The longest lifetime a session may ask for (members leave room for it).
    max_lifetime: Duration,
    index: Mutex<PoolIndex>,
    /// Members this replica is claiming right now (not offered to its other claims).
    claiming: Mutex<HashSet<String>>,
    /// Members this replica is creating or deleting.
    pending: Mutex<HashSet<String>>,
    /// Claimed members seen serving their session.
    confirmed: Mutex<HashSet<String>>,
    /// Members this replica claimed (their refill is this replica's).
    claimed_here: Mutex<HashSet<String>>,
    /// Live (not ended) sessions by Job name, with their owner label: the
    /// per-token count of the session limit, read without a LIST per create.
    sessions: Mutex<HashMap<String, String>>,
    synced: AtomicBool,
    wake: Notify,
    starts: Arc<tokio::sync::Semaphore>,
    /// Claims under way here; fair, so they are served in arrival order.
    claims: tokio::sync::Semaphore,
    spread: AtomicU64,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools")
            .field("templates", &self.templates)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pools {
    /// The pools `templates` over `backend`; sessions live at most
    /// `max_lifetime`; at most `claims_in_flight` claims are under way at
    /// once (the rest wait their turn, in arrival order).
    pub fn new(
        backend: KubeSessions,
        templates: Vec<PoolTemplate>,
        max_lifetime: Duration,
        claims_in_flight: usize,
    ) -> Pools {
        Pools {
            backend,
            templates,
            max_lifetime,
            index: Mutex::default(),
            claiming: Mutex::default(),
            pending: Mutex::default(),
            confirmed: Mutex::default(),
            claimed_here: Mutex::default(),
            sessions: Mutex::default(),
            synced: AtomicBool::new(false),
            wake: Notify::new(),
            starts: Arc::new(tokio::sync::Semaphore::new(START_CONCURRENCY)),
            claims: tokio::sync::Semaphore::new(claims_in_flight.max(1)),
            spread: AtomicU64::new(rand_seed()),
        }
    }

    /// The configured pool `name`.
    pub fn template(&self, name: &str) -> Option<&PoolTemplate> {
        self.templates.iter().find(|t| t.name == name)
    }

    /// Every configured pool with its counts.
    pub fn list(&self) -> Vec<PoolInfo> {
        let index = lock(&self.index);
        self.templates
            .iter()
            .map(|t| PoolInfo {
                name: t.name.clone(),
                image: t.image.clone(),
                size: t.size,
                idle: index.count(&t.name, MemberState::Idle),
                warming: index.count(&t.name, MemberState::Warming),
                claimed: index.count(&t.name, MemberState::Claimed),
                max_age_secs: t.max_age.as_secs(),
            })
            .collect()
    }

    /// Whether the watch has listed the members once (plans before that
    /// would refill pools that are already full).
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// How many live sessions the owner labelled `owner` holds, as the watch
    /// and this replica's own creates and teardowns say; `None` until the
    /// watch has listed them once. Another replica's create shows once the
    /// watch brings it (as with a LIST, two creates at the same moment can
    /// both pass a limit).
    pub fn sessions_of(&self, owner: &str) -> Option<usize> {
        if !self.synced() {
            return None;
        }
        Some(
            lock(&self.sessions)
                .values()
                .filter(|o| *o == owner)
                .count(),
        )
    }

    /// Counts session `id` of `owner` at once (this replica just started it).
    pub fn note_session(&self, id: &SessionId, owner: &str) {
        lock(&self.sessions).insert(id.0.clone(), owner.to_owned());
    }

    /// Stops counting session `id` (this replica just tore it down).
    pub fn forget_session(&self, id: &SessionId) {
        lock(&self.sessions).remove(&id.0);
    }

    /// Counts `job` as a live session of its owner, or stops counting it
    /// (no owner: a member not claimed yet; or ended).
    fn count(&self, job: &Job) {
        let Some(name) = job.metadata.name.as_ref() else {
            return;
        };
        let owner = job
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_OWNER));
        let ended = pod::job_ended(job);
        let mut sessions = lock(&self.sessions);
        match owner {
            Some(o) if !ended => {
                sessions.insert(name.clone(), o.clone());
            }
            _ => {
                sessions.remove(name);
            }
        }
    }

    /// Claims an idle member of `pool` for a session with `spec` and `meta`:
    /// tries the idle members in turn, those this replica started first (a
    /// lost race moves on), hands the
    /// winner the session's values, and starts the refill. `None` when no
    /// member could be had: the caller starts the session cold.
    ///
    /// A claim first waits its turn: a burst of claims is served a few at a
    /// time, in arrival order, so the first are done in milliseconds instead
    /// of every one finishing at the pace of the last (the API server, the
    /// execs and this replica share their CPU; see `Limits::claims_in_flight`).
    pub async fn claim(
        &self,
        pool: &PoolTemplate,
        spec: &SessionSpec,
        meta: &SessionMeta,
    ) -> Option<SessionId> {
        let _permit = self.claims.acquire().await.ok()?;
        let spread = self
            .spread
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        let mut candidates = {
            let busy = lock(&self.claiming);
            lock(&self.index).candidates(pool, &busy, spread)
        };
        // Members this replica started first (in spread order still), so two
        // replicas claiming at once mostly claim different members. (The
        // hand-over needs no pod lookup either way: a member's Job names its
        // pod.)
        candidates.sort_by_key(|c| !self.backend.knows(&SessionId(c.name.clone())));
        for Candidate {
            name,
            resource_version: rv,
            pod,
            stdin_handover,
        } in candidates
        {
            if !lock(&self.claiming).insert(name.clone()) {
                continue;
            }
            let outcome = self.backend.claim_member(&name, &rv, spec, meta).await;
            let claimed = match outcome {
                Ok(ClaimOutcome::Claimed) => true,
                Ok(ClaimOutcome::Lost) => false,
                Err(e) => {
                    tracing::warn!(member = %name, "claiming a pool member: {e}");
                    false
                }
            };
            if !claimed {
                lock(&self.claiming).remove(&name);
                continue;
            }
            lock(&self.claimed_here).insert(name.clone());
            lock(&self.index).mark_claimed(&name);
            // Refill now, not when the watch reports the claim.
            self.wake.notify_one();
            let id = SessionId(name.clone());
            let activated = self
                .backend
                .activate_member(&id, spec, pod.as_deref(), stdin_handover)
                .await;
            lock(&self.claiming).remove(&name);
            match activated {
                Ok(()) => {
                    lock(&self.confirmed).insert(name);
                    return Some(id);
                }
                Err(e) => {
                    tracing::warn!(member = %name, "a claimed pool member failed to take the session: {e}");
                    let _ = self.backend.teardown(&id).await;
                }
            }
        }
        None
    }

    /// Keeps the pools full until `shutdown`: the watch feeds the index, the
    /// plan runs after every change (changes [`SETTLE`] apart at most run it
    /// once) and every second.
    pub async fn run(self: Arc<Self>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
        for t in &self.templates {
            metrics
                .pool_size
                .get_or_create(&Metrics::pool(&t.name))
                .set(i64::try_from(t.size).unwrap_or(i64::MAX));
        }
        let watch = tokio::spawn(self.clone().watch(shutdown.clone()));
        let mut last_check = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(SETTLE) => {}
                    }
                }
                () = tokio::time::sleep(TICK) => {}
            }
            if !self.synced() {
                continue;
            }
            self.reconcile();
            for t in &self.templates {
                let idle = lock(&self.index).count(&t.name, MemberState::Idle);
                metrics
                    .pool_idle
                    .get_or_create(&Metrics::pool(&t.name))
                    .set(i64::try_from(idle).unwrap_or(i64::MAX));
            }
            if last_check.elapsed() >= TICK {
                last_check = Instant::now();
                self.check_claims();
                self.adopt_warming();
            }
        }
        watch.abort();
    }

    async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        // Every session Job, not only members: the index takes the members,
        // the session count the owned ones.
        let config = watcher::Config::default().labels(SESSION_SELECTOR);
        let stream = self.backend.jobs_watch(config);
        futures::pin_mut!(stream);
        let mut listing = Vec::new();
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                e = stream.next() => e,
            };
            let Some(event) = event else { return };
            match event {
                Ok(watcher::Event::Apply(job)) => {
                    lock(&self.index).apply(&job);
                    self.count(&job);
                }
                Ok(watcher::Event::Delete(job)) => {
                    if let Some(name) = job.metadata.name.as_deref() {
                        lock(&self.index).delete(name);
                        lock(&self.confirmed).remove(name);
                        lock(&self.claimed_here).remove(name);
                        lock(&self.sessions).remove(name);
                    }
                }
                Ok(watcher::Event::Init) => listing.clear(),
                Ok(watcher::Event::InitApply(job)) => listing.push(job),
                Ok(watcher::Event::InitDone) => {
                    lock(&self.index).reset(listing.iter());
                    lock(&self.sessions).clear();
                    // Members deleted while the watch was away are gone here too.
                    let names: HashSet<&str> = listing
                        .iter()
                        .filter_map(|j| j.metadata.name.as_deref())
                        .collect();
                    lock(&self.confirmed).retain(|n| names.contains(n.as_str()));
                    lock(&self.claimed_here).retain(|n| names.contains(n.as_str()));
                    for job in &listing {
                        self.count(job);
                    }
                    listing.clear();
                    self.synced.store(true, Ordering::Relaxed);
                }
                // The watcher retries by itself; say so and go on.
                Err(e) => {
                    tracing::warn!("pool member watch: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            self.wake.notify_one();
        }
    }

    /// Runs the plan once: spawns the creates and deletes not already under way.
    fn reconcile(self: &Arc<Self>) {
        let now = SystemTime::now();
        let plan = {
            let index = lock(&self.index);
            let mut plan = index.plan(&self.templates, now, WARM_TIMEOUT);
            let mine = lock(&self.claimed_here);
            plan.create
                .retain(|m| !index.refill_left_to_claimer(m, &mine, now, REFILL_GRACE));
            plan
        };
        for m in plan.create {
            let name = m.name();
            if !lock(&self.pending).insert(name.clone()) {
                continue;
            }
            let Some(t) = self.template(&m.pool).cloned() else {
                lock(&self.pending).remove(&name);
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let permit = this.starts.clone().acquire_owned().await;
                if let Err(e) = this.backend.create_member(&t, &m, this.max_lifetime).await {
                    tracing::warn!(member = %name, "starting a pool member: {e}");
                }
                drop(permit);
                lock(&this.pending).remove(&name);
                this.wake.notify_one();
            });
        }
        for (name, rv, why) in plan.delete {
            if lock(&self.claiming).contains(&name) || !lock(&self.pending).insert(name.clone()) {
                continue;
            }
            let this = self.clone();
            tokio::spawn(async move {
                tracing::info!(member = %name, reason = ?why, "removing a pool member");
                if let Err(e) = this.backend.delete_member(&name, Some(&rv)).await {
                    tracing::warn!(member = %name, "removing a pool member: {e}");
                }
                lock(&this.pending).remove(&name);
            });
        }
    }

    /// Finishes the start of members whose creator went quiet.
    fn adopt_warming(self: &Arc<Self>) {
        let stuck = lock(&self.index).warming_longer_than(SystemTime::now(), ADOPT_AFTER);
        for name in stuck {
            if !lock(&self.pending).insert(name.clone()) {
                continue;
            }
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.backend.promote_member(&name).await {
                    tracing::warn!(member = %name, "adopting a warming pool member: {e}");
                }
                lock(&this.pending).remove(&name);
            });
        }
    }

    /// Deletes claimed members that never got their session's values (the
    /// claiming replica died in between), once past the session's idle timeout.
    fn check_claims(self: &Arc<Self>) {
        let suspects = {
            let confirmed = lock(&self.confirmed);
            lock(&self.index).unconfirmed_claims(SystemTime::now(), &confirmed)
        };
        for name in suspects {
            if lock(&self.claiming).contains(&name) || !lock(&self.pending).insert(name.clone()) {
                continue;
            }
            let this = self.clone();
            tokio::spawn(async move {
                let id = SessionId(name.clone());
                match this.backend.member_activated(&id).await {
                    Ok(true) => {
                        lock(&this.confirmed).insert(name.clone());
                    }
                    Ok(false) => {
                        tracing::warn!(member = %name, "a pool member was claimed but never handed its session: deleting it");
                        let _ = this.backend.teardown(&id).await;
                    }
                    Err(e) => tracing::debug!(member = %name, "checking a claimed member: {e}"),
                }
                lock(&this.pending).remove(&name);
            });
        }
    }
}

/// A per-replica starting point for spreading claims over members (two
/// replicas starting at the same member would race for it every time).
fn rand_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}
