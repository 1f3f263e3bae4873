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
    shared
        .store
        .list_where(Kind::Pod, ns, |p| meta::controller_uid(p) == Some(uid))
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

/// One reconciliation of a Job with its pods.
fn reconcile(shared: &Arc<Shared>, state: &mut State, tx: &mpsc::UnboundedSender<Key>, key: &Key) {
    let (ns, name) = key;
    let Some(job) = shared.store.get(Kind::Job, ns, name) else {
        return;
    };
    let uid = meta::uid(&job).to_owned();
    let pods = owned_pods(shared, ns, &uid);

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
        // Still count pods that finish while the Job is terminating.
        for p in pods
            .iter()
            .filter(|p| is_terminal(p) && has_tracking_finalizer(p))
        {
            remove_tracking_finalizer(shared, p);
        }
        return;
    }

    let spec = &job["spec"];
    let status = &job["status"];
    let completions = int_at(spec, "/completions").unwrap_or(1);
    let parallelism = int_at(spec, "/parallelism").unwrap_or(1);
    let backoff_limit = int_at(spec, "/backoffLimit").unwrap_or(6);
    let suspended = spec.get("suspend").and_then(Value::as_bool) == Some(true);

    let mut to_release = Vec::new();
    let (mut succeeded, mut failed) = (
        int_at(status, "/succeeded").unwrap_or(0),
        int_at(status, "/failed").unwrap_or(0),
    );
    for p in pods
        .iter()
        .filter(|p| is_terminal(p) && has_tracking_finalizer(p))
    {
        if p.pointer("/status/phase").and_then(Value::as_str) == Some("Succeeded") {
            succeeded += 1;
        } else {
            failed += 1;
        }
        to_release.push(p.clone());
    }
    let active: Vec<&Value> = pods
        .iter()
        .filter(|p| !is_terminal(p) && !meta::is_deleting(p))
        .collect();
    let terminating = pods
        .iter()
        .filter(|p| !is_terminal(p) && meta::is_deleting(p))
        .count();
    let ready = active.iter().filter(|p| pod_ready(p)).count();
    // With restartPolicy OnFailure, container restarts count against backoffLimit.
    let restarts: i64 = active
        .iter()
        .filter_map(|p| int_at(p, "/status/containerStatuses/0/restartCount"))
        .sum();

    let finished = meta::has_condition(&job, "Complete") || meta::has_condition(&job, "Failed");
    let mut success_target = meta::has_condition(&job, "SuccessCriteriaMet");
    let mut failure: Option<(String, String)> = failure_target(&job);

    let start_time = status
        .get("startTime")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let start_time = match start_time {
        Some(t) => Some(t),
        None if !suspended && !finished => {
            state.started.insert(uid.clone(), Instant::now());
            Some(meta::now())
        }
        None => None,
    };
    let started_at = *state
        .started
        .entry(uid.clone())
        .or_insert_with(Instant::now);
    let deadline =
        int_at(spec, "/activeDeadlineSeconds").map(|s| Duration::from_secs(s.max(0) as u64));
    if let Some(d) = deadline
        && !finished
        && state.timers.insert((uid.clone(), "deadline"))
    {
        let tx = tx.clone();
        let key = key.clone();
        let wait = d.saturating_sub(started_at.elapsed());
        let shutdown = shared.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(wait) => { let _ = tx.send(key); }
            }
        });
    }

    let mut new_conditions: Vec<(&str, String, String)> = Vec::new();
    if !finished && !success_target && failure.is_none() {
        if succeeded >= completions {
            success_target = true;
            new_conditions.push((
                "SuccessCriteriaMet",
                "CompletionsReached".into(),
                "Reached expected number of succeeded pods".into(),
            ));
        } else if failed + restarts > backoff_limit {
            let f = (
                "BackoffLimitExceeded".to_owned(),
                "Job has reached the specified backoff limit".to_owned(),
            );
            new_conditions.push(("FailureTarget", f.0.clone(), f.1.clone()));
            failure = Some(f);
        } else if deadline.is_some_and(|d| started_at.elapsed() >= d) {
            let f = (
                "DeadlineExceeded".to_owned(),
                "Job was active longer than specified deadline".to_owned(),
            );
            new_conditions.push(("FailureTarget", f.0.clone(), f.1.clone()));
            failure = Some(f);
        }
    }

    let mut created = 0;
    let mut complete_now = false;
    if !finished && (success_target || failure.is_some()) {
        let opts = default_delete();
        for p in &active {
            let _ = deletion::delete_pod(shared, ns, meta::name(p), &opts);
        }
        if active.is_empty() && terminating == 0 {
            complete_now = true;
        }
    } else if !finished && !suspended {
        let remaining = (completions - succeeded).max(0);
        let want = parallelism.min(remaining) - active.len() as i64;
        for _ in 0..want.max(0) {
            if create_pod(shared, &job).is_some() {
                created += 1;
            }
        }
    }

    let active_count = if complete_now {
        0
    } else {
        active.len() as i64 + created
    };
    let ttl = int_at(spec, "/ttlSecondsAfterFinished");
    let result = shared.store.update(Kind::Job, ns, name, |j| {
        let st = &mut j["status"];
        if !st.is_object() {
            *st = json!({});
        }
        set_count(st, "active", active_count);
        set_count(st, "succeeded", succeeded);
        set_count(st, "failed", failed);
        st["ready"] = json!(ready);
        st["terminating"] = json!(terminating);
        st["uncountedTerminatedPods"] = json!({});
        if let Some(t) = &start_time {
            st["startTime"] = json!(t);
        }
        for (ty, reason, message) in &new_conditions {
            meta::set_condition(j, ty, "True", reason, message);
        }
        if complete_now {
            if success_target {
                meta::set_condition(
                    j,
                    "Complete",
                    "True",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                );
                j["status"]["completionTime"] = json!(meta::now());
            } else if let Some((reason, message)) = &failure {
                meta::set_condition(j, "Failed", "True", reason, message);
            }
        }
        Ok(())
    });
    for p in &to_release {
        remove_tracking_finalizer(shared, p);
    }
    if complete_now && result.is_ok() {
        if let Some(ttl) = ttl
            && state.timers.insert((uid.clone(), "ttl"))
        {
            schedule_ttl(
                shared,
                ns,
                name,
                &uid,
                Duration::from_secs(ttl.max(0) as u64),
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
