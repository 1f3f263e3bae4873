//! The object store: Jobs and Pods as `serde_json::Value`, one global revision counter
//! (like etcd's), and a bounded history of change events that watches replay.
//!
//! Every write takes the one lock, bumps the revision, and publishes an [`Event`] on a
//! broadcast channel while still holding the lock, so subscribers see events in revision
//! order and a watch that subscribes under the lock misses nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::meta;
use crate::status::ApiError;

/// The resource types the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    /// `batch/v1` Job.
    Job,
    /// `v1` Pod.
    Pod,
}

impl Kind {
    /// API group (`""` for core).
    pub(crate) fn group(self) -> &'static str {
        match self {
            Kind::Job => "batch",
            Kind::Pod => "",
        }
    }

    /// Plural resource name.
    pub(crate) fn plural(self) -> &'static str {
        match self {
            Kind::Job => "jobs",
            Kind::Pod => "pods",
        }
    }

    /// `kind` field.
    pub(crate) fn kind_name(self) -> &'static str {
        match self {
            Kind::Job => "Job",
            Kind::Pod => "Pod",
        }
    }

    /// `jobs.batch` / `pods`, as in "not found" messages.
    pub(crate) fn qualified(self) -> &'static str {
        match self {
            Kind::Job => "jobs.batch",
            Kind::Pod => "pods",
        }
    }

    /// `Job.batch` / `Pod`, as in "is invalid" messages.
    pub(crate) fn kind_qualified(self) -> &'static str {
        match self {
            Kind::Job => "Job.batch",
            Kind::Pod => "Pod",
        }
    }

    /// `apiVersion` field.
    pub(crate) fn api_version(self) -> &'static str {
        match self {
            Kind::Job => "batch/v1",
            Kind::Pod => "v1",
        }
    }

    /// `kind` of the list type.
    pub(crate) fn list_kind(self) -> &'static str {
        match self {
            Kind::Job => "JobList",
            Kind::Pod => "PodList",
        }
    }
}

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change to the store.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub(crate) rev: u64,
    pub(crate) kind: Kind,
    pub(crate) ty: EventType,
    /// The object after the change (for `Deleted`, its last state).
    pub(crate) object: Value,
    /// The object before the change, so label-filtered watches can tell "stopped
    /// matching" (sent as `DELETED`) from "changed".
    pub(crate) old: Option<Value>,
}

type Key = (Kind, String, String);

struct Inner {
    rev: u64,
    /// Events at or below this revision have been dropped from `history`.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    /// Pods by namespace and controller uid: the Job controller asks for a
    /// Job's pods on every reconcile, and a scan of every pod was most of it.
    pods_by_owner: HashMap<(String, String), BTreeSet<String>>,
    history: VecDeque<Arc<Event>>,
}

impl Inner {
    /// Stores `object` under `key`; returns what was there.
    fn put(&mut self, key: Key, object: Value) -> Option<Value> {
        let owner = (key.0 == Kind::Pod)
            .then(|| meta::controller_uid(&object).map(str::to_owned))
            .flatten();
        if let Some(old) = self.objects.get(&key) {
            unindex(&mut self.pods_by_owner, &key, old, owner.as_deref());
        }
        if let Some(uid) = owner {
            self.pods_by_owner
                .entry((key.1.clone(), uid))
                .or_default()
                .insert(key.2.clone());
        }
        self.objects.insert(key, object)
    }

    /// Removes the object under `key`.
    fn take(&mut self, key: &Key) -> Option<Value> {
        let old = self.objects.remove(key)?;
        unindex(&mut self.pods_by_owner, key, &old, None);
        Some(old)
    }
}

/// Drops `old`'s entry from the pods-by-owner index unless the version
/// replacing it has the same owner (`kept`).
fn unindex(
    index: &mut HashMap<(String, String), BTreeSet<String>>,
    key: &Key,
    old: &Value,
    kept: Option<&str>,
) {
    if key.0 != Kind::Pod {
        return;
    }
    let Some(uid) = meta::controller_uid(old) else {
        return;
    };
    if kept == Some(uid) {
        return;
    }
    let owner = (key.1.clone(), uid.to_owned());
    if let Some(names) = index.get_mut(&owner) {
        names.remove(&key.2);
        if names.is_empty() {
            index.remove(&owner);
        }
    }
}

