//! The simulated Job controller and garbage collector.
//!
//! Level-triggered like the real one: every store event about a Job or its pods
//! enqueues the Job, and [`reconcile`] compares the Job with its pods and acts — create
//! a pod, count finished pods (each exactly once, guarded by the
//! `batch.kubernetes.io/job-tracking` finalizer), set 1.31+ conditions
//! (`SuccessCriteriaMet` → `Complete`, `FailureTarget` → `Failed`), enforce
//! `backoffLimit` and `activeDeadlineSeconds`, and delete finished Jobs after
//! `ttlSecondsAfterFinished`. A removed Job's pods are collected per its propagation
//! policy.
//!
//! `spec.suspend` (KEP-2232, what Kueue drives): a suspended Job gets no pod, its
//! active pods are deleted and released uncounted, and it carries
//! `Suspended=True` (`JobSuspended`); resuming sets `Suspended=False`
//! (`JobResumed`) and a fresh `startTime`, so `activeDeadlineSeconds` counts only
//! time spent unsuspended.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use crate::deletion::{self, DeleteOptions, FOREGROUND_FINALIZER, Propagation};
use crate::kubelet;
use crate::meta;
use crate::shared::Shared;
use crate::store::{Event, EventType, Kind};

/// The finalizer that keeps a finished pod until the controller has counted it.
pub(crate) const TRACKING_FINALIZER: &str = "batch.kubernetes.io/job-tracking";

type Key = (String, String);

#[derive(Default)]
struct State {
    /// When each Job (by uid) started, for `activeDeadlineSeconds`.
    started: HashMap<String, Instant>,
    /// Timers already armed: (uid, "deadline" | "ttl").
    timers: HashSet<(String, &'static str)>,
    /// Pods deleted because their Job was suspended: released without being
    /// counted as failures, as the real controller does.
    suspend_deleted: HashSet<String>,
}

/// Runs the controller until the sim shuts down.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut rx = shared.store.subscribe();
    let (tx, mut queue) = mpsc::unbounded_channel::<Key>();
    let mut state = State::default();
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            ev = rx.recv() => match ev {
                Ok(ev) => on_event(&shared, &ev, &tx),
                Err(RecvError::Lagged(_)) => resync(&shared, &tx),
                Err(RecvError::Closed) => return,
            },
            Some(key) = queue.recv() => reconcile(&shared, &mut state, &tx, &key),
        }
    }
}

fn default_delete() -> DeleteOptions {
    // Parsing an empty body cannot fail.
    DeleteOptions::parse(&HashMap::new(), b"")
        .unwrap_or_else(|_| unreachable!("empty options parse"))
}

fn resync(shared: &Arc<Shared>, tx: &mpsc::UnboundedSender<Key>) {
    for job in shared.store.list(Kind::Job, None).0 {
        let _ = tx.send((
            meta::namespace(&job).to_owned(),
            meta::name(&job).to_owned(),
        ));
    }
    for pod in shared.store.list(Kind::Pod, None).0 {
        release_if_orphaned(shared, &pod);
    }
}

fn on_event(shared: &Arc<Shared>, ev: &Event, tx: &mpsc::UnboundedSender<Key>) {
    let ns = meta::namespace(&ev.object).to_owned();
    match (ev.kind, ev.ty) {
        (Kind::Job, EventType::Deleted) => collect_garbage(shared, &ev.object),
        // Only labels or annotations changed (a pool claim, a kubectl label):
        // nothing the Job controller decides on, as in Kubernetes.
        (Kind::Job, EventType::Modified)
            if ev
                .old
                .as_ref()
                .is_some_and(|old| same_but_meta(old, &ev.object)) => {}
        (Kind::Job, _) => {
            let _ = tx.send((ns, meta::name(&ev.object).to_owned()));
        }
        (Kind::Pod, ty) => {
            if let Some(owner) = meta::controller_name(&ev.object) {
                let _ = tx.send((ns, owner.to_owned()));
            }
            if ty != EventType::Deleted {
                release_if_orphaned(shared, &ev.object);
            }
        }
    }
}

/// Whether two versions of a Job differ at most in labels and annotations
/// (and the resourceVersion and managed fields that come with any write).
fn same_but_meta(old: &Value, new: &Value) -> bool {
    [
        "/spec",
        "/status",
        "/metadata/deletionTimestamp",
        "/metadata/finalizers",
    ]
    .iter()
    .all(|p| old.pointer(p) == new.pointer(p))
}

