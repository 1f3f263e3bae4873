//! A simulated Kueue: admits suspended Jobs against a per-queue quota.
//!
//! Real Kueue turns every Job labelled `kueue.x-k8s.io/queue-name` into a
//! Workload, queues it in the named LocalQueue's ClusterQueue, and when the
//! quota has room *admits* it by setting the Job's `spec.suspend` to false
//! (the Job controller then creates its pod). A Job evicted to make room
//! (preemption) is suspended again — the Job controller deletes its pods —
//! and requeued. Quota is released when the Job finishes or goes away.
//!
//! Here the quota is a count: at most `quota` admitted and unfinished Jobs per
//! `(namespace, queue)`, admitted in FIFO order of when each Job started
//! waiting (a preempted Job waits again from the back, as Kueue's default
//! `Eviction` requeuing timestamp orders it). No Workload, LocalQueue or
//! ClusterQueue objects exist; `docs/kube-sim.md` lists what else differs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::meta;
use crate::shared::Shared;
use crate::store::{EventType, Kind};

/// The Job label naming the LocalQueue.
pub(crate) const QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";

fn queue_of(job: &Value) -> Option<&str> {
    job.pointer("/metadata/labels")
        .and_then(|l| l.get(QUEUE_LABEL))
        .and_then(Value::as_str)
}

fn is_suspended(job: &Value) -> bool {
    job.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true)
}

fn is_finished(job: &Value) -> bool {
    meta::has_condition(job, "Complete") || meta::has_condition(job, "Failed")
}

/// Arrival order of the waiting Jobs, by uid.
#[derive(Debug, Default)]
struct Waiting {
    next: u64,
    since: HashMap<String, u64>,
}

impl Waiting {
    /// Records what an event says about a Job: a suspended Job starts waiting
    /// (once; again after a preemption), an admitted or removed one stops.
    fn observe(&mut self, job: &Value, removed: bool) {
        if queue_of(job).is_none() {
            return;
        }
        let uid = meta::uid(job).to_owned();
        if removed || !is_suspended(job) || is_finished(job) {
            self.since.remove(&uid);
        } else if !self.since.contains_key(&uid) {
            self.next += 1;
            self.since.insert(uid, self.next);
        }
    }

    /// Rebuilds the order from a full list (start-up, or a lagged event stream):
    /// known Jobs keep their place, unknown ones follow by creation time.
    fn resync(&mut self, jobs: &[Value]) {
        let mut fresh: Vec<&Value> = jobs
            .iter()
            .filter(|j| queue_of(j).is_some() && !self.since.contains_key(meta::uid(j)))
            .collect();
        fresh.sort_by_key(|j| {
            (
                j.pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                meta::resource_version(j),
            )
        });
        let live: std::collections::HashSet<&str> = jobs.iter().map(meta::uid).collect();
        self.since.retain(|uid, _| live.contains(uid.as_str()));
        for job in fresh {
            self.observe(job, false);
        }
    }
}

/// Which Jobs to admit now: per `(namespace, queue)`, the longest-waiting
/// suspended Jobs while fewer than `quota` are admitted and unfinished.
/// Pure: [`run`] writes the decision.
fn plan(jobs: &[Value], waiting: &Waiting, quota: usize) -> Vec<(String, String)> {
    #[derive(Default)]
    struct Queue<'a> {
        admitted: usize,
        waiting: Vec<(u64, &'a Value)>,
    }
    let mut queues: BTreeMap<(&str, &str), Queue<'_>> = BTreeMap::new();
    for job in jobs {
        let Some(queue) = queue_of(job) else { continue };
        if is_finished(job) || meta::is_deleting(job) {
            continue;
        }
        let q = queues.entry((meta::namespace(job), queue)).or_default();
        if !is_suspended(job) {
            q.admitted += 1;
        } else if let Some(seq) = waiting.since.get(meta::uid(job)) {
            q.waiting.push((*seq, job));
        }
    }
    let mut admit = Vec::new();
    for q in queues.values_mut() {
        q.waiting.sort_by_key(|(seq, _)| *seq);
        let room = quota.saturating_sub(q.admitted);
        for (_, job) in q.waiting.iter().take(room) {
            admit.push((meta::namespace(job).to_owned(), meta::name(job).to_owned()));
        }
    }
    admit
}

