//! The shared watcher: one `runtime::watcher` on sandfleet Jobs and one on
//! their Pods per executor, feeding a map that per-attempt futures subscribe
//! to by Job name. No per-task watch, no polling.
//!
//! kube's watcher re-lists by itself after a 410 (or any watch error); the
//! re-list arrives as `Init`, `InitApply`.., `InitDone`, and at `InitDone`
//! anything we knew that the re-list did not return is marked gone — that is
//! how a Job deleted (or a pod lost) during the gap is noticed.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{Stream, StreamExt};
use k8s_openapi::api::batch::v1::{Job, JobSpec, JobStatus};
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::KubeApi;
use super::job::{LABEL_JOB, MANAGED_SELECTOR};

/// What the watchers know about one Job and its pod.
///
/// The objects are kept slim (metadata and status, see [`slim_job`]) and
/// shared: the hub, every subscriber's snapshot and every wake-up of a
/// waiting attempt hold the same allocation, so a clone is two reference
/// counts, not a copy of the Job and Pod.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The Job's latest state (kept after deletion).
    pub job: Option<Arc<Job>>,
    /// The Job was deleted.
    pub job_gone: bool,
    /// The newest pod of the Job (kept after deletion).
    pub pod: Option<Arc<Pod>>,
    /// That pod was deleted.
    pub pod_gone: bool,
}

#[derive(Default)]
struct State {
    objects: HashMap<String, Observed>,
    /// One channel per Job, shared by every attempt future waiting on it (a
    /// redelivered task can run twice on one worker), with their count.
    subscribers: HashMap<String, (watch::Sender<Observed>, usize)>,
    jobs_synced: bool,
    pods_synced: bool,
}

/// The map the watchers feed and attempts subscribe to.
#[derive(Default)]
pub(crate) struct Hub {
    state: Mutex<State>,
    synced: Option<watch::Sender<bool>>,
}

/// A subscription; dropping it (or [`Subscription::leave`]) unsubscribes.
pub(crate) struct Subscription {
    hub: Arc<Hub>,
    name: String,
    /// Changes of the Job's observed state.
    pub(crate) rx: watch::Receiver<Observed>,
    left: bool,
}

impl Subscription {
    /// Unsubscribes and tells whether this was the Job's last subscription
    /// here. Decided under the hub's lock, so of several runs of one attempt
    /// leaving at once exactly one is the last: the one that deletes the Job
    /// (the others may still be reading its log).
    pub(crate) fn leave(mut self) -> bool {
        self.left = true;
        self.hub.unsubscribe(&self.name)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.left {
            self.hub.unsubscribe(&self.name);
        }
    }
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to `name`'s changes, starting from what is known now.
    pub(crate) fn subscribe(self: &Arc<Self>, name: &str) -> Subscription {
        let mut st = self.lock();
        let current = st.objects.get(name).cloned().unwrap_or_default();
        let rx = match st.subscribers.get_mut(name) {
            Some((tx, count)) => {
                *count += 1;
                tx.subscribe()
            }
            None => {
                let (tx, rx) = watch::channel(current);
                st.subscribers.insert(name.to_owned(), (tx, 1));
                rx
            }
        };
        Subscription {
            hub: self.clone(),
            name: name.to_owned(),
            rx,
            left: false,
        }
    }

    /// Drops one subscription to `name`; `true` when it was the last.
    fn unsubscribe(&self, name: &str) -> bool {
        let mut st = self.lock();
        if let Some((_, count)) = st.subscribers.get_mut(name) {
            *count -= 1;
            if *count > 0 {
                return false;
            }
        }
        st.subscribers.remove(name);
        // Forget finished business: nothing more will be asked about it.
        if st
            .objects
            .get(name)
            .is_some_and(|o| o.job_gone || o.job.is_none())
        {
            st.objects.remove(name);
        }
        true
    }

    /// Names of the Jobs with a subscriber (the attempts in flight here).
    pub(crate) fn in_flight(&self) -> HashSet<String> {
        self.lock().subscribers.keys().cloned().collect()
    }