fn is_terminal(pod: &Value) -> bool {
    matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    )
}

fn has_tracking_finalizer(pod: &Value) -> bool {
    meta::finalizers(pod)
        .iter()
        .any(|f| f == TRACKING_FINALIZER)
}

fn remove_tracking_finalizer(shared: &Shared, pod: &Value) {
    let _ = shared
        .store
        .update(Kind::Pod, meta::namespace(pod), meta::name(pod), |p| {
            meta::remove_finalizer(p, TRACKING_FINALIZER);
            Ok(())
        });
}

/// A finished pod whose Job is gone keeps no finalizer.
fn release_if_orphaned(shared: &Shared, pod: &Value) {
    if !has_tracking_finalizer(pod) || !is_terminal(pod) {
        return;
    }
    let owner_alive = match (meta::controller_name(pod), meta::controller_uid(pod)) {
        (Some(name), Some(uid)) => shared
            .store
            .get(Kind::Job, meta::namespace(pod), name)
            .is_some_and(|j| meta::uid(&j) == uid),
        _ => false,
    };
    if !owner_alive {
        remove_tracking_finalizer(shared, pod);
    }
}

fn owned_pods(shared: &Shared, ns: &str, uid: &str) -> Vec<Value> {
    shared.store.pods_owned_by(ns, uid)
}

/// After a Job is removed: delete its pods (Background/Foreground) or orphan them.
fn collect_garbage(shared: &Arc<Shared>, job: &Value) {
    let uid = meta::uid(job).to_owned();
    let ns = meta::namespace(job).to_owned();
    match shared
        .take_propagation(&uid)
        .unwrap_or(Propagation::Background)
    {
        Propagation::Orphan | Propagation::Unset => {
            for pod in owned_pods(shared, &ns, &uid) {
                let _ = shared.store.update(Kind::Pod, &ns, meta::name(&pod), |p| {
                    if let Some(refs) = p
                        .pointer_mut("/metadata/ownerReferences")
                        .and_then(Value::as_array_mut)
                    {
                        refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(&uid));
                    }
                    Ok(())
                });
            }
        }
        Propagation::Background | Propagation::Foreground => {
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = shared.shutdown.cancelled() => return,
                    () = tokio::time::sleep(shared.options.gc_delay) => {}
                }
                let opts = default_delete();
                for pod in owned_pods(&shared, &ns, &uid) {
                    let _ = deletion::delete_pod(&shared, &ns, meta::name(&pod), &opts);
                }
            });
        }
    }
}

fn int_at(v: &Value, path: &str) -> Option<i64> {
    v.pointer(path).and_then(Value::as_i64)
}