/// What a new watch starts from: a snapshot of current objects (no resourceVersion) or
/// the history after the given resourceVersion.
pub(crate) struct Subscription {
    pub(crate) snapshot: Vec<(Kind, Value)>,
    pub(crate) backlog: Vec<Arc<Event>>,
    pub(crate) rev: u64,
    pub(crate) rx: broadcast::Receiver<Arc<Event>>,
}

/// The store shared by the API routes, the controller and the kubelet.
pub(crate) struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<Event>>,
    history_limit: usize,
}

impl Store {
    pub(crate) fn new(history_limit: usize) -> Self {
        let (events, _) = broadcast::channel(16_384);
        Self {
            inner: Mutex::new(Inner {
                rev: 1,
                compacted: 0,
                objects: BTreeMap::new(),
                pods_by_owner: HashMap::new(),
                history: VecDeque::new(),
            }),
            events,
            history_limit: history_limit.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the maps consistent (every write is a
        // single insert/remove), so a poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an event; called with the lock held.
    fn publish(&self, inner: &mut Inner, event: Event) {
        let event = Arc::new(event);
        inner.history.push_back(event.clone());
        while inner.history.len() > self.history_limit {
            if let Some(old) = inner.history.pop_front() {
                inner.compacted = old.rev;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(event);
    }

    /// Subscribes to all future events (used by the controller).
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// The current global revision.
    #[cfg(test)]
    pub(crate) fn revision(&self) -> u64 {
        self.lock().rev
    }

    /// Starts a watch: `since = None` yields a snapshot, `Some(rv)` the history after rv
    /// (410 `Expired` if it has been compacted away).
    pub(crate) fn watch_from(&self, since: Option<u64>) -> Result<Subscription, ApiError> {
        let inner = self.lock();
        let rx = self.events.subscribe();
        match since {
            None => Ok(Subscription {
                snapshot: inner
                    .objects
                    .iter()
                    .map(|((k, _, _), v)| (*k, v.clone()))
                    .collect(),
                backlog: Vec::new(),
                rev: inner.rev,
                rx,
            }),
            Some(rv) if rv < inner.compacted => Err(ApiError::gone(rv)),
            Some(rv) => Ok(Subscription {
                snapshot: Vec::new(),
                backlog: inner
                    .history
                    .iter()
                    .filter(|e| e.rev > rv)
                    .cloned()
                    .collect(),
                rev: inner.rev,
                rx,
            }),
        }
    }

    /// Whether `rv` is older than the retained history.
    pub(crate) fn is_compacted(&self, rv: u64) -> bool {
        rv < self.lock().compacted
    }

    /// Inserts a new object (its namespace and name must be set); assigns uid,
    /// creationTimestamp and resourceVersion.
    pub(crate) fn create(&self, kind: Kind, mut object: Value) -> Result<Value, ApiError> {
        let ns = meta::namespace(&object).to_owned();
        let name = meta::name(&object).to_owned();
        let mut inner = self.lock();
        let key = (kind, ns, name.clone());
        if inner.objects.contains_key(&key) {
            return Err(ApiError::already_exists(kind, &name));
        }
        inner.rev += 1;
        let rev = inner.rev;
        let md = meta::metadata_mut(&mut object);
        md.entry("uid")
            .or_insert_with(|| json!(uuid::Uuid::new_v4().to_string()));
        md.entry("creationTimestamp")
            .or_insert_with(|| json!(meta::now()));
        md.insert("resourceVersion".into(), json!(rev.to_string()));
        object["kind"] = json!(kind.kind_name());
        object["apiVersion"] = json!(kind.api_version());
        inner.put(key, object.clone());
        self.publish(
            &mut inner,
            Event {
                rev,
                kind,
                ty: EventType::Added,
                object: object.clone(),
                old: None,
            },
        );
        Ok(object)
    }

    /// Whether the object exists (without copying it, as [`Store::get`] does).
    pub(crate) fn contains(&self, kind: Kind, ns: &str, name: &str) -> bool {
        self.lock()
            .objects
            .contains_key(&(kind, ns.to_owned(), name.to_owned()))
    }

    pub(crate) fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(kind, ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// All objects of `kind` (in one namespace or all), sorted by namespace and name,
    /// with the collection revision.
    pub(crate) fn list(&self, kind: Kind, ns: Option<&str>) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let from = (kind, ns.unwrap_or("").to_owned(), String::new());
        let items = inner
            .objects
            .range(from..)
            .take_while(|((k, n, _), _)| *k == kind && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v.clone())
            .collect();
        (items, inner.rev)
    }

    /// The objects of `kind` (in `ns`, or in every namespace) for which `keep`
    /// holds, and the store's revision. Only the kept objects are cloned: the
    /// lock that every write waits for is held for a scan, not a deep copy of
    /// the namespace (a list with a label selector in a busy namespace would
    /// otherwise stall every other request for its whole copy).
    pub(crate) fn list_matching(
        &self,
        kind: Kind,
        ns: Option<&str>,
        keep: impl Fn(&Value) -> bool,
    ) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let from = (kind, ns.unwrap_or("").to_owned(), String::new());
        let items = inner
            .objects
            .range(from..)
            .take_while(|((k, n, _), _)| *k == kind && ns.is_none_or(|ns| ns == n))
            .filter(|(_, v)| keep(v))
            .map(|(_, v)| v.clone())
            .collect();
        (items, inner.rev)
    }

    /// The pods in `ns` whose controller is the object with `uid`.
    pub(crate) fn pods_owned_by(&self, ns: &str, uid: &str) -> Vec<Value> {
        let inner = self.lock();
        let Some(names) = inner.pods_by_owner.get(&(ns.to_owned(), uid.to_owned())) else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|n| {
                inner
                    .objects
                    .get(&(Kind::Pod, ns.to_owned(), n.clone()))
                    .cloned()
            })
            .collect()
    }

    /// Read-modify-write under the lock. `f` edits a copy; an unchanged copy is not
    /// written (no revision bump, no event). An object with a deletionTimestamp, no
    /// finalizers and no grace period left is removed instead of updated.
    pub(crate) fn update<F>(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        f: F,
    ) -> Result<Value, ApiError>
    where
        F: FnOnce(&mut Value) -> Result<(), ApiError>,
    {
        let mut inner = self.lock();
        let key = (kind, ns.to_owned(), name.to_owned());
        let Some(current) = inner.objects.get(&key) else {
            return Err(ApiError::not_found(kind, name));
        };
        let mut new = current.clone();
        f(&mut new)?;
        // Identity fields are not writable.
        for field in ["name", "namespace", "uid", "creationTimestamp"] {
            if let Some(v) = current.pointer(&format!("/metadata/{field}")) {
                meta::metadata_mut(&mut new).insert(field.into(), v.clone());
            }
        }
        new["kind"] = json!(kind.kind_name());
        new["apiVersion"] = json!(kind.api_version());
        if let Some(v) = current.pointer("/metadata/resourceVersion") {
            meta::metadata_mut(&mut new).insert("resourceVersion".into(), v.clone());
        }
        if new == *current {
            return Ok(new);
        }
        inner.rev += 1;
        let rev = inner.rev;
        meta::metadata_mut(&mut new).insert("resourceVersion".into(), json!(rev.to_string()));
        // The stored version moves into the event as the old one: no copy.
        let (ty, old) = if meta::ready_to_remove(&new) {
            (EventType::Deleted, inner.take(&key))
        } else {
            (EventType::Modified, inner.put(key, new.clone()))
        };
        self.publish(
            &mut inner,
            Event {
                rev,
                kind,
                ty,
                object: new.clone(),
                old,
            },
        );
        Ok(new)
    }

    /// Removes an object at once, whatever its finalizers; returns its last state.
    pub(crate) fn remove(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let mut inner = self.lock();
        let mut object = inner.take(&(kind, ns.to_owned(), name.to_owned()))?;
        inner.rev += 1;
        let rev = inner.rev;
        let old = object.clone();
        meta::metadata_mut(&mut object).insert("resourceVersion".into(), json!(rev.to_string()));
        self.publish(
            &mut inner,
            Event {
                rev,
                kind,
                ty: EventType::Deleted,
                object: object.clone(),
                old: Some(old),
            },
        );
        Some(object)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn job(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "default"}, "spec": {}})
    }

    #[test]
    fn pods_are_found_by_their_controller_through_creates_updates_and_removals() {
        let store = Store::new(100);
        let pod = |name: &str, ns: &str, owner: Option<&str>| {
            let refs: Vec<Value> = owner
                .map(|u| json!({"uid": u, "controller": true}))
                .into_iter()
                .collect();
            json!({"metadata": {"name": name, "namespace": ns, "ownerReferences": refs}})
        };
        let owned = |ns: &str, uid: &str| -> Vec<String> {
            store
                .pods_owned_by(ns, uid)
                .iter()
                .map(|p| meta::name(p).to_owned())
                .collect()
        };
        for (name, owner) in [("a", "j1"), ("b", "j1"), ("c", "j2")] {
            store
                .create(Kind::Pod, pod(name, "default", Some(owner)))
                .unwrap();
        }
        store
            .create(Kind::Pod, pod("a", "other", Some("j1")))
            .unwrap();
        store
            .create(Kind::Job, pod("j", "default", Some("j1")))
            .unwrap();
        assert_eq!(owned("default", "j1"), ["a", "b"]);
        assert_eq!(owned("other", "j1"), ["a"]);
        // Orphaned, then adopted by another controller.
        store
            .update(Kind::Pod, "default", "b", |p| {
                p["metadata"]["ownerReferences"] = json!([]);
                Ok(())
            })
            .unwrap();
        assert_eq!(owned("default", "j1"), ["a"]);
        store
            .update(Kind::Pod, "default", "a", |p| {
                p["metadata"]["ownerReferences"] = json!([{"uid": "j2", "controller": true}]);
                Ok(())
            })
            .unwrap();
        assert!(owned("default", "j1").is_empty());
        assert_eq!(owned("default", "j2"), ["a", "c"]);
        // A change that keeps the owner keeps the pod listed.
        store
            .update(Kind::Pod, "default", "c", |p| {
                p["status"] = json!({"phase": "Running"});
                Ok(())
            })
            .unwrap();
        assert_eq!(owned("default", "j2"), ["a", "c"]);
        store.remove(Kind::Pod, "default", "c").unwrap();
        assert_eq!(owned("default", "j2"), ["a"]);
        assert_eq!(
            store.pods_owned_by("default", "j2")[0]["metadata"]["ownerReferences"][0]["uid"],
            "j2"
        );
    }

    #[test]
    fn revisions_increase_and_unchanged_updates_are_not_written() {
        let store = Store::new(100);
        let a = store.create(Kind::Job, job("a")).unwrap();
        let rv_a: u64 = meta::resource_version(&a);
        let same = store.update(Kind::Job, "default", "a", |_| Ok(())).unwrap();
        assert_eq!(meta::resource_version(&same), rv_a);
        let changed = store
            .update(Kind::Job, "default", "a", |o| {
                o["spec"]["suspend"] = json!(true);
                Ok(())
            })
            .unwrap();
        assert!(meta::resource_version(&changed) > rv_a);
        assert!(store.create(Kind::Job, job("a")).is_err());
    }

    #[test]
    fn history_is_bounded_and_old_versions_are_gone() {
        let store = Store::new(2);
        for name in ["a", "b", "c", "d"] {
            store.create(Kind::Job, job(name)).unwrap();
        }
        assert!(store.watch_from(Some(1)).is_err());
        let sub = store.watch_from(Some(store.revision() - 1)).unwrap();
        assert_eq!(sub.backlog.len(), 1);
    }

    #[test]
    fn deleting_object_with_finalizer_waits_for_its_removal() {
        let store = Store::new(100);
        let mut j = job("a");
        j["metadata"]["finalizers"] = json!(["x"]);
        store.create(Kind::Job, j).unwrap();
        store
            .update(Kind::Job, "default", "a", |o| {
                o["metadata"]["deletionTimestamp"] = json!(meta::now());
                Ok(())
            })
            .unwrap();
        assert!(store.get(Kind::Job, "default", "a").is_some());
        store
            .update(Kind::Job, "default", "a", |o| {
                o["metadata"]["finalizers"] = json!([]);
                Ok(())
            })
            .unwrap();
        assert!(store.get(Kind::Job, "default", "a").is_none());
    }
}