fn admit(shared: &Shared, waiting: &mut Waiting, quota: usize) {
    let jobs = shared.store.list(Kind::Job, None).0;
    for (ns, name) in plan(&jobs, waiting, quota) {
        // Admission is Kueue unsuspending the Job; the Job controller does
        // the rest (condition `Suspended=False`, a fresh `startTime`, the pod).
        let written = shared.store.update(Kind::Job, &ns, &name, |j| {
            j["spec"]["suspend"] = json!(false);
            Ok(())
        });
        if let Ok(job) = written {
            waiting.observe(&job, false);
        }
    }
}

/// Runs the admission loop until the sim shuts down.
pub(crate) async fn run(shared: Arc<Shared>, quota: usize) {
    // Subscribed before the first list, so no Job slips between the two.
    let mut rx = shared.store.subscribe();
    let mut waiting = Waiting::default();
    waiting.resync(&shared.store.list(Kind::Job, None).0);
    admit(&shared, &mut waiting, quota);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            ev = rx.recv() => match ev {
                Ok(ev) if ev.kind == Kind::Job => {
                    waiting.observe(&ev.object, ev.ty == EventType::Deleted);
                    admit(&shared, &mut waiting, quota);
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    waiting.resync(&shared.store.list(Kind::Job, None).0);
                    admit(&shared, &mut waiting, quota);
                }
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// Preempts an admitted, unfinished Job as Kueue does to make room for
/// another workload: suspends it again (its pods are deleted by the Job
/// controller) and puts it back in its queue. Returns whether it did.
pub(crate) fn preempt(shared: &Shared, ns: &str, name: &str) -> bool {
    let Some(job) = shared.store.get(Kind::Job, ns, name) else {
        return false;
    };
    if queue_of(&job).is_none() || is_suspended(&job) || is_finished(&job) {
        return false;
    }
    shared
        .store
        .update(Kind::Job, ns, name, |j| {
            j["spec"]["suspend"] = json!(true);
            Ok(())
        })
        .is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn job(name: &str, queue: Option<&str>, suspended: bool, status: Value) -> Value {
        let mut labels = json!({});
        if let Some(q) = queue {
            labels[QUEUE_LABEL] = json!(q);
        }
        json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "labels": labels},
            "spec": {"suspend": suspended},
            "status": status,
        })
    }

    fn observed(jobs: &[Value]) -> Waiting {
        let mut w = Waiting::default();
        for j in jobs {
            w.observe(j, false);
        }
        w
    }

    #[test]
    fn admits_in_arrival_order_up_to_the_quota() {
        let jobs: Vec<Value> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|n| job(n, Some("q"), true, json!({})))
            .collect();
        let w = observed(&jobs);
        let names: Vec<String> = plan(&jobs, &w, 3).into_iter().map(|(_, n)| n).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn admitted_unfinished_jobs_hold_the_quota_and_finished_ones_release_it() {
        let running = job("a", Some("q"), false, json!({}));
        let done = job(
            "b",
            Some("q"),
            false,
            json!({"conditions": [{"type": "Complete", "status": "True"}]}),
        );
        let waiting = [
            job("c", Some("q"), true, json!({})),
            job("d", Some("q"), true, json!({})),
        ];
        let jobs = [running, done, waiting[0].clone(), waiting[1].clone()];
        let w = observed(&jobs);
        let names: Vec<String> = plan(&jobs, &w, 2).into_iter().map(|(_, n)| n).collect();
        assert_eq!(names, ["c"], "one slot is held by a, b's is free");
    }

    #[test]
    fn queues_are_separate_and_unlabelled_jobs_are_left_alone() {
        let jobs = [
            job("a", Some("q1"), false, json!({})),
            job("b", Some("q1"), true, json!({})),
            job("c", Some("q2"), true, json!({})),
            job("d", None, true, json!({})),
        ];
        let w = observed(&jobs);
        let names: Vec<String> = plan(&jobs, &w, 1).into_iter().map(|(_, n)| n).collect();
        assert_eq!(names, ["c"]);
    }

    #[test]
    fn a_preempted_job_waits_again_from_the_back() {
        let mut w = Waiting::default();
        let a = job("a", Some("q"), true, json!({}));
        let b = job("b", Some("q"), true, json!({}));
        w.observe(&a, false);
        w.observe(&b, false);
        // a is admitted, then preempted: it queues behind b.
        w.observe(&job("a", Some("q"), false, json!({})), false);
        w.observe(&a, false);
        let names: Vec<String> = plan(&[a, b], &w, 1).into_iter().map(|(_, n)| n).collect();
        assert_eq!(names, ["b"]);
    }
}