/// What one reconciliation decided, before any of it is written.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    /// Finished pods counted now; their tracking finalizer is removed after the
    /// status write.
    counted: Vec<String>,
    succeeded: i64,
    failed: i64,
    active: i64,
    ready: i64,
    terminating: i64,
    /// Set `status.startTime` (the Job starts now).
    start: bool,
    /// Conditions to add: (type, reason, message).
    conditions: Vec<(&'static str, &'static str, &'static str)>,
    /// The `Suspended` condition to set: (status, reason, message).
    suspension: Option<(&'static str, &'static str, &'static str)>,
    /// Mark the Job finished (`Complete`, or `Failed` with the FailureTarget reason).
    finish: Option<Finish>,
    /// Pods to delete (the Job has reached a terminal target).
    delete: Vec<String>,
    /// Pods to create.
    create: i64,
}

#[derive(Debug, Clone, PartialEq)]
enum Finish {
    Complete,
    Failed { reason: String, message: String },
}

const COMPLETIONS_REACHED: (&str, &str) = (
    "CompletionsReached",
    "Reached expected number of succeeded pods",
);
const BACKOFF_LIMIT_EXCEEDED: (&str, &str) = (
    "BackoffLimitExceeded",
    "Job has reached the specified backoff limit",
);
const DEADLINE_EXCEEDED: (&str, &str) = (
    "DeadlineExceeded",
    "Job was active longer than specified deadline",
);

/// The Job controller's decision for a (not deleting) Job and its pods, given how long
/// the Job has been active. Pure: [`reconcile`] carries it out.
fn plan(job: &Value, pods: &[Value], active_for: Duration) -> Plan {
    let spec = &job["spec"];
    let status = &job["status"];
    let completions = int_at(spec, "/completions").unwrap_or(1);
    let parallelism = int_at(spec, "/parallelism").unwrap_or(1);
    let backoff_limit = int_at(spec, "/backoffLimit").unwrap_or(6);
    let suspended = spec.get("suspend").and_then(Value::as_bool) == Some(true);
    let deadline = int_at(spec, "/activeDeadlineSeconds")
        .map(|s| Duration::from_secs(s.max(0).unsigned_abs()));

    let mut p = Plan {
        succeeded: int_at(status, "/succeeded").unwrap_or(0),
        failed: int_at(status, "/failed").unwrap_or(0),
        ..Plan::default()
    };
    // Each finished pod is counted once: while it still has the tracking finalizer.
    for pod in pods
        .iter()
        .filter(|p| is_terminal(p) && has_tracking_finalizer(p))
    {
        if pod.pointer("/status/phase").and_then(Value::as_str) == Some("Succeeded") {
            p.succeeded += 1;
        } else {
            p.failed += 1;
        }
        p.counted.push(meta::name(pod).to_owned());
    }
    let active: Vec<&Value> = pods
        .iter()
        .filter(|p| !is_terminal(p) && !meta::is_deleting(p))
        .collect();
    p.terminating = pods
        .iter()
        .filter(|p| !is_terminal(p) && meta::is_deleting(p))
        .count() as i64;
    p.ready = active.iter().filter(|p| pod_ready(p)).count() as i64;
    // With restartPolicy OnFailure, container restarts count against backoffLimit.
    let restarts: i64 = active
        .iter()
        .filter_map(|p| int_at(p, "/status/containerStatuses/0/restartCount"))
        .sum();

    let finished = meta::has_condition(job, "Complete") || meta::has_condition(job, "Failed");
    let was_suspended = meta::has_condition(job, "Suspended");
    if !finished && suspended && !was_suspended {
        p.suspension = Some(("True", "JobSuspended", "Job suspended"));
    } else if !finished && !suspended && was_suspended {
        // Resumed: `startTime` restarts, and with it the active deadline.
        p.suspension = Some(("False", "JobResumed", "Job resumed"));
        p.start = true;
    }
    p.start |= status.get("startTime").is_none_or(Value::is_null) && !suspended && !finished;
    let mut success = meta::has_condition(job, "SuccessCriteriaMet");
    let mut failure = failure_target(job);
    if !finished && !success && failure.is_none() {
        let target = if p.succeeded >= completions {
            success = true;
            Some(("SuccessCriteriaMet", COMPLETIONS_REACHED))
        } else if p.failed + restarts > backoff_limit {
            Some(("FailureTarget", BACKOFF_LIMIT_EXCEEDED))
        } else if !suspended && deadline.is_some_and(|d| active_for >= d) {
            Some(("FailureTarget", DEADLINE_EXCEEDED))
        } else {
            None
        };
        if let Some((ty, (reason, message))) = target {
            p.conditions.push((ty, reason, message));
            if ty == "FailureTarget" {
                failure = Some((reason.to_owned(), message.to_owned()));
            }
        }
    }

    p.active = active.len() as i64;
    if finished {
        return p;
    }
    if success || failure.is_some() {
        // Reached a target: stop what runs; finish once nothing runs any more.
        p.delete = active
            .iter()
            .map(|pod| meta::name(pod).to_owned())
            .collect();
        if active.is_empty() && p.terminating == 0 {
            p.finish = Some(match failure {
                Some((reason, message)) => Finish::Failed { reason, message },
                None => Finish::Complete,
            });
        }
    } else if !suspended {
        let remaining = (completions - p.succeeded).max(0);
        p.create = (parallelism.min(remaining) - p.active).max(0);
    } else {
        // Suspended (preempted by Kueue, or by a user): nothing may run.
        p.delete = active
            .iter()
            .map(|pod| meta::name(pod).to_owned())
            .collect();
    }
    p
}

/// One reconciliation of a Job with its pods: [`plan`], then write.
fn reconcile(shared: &Arc<Shared>, state: &mut State, tx: &mpsc::UnboundedSender<Key>, key: &Key) {
    let (ns, name) = key;
    let Some(job) = shared.store.get(Kind::Job, ns, name) else {
        return;
    };
    let uid = meta::uid(&job).to_owned();
    let mut pods = owned_pods(shared, ns, &uid);
    // Pods stopped by a suspension are not failures: release them uncounted.
    pods.retain(|p| {
        if !state.suspend_deleted.contains(meta::name(p)) {
            return true;
        }
        if is_terminal(p) && has_tracking_finalizer(p) {
            remove_tracking_finalizer(shared, p);
            state.suspend_deleted.remove(meta::name(p));
        }
        false
    });

    if meta::is_deleting(&job) {
        if meta::finalizers(&job)
            .iter()
            .any(|f| f == FOREGROUND_FINALIZER)
        {
            let opts = default_delete();
            for p in pods.iter().filter(|p| !meta::is_deleting(p)) {
                let _ = deletion::delete_pod(shared, ns, meta::name(p), &opts);
            }
            if pods.is_empty() {
                let _ = shared.store.update(Kind::Job, ns, name, |j| {
                    meta::remove_finalizer(j, FOREGROUND_FINALIZER);
                    Ok(())
                });
            }
        }
        // Pods that finish while the Job is terminating are released uncounted.
        for p in pods
            .iter()
            .filter(|p| is_terminal(p) && has_tracking_finalizer(p))
        {
            remove_tracking_finalizer(shared, p);
        }
        return;
    }

    let suspended = job.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true);
    if suspended {
        // The active deadline does not run while suspended; it restarts at resume.
        state.started.remove(&uid);
        state.timers.remove(&(uid.clone(), "deadline"));
    }
    let started_at = if suspended {
        Instant::now()
    } else {
        *state
            .started
            .entry(uid.clone())
            .or_insert_with(Instant::now)
    };
    let plan = plan(&job, &pods, started_at.elapsed());
    let finished = meta::has_condition(&job, "Complete") || meta::has_condition(&job, "Failed");
    if let Some(secs) = int_at(&job["spec"], "/activeDeadlineSeconds")
        && !finished
        && !suspended
        && state.timers.insert((uid.clone(), "deadline"))
    {
        // Wake up when the deadline passes, even if nothing else happens.
        let wait =
            Duration::from_secs(secs.max(0).unsigned_abs()).saturating_sub(started_at.elapsed());
        let (tx, key, shutdown) = (tx.clone(), key.clone(), shared.shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(wait) => { let _ = tx.send(key); }
            }
        });
    }

    let opts = default_delete();
    for pod in &plan.delete {
        if suspended {
            state.suspend_deleted.insert(pod.clone());
        }
        let _ = deletion::delete_pod(shared, ns, pod, &opts);
    }
    let mut created = 0;
    for _ in 0..plan.create {
        if create_pod(shared, &job).is_some() {
            created += 1;
        }
    }
    let active = if plan.finish.is_some() {
        0
    } else {
        plan.active + created
    };
    let now = meta::now();
    let result = shared.store.update(Kind::Job, ns, name, |j| {
        let st = &mut j["status"];
        if !st.is_object() {
            *st = json!({});
        }
        set_count(st, "active", active);
        set_count(st, "succeeded", plan.succeeded);
        set_count(st, "failed", plan.failed);
        st["ready"] = json!(plan.ready);
        st["terminating"] = json!(plan.terminating);
        st["uncountedTerminatedPods"] = json!({});
        if plan.start {
            st["startTime"] = json!(now);
        }
        for (ty, reason, message) in &plan.conditions {
            meta::set_condition(j, ty, "True", reason, message);
        }
        if let Some((status, reason, message)) = plan.suspension {
            meta::set_condition(j, "Suspended", status, reason, message);
        }
        match &plan.finish {
            Some(Finish::Complete) => {
                let (reason, message) = COMPLETIONS_REACHED;
                meta::set_condition(j, "Complete", "True", reason, message);
                j["status"]["completionTime"] = json!(now);
            }
            Some(Finish::Failed { reason, message }) => {
                meta::set_condition(j, "Failed", "True", reason, message);
            }
            None => {}
        }
        Ok(())
    });
    // Only now that the counts are stored may the counted pods go.
    for pod in pods
        .iter()
        .filter(|p| plan.counted.iter().any(|c| c == meta::name(p)))
    {
        remove_tracking_finalizer(shared, pod);
    }
    if plan.finish.is_some() && result.is_ok() {
        if let Some(ttl) = int_at(&job["spec"], "/ttlSecondsAfterFinished")
            && state.timers.insert((uid.clone(), "ttl"))
        {
            schedule_ttl(
                shared,
                ns,
                name,
                &uid,
                Duration::from_secs(ttl.max(0).unsigned_abs()),
            );
        }
        state.started.remove(&uid);
    }
}