    /// Waits until both watchers have listed once.
    pub(crate) async fn wait_synced(&self) {
        if let Some(tx) = &self.synced {
            let mut rx = tx.subscribe();
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut Observed)) {
        let mut st = self.lock();
        let State {
            objects,
            subscribers,
            ..
        } = &mut *st;
        let entry = objects.entry(name.to_owned()).or_default();
        f(entry);
        match subscribers.get(name) {
            Some((tx, _)) => {
                // The subscribers' snapshot shares the objects with the map.
                tx.send_replace(entry.clone());
            }
            None => {
                // Nobody waits for it and it is finished with: forget it.
                let done = (entry.job.is_none() || entry.job_gone)
                    && (entry.pod.is_none() || entry.pod_gone);
                if done {
                    objects.remove(name);
                }
            }
        }
    }

    fn mark_synced(&self, jobs: bool) {
        let mut st = self.lock();
        if jobs {
            st.jobs_synced = true;
        } else {
            st.pods_synced = true;
        }
        let both = st.jobs_synced && st.pods_synced;
        drop(st);
        if both && let Some(tx) = &self.synced {
            tx.send_replace(true);
        }
    }

    /// After a (re-)list: whatever was known and is not in `seen` is gone.
    fn reconcile(&self, seen: &HashSet<String>, jobs: bool) {
        let mut st = self.lock();
        let State {
            objects,
            subscribers,
            ..
        } = &mut *st;
        for (name, obs) in objects.iter_mut() {
            let changed = if jobs {
                let gone = obs.job.is_some() && !obs.job_gone && !seen.contains(name);
                obs.job_gone |= gone;
                gone
            } else {
                let pod_name = obs.pod.as_ref().and_then(|p| p.meta().name.clone());
                let gone = pod_name.is_some_and(|p| !seen.contains(&p)) && !obs.pod_gone;
                obs.pod_gone |= gone;
                gone
            };
            if changed && let Some((tx, _)) = subscribers.get(name) {
                tx.send_replace(obs.clone());
            }
        }
    }

    fn apply_job(&self, job: Job, deleted: bool) {
        let Some(name) = job.meta().name.clone() else {
            return;
        };
        let job = Arc::new(slim_job(job));
        self.update(&name, |o| {
            if deleted {
                o.job_gone = true;
                // The last state seen stays; the deleted object stands in
                // only for a Job this hub never saw alive.
                if o.job.is_none() {
                    o.job = Some(job);
                }
            } else {
                o.job = Some(job);
                o.job_gone = false;
            }
        });
    }

    fn apply_pod(&self, pod: Pod, deleted: bool) {
        let Some(job) = pod
            .meta()
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_JOB))
            .cloned()
        else {
            return;
        };
        let pod = Arc::new(slim_pod(pod));
        self.update(&job, |o| {
            let current = o
                .pod
                .as_ref()
                .and_then(|p| p.meta().creation_timestamp.clone());
            let incoming = pod.meta().creation_timestamp.clone();
            let same = o.pod.as_ref().map(|p| &p.meta().name) == Some(&pod.meta().name);
            // Keep the newest pod; a late event about an older one does not replace it.
            if same || o.pod.is_none() || incoming >= current {
                o.pod_gone = deleted;
                o.pod = Some(pod);
            }
        });
    }
}

/// A Job as the hub keeps it: metadata and status. The executor decides on
/// those alone and never reads the spec from the watch; the spec carries the
/// whole generated script (~9 KB as an env var). Managed fields go too.
///
/// Only `spec.suspend` stays, in an otherwise empty spec: it is Kueue's
/// admission decision (see `kueue`), and the Job controller's `Suspended`
/// condition may lag it.
pub(crate) fn slim_job(mut job: Job) -> Job {
    job.spec =
        job.spec
            .and_then(|s| s.suspend)
            .map(|suspend| k8s_openapi::api::batch::v1::JobSpec {
                suspend: Some(suspend),
                ..Default::default()
            });
    job.metadata.managed_fields = None;
    job
}

