//! Where the service's sessions run: a Kubernetes namespace or this host.
//!
//! [`Backend::Kubernetes`] is production: a session is a Job, its owner and
//! settings are the Job's labels and annotations, so any number of replicas
//! serve it. [`Backend::Local`] runs sessions as child processes of this
//! replica ([`LocalSessions`]): for trying the service out and for the
//! client packages' tests, with the same routes, tokens, limits, reaper and
//! metrics. Its records live in this process, so it is one replica and a
//! restart forgets its sessions (and ends them: their processes are its
//! children); it is no isolation boundary. Warm pools are Kubernetes only: a
//! local session starts in milliseconds.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sandfleet_sandbox::session::kubernetes::pod::{ANNOTATION_IDLE_SECS, ANNOTATION_IMAGE};
use sandfleet_sandbox::session::kubernetes::{ANNOTATION_WORKING_DIR, SessionMeta, SessionRecord};
use sandfleet_sandbox::session::local::workspace_of;
use sandfleet_sandbox::session::{
    CommandOutput, FileContents, KubeSessions, LocalSessions, OutputChunk, RunOptions,
    SessionBackend, SessionError, SessionId, SessionSpec,
};
use tokio::sync::mpsc;

/// The sessions of one service. Cheap to clone.
// One per service, kept in its shared state: the size of the Kubernetes
// variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Backend {
    /// Jobs in a namespace, driven through `pods/exec`.
    Kubernetes(KubeSessions),
    /// Child processes on this host.
    Local(LocalBackend),
}

/// Local sessions and what the service knows of them (what a Job's labels
/// and annotations hold on Kubernetes).
#[derive(Debug, Clone, Default)]
pub struct LocalBackend {
    sessions: LocalSessions,
    records: Arc<Mutex<HashMap<SessionId, SessionRecord>>>,
}

impl LocalBackend {
    /// Sessions run by `sessions`.
    pub fn new(sessions: LocalSessions) -> LocalBackend {
        LocalBackend {
            sessions,
            records: Arc::default(),
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, SessionRecord>> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The record, with `ended` from the session itself: the local backend
    /// ends a session at its idle timeout or lifetime on its own.
    fn current(&self, r: &SessionRecord) -> SessionRecord {
        SessionRecord {
            ended: workspace_of(&self.sessions, &r.id).is_none(),
            ..r.clone()
        }
    }
}

/// Whether `labels` match `selector`: comma-separated `key=value` (or
/// `key==value`) equalities and bare `key` existence checks, as the service
/// writes them; `""` matches everything. Other operators match nothing.
fn matches(labels: &BTreeMap<String, String>, selector: &str) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .all(|term| {
            if term.contains('!') || term.contains(' ') {
                return false;
            }
            match term.split_once('=') {
                Some((k, v)) => labels.get(k) == Some(&v.trim_start_matches('=').to_owned()),
                None => labels.contains_key(term),
            }
        })
}

impl Backend {
    /// Starts a session that carries `meta` (the owner) and returns once it
    /// runs commands.
    pub async fn start_with(
        &self,
        spec: &SessionSpec,
        meta: &SessionMeta,
    ) -> Result<SessionId, SessionError> {
        let local = match self {
            Backend::Kubernetes(k) => return k.start_with(spec, meta).await,
            Backend::Local(l) => l,
        };
        let id = local.sessions.start(spec).await?;
        let mut annotations = meta.annotations.clone();
        annotations.insert(ANNOTATION_IMAGE.into(), spec.image.clone());
        annotations.insert(ANNOTATION_WORKING_DIR.into(), spec.working_dir.clone());
        annotations.insert(
            ANNOTATION_IDLE_SECS.into(),
            spec.idle_timeout.as_secs().to_string(),
        );
        let created = jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .map(|t| t.to_string())
            .ok();
        local.records().insert(
            id.clone(),
            SessionRecord {
                id: id.clone(),
                labels: meta.labels.clone(),
                annotations,
                created,
                ended: false,
            },
        );
        Ok(id)
    }