fn set_count(status: &mut Value, key: &str, n: i64) {
    if let Some(m) = status.as_object_mut() {
        if n > 0 {
            m.insert(key.into(), json!(n));
        } else {
            m.remove(key);
        }
    }
}

fn pod_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Ready")
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        })
}

/// The reason and message of a `FailureTarget` condition, if set.
fn failure_target(job: &Value) -> Option<(String, String)> {
    job.pointer("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| {
            c.get("type").and_then(Value::as_str) == Some("FailureTarget")
                && c.get("status").and_then(Value::as_str) == Some("True")
        })
        .map(|c| {
            (
                c.get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                c.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            )
        })
}

fn schedule_ttl(shared: &Arc<Shared>, ns: &str, name: &str, uid: &str, ttl: Duration) {
    let (shared, ns, name, uid) = (
        shared.clone(),
        ns.to_owned(),
        name.to_owned(),
        uid.to_owned(),
    );
    tokio::spawn(async move {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(ttl) => {}
        }
        // Only the same Job (a new one may have taken the name).
        if shared
            .store
            .get(Kind::Job, &ns, &name)
            .is_some_and(|j| meta::uid(&j) == uid)
        {
            let mut opts = default_delete();
            opts.propagation = Propagation::Background;
            let _ = deletion::delete_job(&shared, &ns, &name, &opts);
        }
    });
}

