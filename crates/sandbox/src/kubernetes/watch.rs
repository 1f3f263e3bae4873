//! The shared watcher: one `runtime::watcher` on sandfleet Jobs and one on
//! their Pods per executor, feeding a map that per-attempt futures subscribe
//! to by Job name. No per-task watch, no polling.
//!
//! kube's watcher re-lists by itself after a 410 (or any watch error); the
//! re-list arrives as `Init`, `InitApply`.., `InitDone`, and at `InitDone`
//! anything we knew that the re-list did not return is marked gone — that is
//! how a Job deleted (or a pod lost) during the gap is noticed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{Stream, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::Resource;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::KubeApi;
use super::job::{LABEL_JOB, MANAGED_SELECTOR};

/// What the watchers know about one Job and its pod.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The Job's latest state (kept after deletion).
    pub job: Option<Job>,
    /// The Job was deleted.
    pub job_gone: bool,
    /// The newest pod of the Job (kept after deletion).
    pub pod: Option<Pod>,
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

/// A subscription; dropping it unsubscribes.
pub(crate) struct Subscription {
    hub: Arc<Hub>,
    name: String,
    /// Changes of the Job's observed state.
    pub(crate) rx: watch::Receiver<Observed>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut st = self.hub.lock();
        if let Some((_, count)) = st.subscribers.get_mut(&self.name) {
            *count -= 1;
            if *count > 0 {
                return;
            }
        }
        st.subscribers.remove(&self.name);
        // Forget finished business: nothing more will be asked about it.
        if st
            .objects
            .get(&self.name)
            .is_some_and(|o| o.job_gone || o.job.is_none())
        {
            st.objects.remove(&self.name);
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
        }
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
        let entry = st.objects.entry(name.to_owned()).or_default();
        f(entry);
        let snapshot = entry.clone();
        match st.subscribers.get(name) {
            Some((tx, _)) => {
                tx.send_replace(snapshot);
            }
            None => {
                // Nobody waits for it and it is finished with: forget it.
                let done = |o: &Observed| {
                    (o.job.is_none() || o.job_gone) && (o.pod.is_none() || o.pod_gone)
                };
                if done(&snapshot) {
                    st.objects.remove(name);
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

    fn apply_job(&self, job: Job) {
        let Some(name) = job.meta().name.clone() else {
            return;
        };
        self.update(&name, |o| {
            o.job = Some(job);
            o.job_gone = false;
        });
    }

    fn delete_job(&self, job: &Job) {
        if let Some(name) = &job.meta().name {
            self.update(name, |o| {
                o.job_gone = true;
                if o.job.is_none() {
                    o.job = Some(job.clone());
                }
            });
        }
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

/// Starts the two watchers; they run until `stop` is cancelled.
pub(crate) fn start(api: &KubeApi, stop: CancellationToken) -> Arc<Hub> {
    let (tx, _) = watch::channel(false);
    let hub = Arc::new(Hub {
        state: Mutex::default(),
        synced: Some(tx),
    });
    let cfg = watcher::Config::default().labels(MANAGED_SELECTOR);
    let jobs = watcher::watcher(api.jobs_api(), cfg.clone()).default_backoff();
    let pods = watcher::watcher(api.pods_api(), cfg).default_backoff();
    tokio::spawn(drive(jobs, hub.clone(), stop.clone(), true));
    tokio::spawn(drive(pods, hub.clone(), stop, false));
    hub
}

trait Watched: Resource + Clone + Send + 'static {
    fn apply(hub: &Hub, obj: Self);
    fn delete(hub: &Hub, obj: &Self);
}

impl Watched for Job {
    fn apply(hub: &Hub, obj: Self) {
        hub.apply_job(obj);
    }
    fn delete(hub: &Hub, obj: &Self) {
        hub.delete_job(obj);
    }
}

impl Watched for Pod {
    fn apply(hub: &Hub, obj: Self) {
        hub.apply_pod(obj, false);
    }
    fn delete(hub: &Hub, obj: &Self) {
        hub.apply_pod(obj.clone(), true);
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
                K::apply(&hub, obj);
            }
            Some(Ok(Event::InitDone)) => {
                hub.reconcile(&seen, jobs);
                hub.mark_synced(jobs);
            }
            Some(Ok(Event::Apply(obj))) => K::apply(&hub, obj),
            Some(Ok(Event::Delete(obj))) => K::delete(&hub, &obj),
        }
    }
}