    /// The sessions whose labels match `selector` (`""` for all), ended ones included.
    pub async fn list(&self, selector: &str) -> Result<Vec<SessionRecord>, SessionError> {
        match self {
            Backend::Kubernetes(k) => k.list(selector).await,
            Backend::Local(l) => {
                let mut all: Vec<SessionRecord> = l
                    .records()
                    .values()
                    .filter(|r| matches(&r.labels, selector))
                    .map(|r| l.current(r))
                    .collect();
                // Ids are UUIDv7: oldest first, as a listing should read.
                all.sort_by(|a, b| a.id.cmp(&b.id));
                Ok(all)
            }
        }
    }

    /// One session's record, if it exists.
    pub async fn get(&self, id: &SessionId) -> Result<Option<SessionRecord>, SessionError> {
        match self {
            Backend::Kubernetes(k) => k.get(id).await,
            Backend::Local(l) => Ok(l.records().get(id).map(|r| l.current(r))),
        }
    }

    /// Forgets (Kubernetes: deletes) the sessions that ended by themselves
    /// and returns them.
    pub async fn reap(&self) -> Result<Vec<SessionId>, SessionError> {
        match self {
            Backend::Kubernetes(k) => k.reap().await,
            Backend::Local(l) => {
                let mut records = l.records();
                let ended: Vec<SessionId> = records
                    .keys()
                    .filter(|id| workspace_of(&l.sessions, id).is_none())
                    .cloned()
                    .collect();
                for id in &ended {
                    records.remove(id);
                }
                Ok(ended)
            }
        }
    }

    /// Called when the service stops. Local sessions end with it (their
    /// processes are its children and their records die with it);
    /// Kubernetes sessions live on, for the other replicas and the next start.
    pub async fn shutdown(&self) {
        let Backend::Local(l) = self else { return };
        let ids: Vec<SessionId> = l.records().keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.teardown(&id).await {
                tracing::warn!(session = %id, "tearing down a local session at shutdown: {e}");
            }
        }
    }

    /// The Kubernetes sessions, if that is where they run.
    pub fn kubernetes(&self) -> Option<&KubeSessions> {
        match self {
            Backend::Kubernetes(k) => Some(k),
            Backend::Local(_) => None,
        }
    }

    fn inner(&self) -> &dyn SessionBackend {
        match self {
            Backend::Kubernetes(k) => k,
            Backend::Local(l) => &l.sessions,
        }
    }
}

#[async_trait]
impl SessionBackend for Backend {
    async fn start(&self, spec: &SessionSpec) -> Result<SessionId, SessionError> {
        self.start_with(spec, &SessionMeta::default()).await
    }

    async fn run(
        &self,
        id: &SessionId,
        command: &str,
        opts: RunOptions,
        sink: Option<mpsc::Sender<OutputChunk>>,
    ) -> Result<CommandOutput, SessionError> {
        self.inner().run(id, command, opts, sink).await
    }

    async fn write_file(
        &self,
        id: &SessionId,
        path: &str,
        bytes: &[u8],
        mode: u32,
    ) -> Result<(), SessionError> {
        self.inner().write_file(id, path, bytes, mode).await
    }

    async fn read_file(
        &self,
        id: &SessionId,
        path: &str,
        max_bytes: usize,
    ) -> Result<FileContents, SessionError> {
        self.inner().read_file(id, path, max_bytes).await
    }

    async fn teardown(&self, id: &SessionId) -> Result<(), SessionError> {
        self.inner().teardown(id).await?;
        if let Backend::Local(l) = self {
            // Torn down on request: gone, not "ended by itself" for the reaper.
            l.records().remove(id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::matches;

    #[test]
    fn selectors_match_equalities_and_existence() {
        let labels: BTreeMap<String, String> = [("owner", "abc"), ("pool", "py")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert!(matches(&labels, ""));
        assert!(matches(&labels, "owner=abc"));
        assert!(matches(&labels, "owner==abc,pool"));
        assert!(!matches(&labels, "owner=abd"));
        assert!(!matches(&labels, "owner=abc,missing"));
        assert!(!matches(&labels, "owner!=abd"));
    }
}