/// Creates one pod from the Job's template and hands it to the kubelet.
fn create_pod(shared: &Arc<Shared>, job: &Value) -> Option<Value> {
    let job_name = meta::name(job);
    let template = &job["spec"]["template"];
    let labels = template
        .pointer("/metadata/labels")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let mut metadata = json!({
        "generateName": format!("{job_name}-"),
        "namespace": meta::namespace(job),
        "labels": labels,
        "ownerReferences": [{
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": job_name,
            "uid": meta::uid(job),
            "controller": true,
            "blockOwnerDeletion": true,
        }],
        "finalizers": [TRACKING_FINALIZER],
    });
    if let Some(a) = template.pointer("/metadata/annotations") {
        metadata["annotations"] = a.clone();
    }
    // A clash of generated names is retried, as the real controller would.
    for _ in 0..3 {
        metadata["name"] = json!(meta::generate_name(&format!("{job_name}-"), 63));
        let pod = json!({
            "metadata": metadata,
            "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
            "status": {"phase": "Pending", "qosClass": "BestEffort"},
        });
        if let Ok(created) = shared.store.create(Kind::Pod, pod) {
            kubelet::start(shared, &created);
            return Some(created);
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn job(extra_spec: Value, status: Value) -> Value {
        let mut spec = json!({"completions": 1, "parallelism": 1, "backoffLimit": 1});
        json_patch::merge(&mut spec, &extra_spec);
        json!({"metadata": {"name": "j"}, "spec": spec, "status": status})
    }

    #[test]
    fn a_label_or_annotation_change_needs_no_reconcile() {
        let old = job(json!({}), json!({"active": 1}));
        let mut relabelled = old.clone();
        relabelled["metadata"]["labels"] = json!({"sandfleet.dev/pool-state": "claimed"});
        relabelled["metadata"]["resourceVersion"] = json!("7");
        assert!(same_but_meta(&old, &relabelled));
        let mut suspended = old.clone();
        suspended["spec"]["suspend"] = json!(true);
        assert!(!same_but_meta(&old, &suspended));
        let mut finished = old.clone();
        finished["status"]["succeeded"] = json!(1);
        assert!(!same_but_meta(&old, &finished));
        let mut deleting = old.clone();
        deleting["metadata"]["deletionTimestamp"] = json!("2026-12-07T00:00:00Z");
        assert!(!same_but_meta(&old, &deleting));
    }

    fn pod(name: &str, phase: &str, tracked: bool) -> Value {
        let mut p = json!({"metadata": {"name": name}, "status": {"phase": phase}});
        if tracked {
            p["metadata"]["finalizers"] = json!([TRACKING_FINALIZER]);
        }
        p
    }

    #[test]
    fn a_new_job_starts_and_gets_one_pod() {
        let p = plan(&job(json!({}), json!({})), &[], Duration::ZERO);
        assert!(p.start);
        assert_eq!(p.create, 1);
        assert!(p.conditions.is_empty() && p.finish.is_none());
    }

    #[test]
    fn a_succeeded_pod_is_counted_once_and_completes_the_job() {
        let p = plan(
            &job(json!({}), json!({"startTime": "t"})),
            &[pod("a", "Succeeded", true)],
            Duration::ZERO,
        );
        assert_eq!((p.succeeded, p.counted.clone()), (1, vec!["a".to_owned()]));
        assert_eq!(p.conditions[0].0, "SuccessCriteriaMet");
        assert_eq!(p.finish, Some(Finish::Complete));
        assert_eq!(p.create, 0);
        // Already counted (finalizer gone, status holds it): not counted again.
        let p = plan(
            &job(json!({}), json!({"succeeded": 1})),
            &[pod("a", "Succeeded", false)],
            Duration::ZERO,
        );
        assert_eq!(p.succeeded, 1);
        assert!(p.counted.is_empty());
    }

    #[test]
    fn failures_within_the_backoff_limit_are_replaced() {
        let p = plan(
            &job(json!({}), json!({})),
            &[pod("a", "Failed", true)],
            Duration::ZERO,
        );
        assert_eq!(p.failed, 1);
        assert_eq!(p.create, 1);
        assert!(p.finish.is_none());
    }

    #[test]
    fn exceeding_the_backoff_limit_targets_failure_then_fails_when_nothing_runs() {
        let pods = [
            pod("a", "Failed", true),
            pod("b", "Failed", true),
            pod("c", "Running", true),
        ];
        let p = plan(&job(json!({}), json!({})), &pods, Duration::ZERO);
        assert_eq!(
            p.conditions,
            vec![(
                "FailureTarget",
                BACKOFF_LIMIT_EXCEEDED.0,
                BACKOFF_LIMIT_EXCEEDED.1
            )]
        );
        assert_eq!(p.delete, vec!["c".to_owned()]);
        assert!(p.finish.is_none(), "c still runs");
        let failing = job(
            json!({}),
            json!({"failed": 2, "conditions": [{"type": "FailureTarget", "status": "True",
                "reason": "BackoffLimitExceeded", "message": "m"}]}),
        );
        let p = plan(&failing, &[pod("c", "Failed", true)], Duration::ZERO);
        assert_eq!(p.failed, 3);
        assert_eq!(
            p.finish,
            Some(Finish::Failed {
                reason: "BackoffLimitExceeded".into(),
                message: "m".into()
            })
        );
    }

    #[test]
    fn the_active_deadline_fails_the_job() {
        let j = job(
            json!({"activeDeadlineSeconds": 5}),
            json!({"startTime": "t"}),
        );
        let running = [pod("a", "Running", true)];
        assert!(
            plan(&j, &running, Duration::from_secs(4))
                .conditions
                .is_empty()
        );
        let p = plan(&j, &running, Duration::from_secs(5));
        assert_eq!(p.conditions[0].1, DEADLINE_EXCEEDED.0);
        assert_eq!(p.delete, vec!["a".to_owned()]);
    }

    #[test]
    fn suspended_jobs_get_no_pods() {
        let p = plan(
            &job(json!({"suspend": true}), json!({})),
            &[],
            Duration::ZERO,
        );
        assert_eq!(p.create, 0);
        assert!(!p.start);
        assert_eq!(
            p.suspension,
            Some(("True", "JobSuspended", "Job suspended"))
        );
    }

    #[test]
    fn suspending_deletes_running_pods_and_never_hits_the_deadline() {
        let j = job(
            json!({"suspend": true, "activeDeadlineSeconds": 5}),
            json!({"startTime": "t", "conditions": [{"type": "Suspended", "status": "True"}]}),
        );
        let p = plan(&j, &[pod("a", "Running", true)], Duration::from_secs(60));
        assert_eq!(p.delete, vec!["a".to_owned()]);
        assert!(p.conditions.is_empty(), "no deadline while suspended");
        assert_eq!(p.suspension, None, "already marked suspended");
    }

    #[test]
    fn resuming_restarts_the_job_and_creates_its_pod() {
        let j = job(
            json!({"suspend": false}),
            json!({"startTime": "t", "conditions": [{"type": "Suspended", "status": "True"}]}),
        );
        let p = plan(&j, &[], Duration::ZERO);
        assert!(p.start, "startTime is reset at resume");
        assert_eq!(p.suspension, Some(("False", "JobResumed", "Job resumed")));
        assert_eq!(p.create, 1);
        // A Job never suspended gets no Suspended condition at all.
        let p = plan(&job(json!({}), json!({})), &[], Duration::ZERO);
        assert_eq!(p.suspension, None);
    }
}