/// A Pod as the hub keeps it; see [`slim_job`]. Status (phase, conditions,
/// container states and termination message) and metadata stay.
pub(crate) fn slim_pod(mut pod: Pod) -> Pod {
    pod.spec = None;
    pod.metadata.managed_fields = None;
    pod
}

/// A sandfleet Job as the shared watch decodes it: metadata and status.
/// Decoding skips the spec (the script, once in the Job's template) without
/// allocating it, on every event of every Job.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct JobState {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<JobSpecState>,
    #[serde(default)]
    status: Option<JobStatus>,
}

/// Of a Job's spec, the watch reads `suspend` alone (Kueue's admission
/// decision); everything else in it is skipped unallocated.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct JobSpecState {
    #[serde(default)]
    suspend: Option<bool>,
}

/// A sandfleet Pod as the shared watch decodes it; see [`JobState`] (the
/// pod's spec carries the script again).
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct PodState {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    status: Option<PodStatus>,
}

impl From<JobState> for Job {
    fn from(s: JobState) -> Job {
        Job {
            metadata: s.metadata,
            spec: s.spec.and_then(|spec| spec.suspend).map(|suspend| JobSpec {
                suspend: Some(suspend),
                ..JobSpec::default()
            }),
            status: s.status,
        }
    }
}

impl From<PodState> for Pod {
    fn from(s: PodState) -> Pod {
        Pod {
            metadata: s.metadata,
            spec: None,
            status: s.status,
        }
    }
}

/// The slim types are read from the same API paths as the full ones.
macro_rules! resource_as {
    ($slim:ty, $full:ty) => {
        impl Resource for $slim {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::KIND.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::GROUP.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::VERSION.into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

resource_as!(JobState, Job);
resource_as!(PodState, Pod);

/// Starts the two watchers; they run until `stop` is cancelled.
pub(crate) fn start(api: &KubeApi, stop: CancellationToken) -> Arc<Hub> {
    let (tx, _) = watch::channel(false);
    let hub = Arc::new(Hub {
        state: Mutex::default(),
        synced: Some(tx),
    });
    let cfg = watcher::Config::default().labels(MANAGED_SELECTOR);
    let jobs = watcher::watcher(api.watch_api::<JobState>(), cfg.clone()).default_backoff();
    let pods = watcher::watcher(api.watch_api::<PodState>(), cfg).default_backoff();
    tokio::spawn(drive(jobs, hub.clone(), stop.clone(), true));
    tokio::spawn(drive(pods, hub.clone(), stop, false));
    hub
}

trait Watched: Resource + Clone + Send + 'static {
    fn observe(hub: &Hub, obj: Self, deleted: bool);
}

impl Watched for JobState {
    fn observe(hub: &Hub, obj: Self, deleted: bool) {
        hub.apply_job(obj.into(), deleted);
    }
}

impl Watched for PodState {
    fn observe(hub: &Hub, obj: Self, deleted: bool) {
        hub.apply_pod(obj.into(), deleted);
    }
}

async fn drive<K: Watched>(
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send,
    hub: Arc<Hub>,
    stop: CancellationToken,
    jobs: bool,
) {
    let mut stream = std::pin::pin!(stream);
    let mut seen: HashSet<String> = HashSet::new();
    loop {
        // `next()` on the watcher stream is cancel-safe.
        let event = tokio::select! {
            () = stop.cancelled() => return,
            e = stream.next() => e,
        };
        match event {
            None => return,
            Some(Err(e)) => {
                tracing::warn!(error = %e, kind = if jobs { "jobs" } else { "pods" }, "kubernetes watch error; the watcher re-lists")
            }
            Some(Ok(Event::Init)) => seen.clear(),
            Some(Ok(Event::InitApply(obj))) => {
                if let Some(name) = obj.meta().name.clone() {
                    seen.insert(name);
                }
                K::observe(&hub, obj, false);
            }
            Some(Ok(Event::InitDone)) => {
                hub.reconcile(&seen, jobs);
                hub.mark_synced(jobs);
            }
            Some(Ok(Event::Apply(obj))) => K::observe(&hub, obj, false),
            Some(Ok(Event::Delete(obj))) => K::observe(&hub, obj, true),
        }
    }
}
