//! The Kubernetes session backend: one long-lived Job per session, driven
//! through `pods/exec` (kube's `ws` feature; `v5.channel.k8s.io` where the
//! server offers it, v4 otherwise).
//!
//! The pod is hardened like a task's ([`pod`]): no service-account token,
//! dropped capabilities, RuntimeDefault seccomp, read-only root, emptyDir
//! workspace. Its command is the idle loop ([`script::IDLE_LOOP`]): it exits
//! when nobody has talked to it for the idle timeout, and the Job's
//! `activeDeadlineSeconds` ends it at its max lifetime, so an abandoned
//! session costs nothing for long; [`KubeSessions::reap`] deletes the ended
//! Jobs. Commands and file transfers are the session wrappers run by exec;
//! the exit code comes from the status channel. A stream that ends without a
//! status is [`SessionError::ConnectionLost`], never an exit code.
//!
//! Everything a backend needs to find a session again (pod, working dir)
//! lives on the Job, so any process with the Role serves any session.

pub mod pod;
pub mod pool;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt as _;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::api::{Api, AttachParams, DeleteParams, ListParams, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use sandfleet_settings::KubernetesSettings;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use super::script::{self, Bounded};
use super::{
    CommandOutput, FileContents, OutputChunk, RunOptions, SessionBackend, SessionError, SessionId,
    SessionSpec, check_mode, check_relative,
};
pub use pod::{
    ANNOTATION_WORKING_DIR, LABEL_SESSION, MANAGED_BY_SESSIONS, SESSION_SELECTOR, session_job,
};

/// Every (API group, resource, verb) the session backend calls. The sessions
/// service's Role (`k8s/base/sessions-rbac.yaml`) grants exactly these, and
/// `scripts/deploy_checks.py` compares the two. `pods/exec` is opened with a
/// WebSocket GET; API servers that authorize WebSocket exec as `create` need
/// that verb too. `pods/attach` (the same) writes a claim's values to a warm
/// pool member's idle loop.
pub const SESSION_PERMISSIONS: &[(&str, &str, &str)] = &[
    ("batch", "jobs", "create"),
    ("batch", "jobs", "get"),
    ("batch", "jobs", "list"),
    ("batch", "jobs", "delete"),
    ("batch", "jobs", "patch"),
    ("batch", "jobs", "watch"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "pods/exec", "get"),
    ("", "pods/exec", "create"),
    ("", "pods/attach", "get"),
    ("", "pods/attach", "create"),
];

/// Slack past a command's timeout before a silent exec counts as lost.
const STATUS_SLACK: Duration = Duration::from_secs(30);

/// How long a file transfer (or the readiness probe) may take, before the
/// slack: the wrappers are `head -c` and `chmod`, the bytes travel over exec.
const FILE_WAIT: Duration = Duration::from_secs(300);

/// How long output may trail the exit status.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Labels and annotations a caller adds to a session's Job (the service: owner hash).
#[derive(Debug, Clone, Default)]
pub struct SessionMeta {
    /// Extra labels.
    pub labels: BTreeMap<String, String>,
    /// Extra annotations.
    pub annotations: BTreeMap<String, String>,
}

/// A session as listed from the cluster.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    /// Its id (the Job's name).
    pub id: SessionId,
    /// The Job's labels.
    pub labels: BTreeMap<String, String>,
    /// The Job's annotations.
    pub annotations: BTreeMap<String, String>,
    /// When the Job was created (RFC 3339).
    pub created: Option<String>,
    /// The Job finished (idle timeout, lifetime): the session is over.
    pub ended: bool,
}

#[derive(Debug, Clone)]
struct Target {
    pod: String,
    working_dir: String,
}

/// Sessions as Kubernetes Jobs in one namespace. Cheap to clone.
#[derive(Clone)]
pub struct KubeSessions {
    jobs: Api<Job>,
    pods: Api<Pod>,
    settings: Arc<KubernetesSettings>,
    start_timeout: Duration,
    targets: Arc<Mutex<HashMap<SessionId, Target>>>,
}

impl std::fmt::Debug for KubeSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSessions")
            .field("namespace", &self.settings.namespace)
            .finish_non_exhaustive()
    }
}

fn api_error(verb: &str, e: kube::Error) -> SessionError {
    SessionError::Unavailable(format!("{verb}: {e}"))
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    match e {
        kube::Error::Api(s) => s.code == code,
        kube::Error::UpgradeConnection(u) => u.to_string().contains(&code.to_string()),
        _ => false,
    }
}

/// The exit code in an exec `Status`: `Success` is 0, `NonZeroExitCode` carries it.
pub fn exit_code_of(status: &Status) -> Result<i32, String> {
    if status.status.as_deref() == Some("Success") {
        return Ok(0);
    }
    if status.reason.as_deref() == Some("NonZeroExitCode")
        && let Some(code) = status
            .details
            .as_ref()
            .and_then(|d| d.causes.as_ref())
            .and_then(|c| c.iter().find(|c| c.reason.as_deref() == Some("ExitCode")))
            .and_then(|c| c.message.as_deref())
            .and_then(|m| m.parse().ok())
    {
        return Ok(code);
    }
    Err(status
        .message
        .clone()
        .unwrap_or_else(|| "exec failed without a message".into()))
}

async fn drain(
    reader: Option<impl AsyncRead + Unpin>,
    limit: usize,
    sink: Option<mpsc::Sender<OutputChunk>>,
    wrap: fn(Bytes) -> OutputChunk,
) -> Bounded {
    let mut kept = Bounded::new(limit);
    let Some(mut reader) = reader else {
        return kept;
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.push(&buf[..n]);
                if let Some(tx) = &sink {
                    let _ = tx.send(wrap(Bytes::copy_from_slice(&buf[..n]))).await;
                }
            }
        }
    }
}

/// What one exec returned.
struct Exec {
    exit_code: i32,
    stdout: Bounded,
    stderr: Bounded,
}

impl KubeSessions {
    /// Sessions in `settings.namespace`, through `client` (build it with
    /// [`crate::kubernetes::tune_config`]).
    pub fn new(client: kube::Client, settings: KubernetesSettings) -> KubeSessions {
        KubeSessions {
            jobs: Api::namespaced(client.clone(), &settings.namespace),
            pods: Api::namespaced(client, &settings.namespace),
            settings: Arc::new(settings),
            start_timeout: Duration::from_secs(300),
            targets: Arc::default(),
        }
    }

    /// Connects with the ambient configuration (in-cluster service account,
    /// or `KUBECONFIG` / `~/.kube/config`).
    pub async fn infer(settings: KubernetesSettings) -> Result<KubeSessions, SessionError> {
        let config = kube::Config::infer()
            .await
            .map_err(|e| SessionError::Unavailable(format!("kubernetes configuration: {e}")))?;
        Self::from_config(config, settings)
    }

    /// Connects with a kubeconfig document (tests and the bench point it at kube-sim).
    pub async fn from_kubeconfig_yaml(
        yaml: &str,
        settings: KubernetesSettings,
    ) -> Result<KubeSessions, SessionError> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(yaml)
            .map_err(|e| SessionError::Unavailable(format!("kubeconfig: {e}")))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| SessionError::Unavailable(format!("kubeconfig: {e}")))?;
        Self::from_config(config, settings)
    }

    fn from_config(
        config: kube::Config,
        settings: KubernetesSettings,
    ) -> Result<KubeSessions, SessionError> {
        let config = crate::kubernetes::tune_config(config, &settings);
        let client = kube::Client::try_from(config)
            .map_err(|e| SessionError::Unavailable(format!("kubernetes client: {e}")))?;
        Ok(KubeSessions::new(client, settings))
    }

    /// How long `start` waits for the pod to run (image pull, scheduling).
    pub fn with_start_timeout(mut self, timeout: Duration) -> KubeSessions {
        self.start_timeout = timeout;
        self
    }

    /// Starts a session whose Job also carries `meta`.
    pub async fn start_with(
        &self,
        spec: &SessionSpec,
        meta: &SessionMeta,
    ) -> Result<SessionId, SessionError> {
        spec.validate()?;
        let name = format!("ss-{}", uuid::Uuid::now_v7().simple());
        let job = session_job(&name, spec, meta, &self.settings)
            .map_err(|e| SessionError::InvalidSpec(e.to_string()))?;
        self.jobs
            .create(&PostParams::default(), &job)
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) if s.code == 422 || s.code == 400 => {
                    SessionError::InvalidSpec(s.message)
                }
                e => api_error("create session job", e),
            })?;
        let id = SessionId(name.clone());
        match self.await_ready(&id, &spec.working_dir).await {
            Ok(_) => Ok(id),
            Err(e) => {
                // A session that never came up is not left behind.
                let _ = self.teardown(&id).await;
                Err(e)
            }
        }
    }

    /// Waits until session `id`'s pod runs and its working dir exists.
    /// Returns what the readiness probe printed: how the sandbox takes a
    /// claim (see `script::prepare_argv`).
    async fn await_ready(&self, id: &SessionId, working_dir: &str) -> Result<String, SessionError> {
        let selector = format!("{}={}", crate::job::LABEL_JOB, id.0);
        let pods = self.pods.clone();
        let running = async {
            let stream = watcher(pods, watcher::Config::default().labels(&selector))
                .applied_objects()
                .map_err(|e| SessionError::Start(format!("watching the session pod: {e}")));
            futures::pin_mut!(stream);
            while let Some(pod) = stream.try_next().await? {
                match pod::readiness(&pod) {
                    pod::Readiness::Running(name) => return Ok(name),
                    pod::Readiness::Failed(why) => return Err(SessionError::Start(why)),
                    pod::Readiness::Waiting => {}
                }
            }
            Err(SessionError::Start("the pod watch ended".into()))
        };
        let pod = tokio::time::timeout(self.start_timeout, running)
            .await
            .map_err(|_| {
                SessionError::Start(format!(
                    "the session pod was not running after {:?}",
                    self.start_timeout
                ))
            })??;
        let target = Target {
            pod,
            working_dir: working_dir.to_owned(),
        };
        // The pod is Running; the kubelet may need a moment before exec finds the
        // container, so "not running yet" (400) is retried briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        let answer = loop {
            match self.probe(&target).await {
                Ok(e) if e.exit_code == 0 => break e.stdout.text(),
                Ok(e) => return Err(SessionError::Start(e.stderr.text())),
                Err(SessionError::NotFound(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        };
        if let Ok(mut t) = self.targets.lock() {
            t.insert(id.clone(), target);
        }
        Ok(answer)
    }

    /// The readiness probe: creates `target`'s working dir and says how the
    /// sandbox takes a claim.
    async fn probe(&self, target: &Target) -> Result<Exec, SessionError> {
        self.exec(
            target,
            script::prepare_argv(&target.working_dir),
            None,
            4096,
            None,
            FILE_WAIT,
        )
        .await
    }

    /// The pod and working dir of a session: cached, else read from the cluster.
    async fn target(&self, id: &SessionId) -> Result<Target, SessionError> {
        if let Some(t) = self.targets.lock().ok().and_then(|t| t.get(id).cloned()) {
            return Ok(t);
        }
        let job = self
            .slim_jobs()
            .get_opt(&id.0)
            .await
            .map_err(|e| api_error("get session job", e))?
            .map(Job::from)
            .filter(pod::is_session)
            .ok_or_else(|| SessionError::NotFound(id.clone()))?;
        let working_dir = job
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_WORKING_DIR))
            .cloned()
            .unwrap_or_else(|| ".".into());
        let selector = format!("{}={}", crate::job::LABEL_JOB, id.0);
        // Metadata and status are all the lookup reads; the pod's spec (the
        // idle loop) is skipped unallocated.
        let pods: Api<crate::kubernetes::watch::PodState> =
            Api::namespaced(self.pods.clone().into_client(), &self.settings.namespace);
        let pods = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| api_error("list session pods", e))?;
        let pod = pods
            .items
            .into_iter()
            .map(Pod::from)
            .find_map(|p| match pod::readiness(&p) {
                pod::Readiness::Running(name) => Some(name),
                _ => None,
            })
            .ok_or_else(|| SessionError::NotFound(id.clone()))?;
        let t = Target { pod, working_dir };
        if let Ok(mut cache) = self.targets.lock() {
            cache.insert(id.clone(), t.clone());
        }
        Ok(t)
    }

    /// Whether this process knows where session `id` runs (it started the
    /// pod, or has served the session): its execs need no lookup first.
    pub fn knows(&self, id: &SessionId) -> bool {
        self.targets.lock().is_ok_and(|t| t.contains_key(id))
    }

    fn forget(&self, id: &SessionId) {
        if let Ok(mut t) = self.targets.lock() {
            t.remove(id);
        }
    }

    /// One exec: `argv`, optional stdin bytes (kept open until the status
    /// arrives, so v4 servers work too), bounded output.
    async fn exec(
        &self,
        target: &Target,
        argv: Vec<String>,
        stdin: Option<&[u8]>,
        limit: usize,
        sink: Option<mpsc::Sender<OutputChunk>>,
        wait: Duration,
    ) -> Result<Exec, SessionError> {
        let params = AttachParams::default()
            .container(pod::CONTAINER)
            .stdin(stdin.is_some())
            .stdout(true)
            .stderr(true)
            .max_stdin_buf_size(64 * 1024)
            .max_stdout_buf_size(64 * 1024)
            .max_stderr_buf_size(64 * 1024);
        let mut attached = self
            .pods
            .exec(&target.pod, argv, &params)
            .await
            .map_err(|e| {
                if is_status(&e, 404) || is_status(&e, 400) {
                    SessionError::NotFound(SessionId(target.pod.clone()))
                } else {
                    api_error("exec", e)
                }
            })?;
        let status = attached
            .take_status()
            .ok_or_else(|| SessionError::Unavailable("exec gave no status channel".into()))?;
        let mut writer = attached.stdin();
        let tx = sink;
        let out = drain(attached.stdout(), limit, tx.clone(), OutputChunk::Stdout);
        let err = drain(
            attached.stderr(),
            limit.max(64 * 1024),
            tx,
            OutputChunk::Stderr,
        );
        let feed = async {
            if let (Some(bytes), Some(w)) = (stdin, writer.as_mut()) {
                // A failed write shows up as a missing status below.
                let _ = w.write_all(bytes).await;
                let _ = w.flush().await;
            }
        };
        // kube shuts the output pipes down after a status, but not when the
        // stream fails: the status future decides, the drains get a grace after it.
        let all = async {
            let drains = async { tokio::join!(feed, out, err) };
            tokio::pin!(drains);
            tokio::pin!(status);
            let mut drained = None;
            let status = loop {
                tokio::select! {
                    r = &mut drains, if drained.is_none() => drained = Some(r),
                    s = &mut status => break s,
                }
            };
            let Some(status) = status else {
                return (Bounded::new(0), Bounded::new(0), None);
            };
            let ((), stdout, stderr) = match drained {
                Some(r) => r,
                None => match tokio::time::timeout(DRAIN_GRACE, drains).await {
                    Ok(r) => r,
                    Err(_) => return (Bounded::new(0), Bounded::new(0), None),
                },
            };
            (stdout, stderr, Some(status))
        };
        let limit_wait = wait + STATUS_SLACK;
        let (stdout, stderr, status) =
            tokio::time::timeout(limit_wait, all).await.map_err(|_| {
                SessionError::ConnectionLost(format!(
                    "no exit status within {limit_wait:?} of pod {}",
                    target.pod
                ))
            })?;
        drop(writer);
        let status = status.ok_or_else(|| {
            SessionError::ConnectionLost(format!(
                "the exec stream to pod {} ended without an exit status",
                target.pod
            ))
        })?;
        let exit_code = exit_code_of(&status).map_err(SessionError::Unavailable)?;
        Ok(Exec {
            exit_code,
            stdout,
            stderr,
        })
    }

    /// The Jobs API decoding metadata and status only: a session Job's spec
    /// carries the idle loop (~8 KB), which no listing or watch here reads;
    /// decoding skips it unallocated.
    pub(crate) fn slim_jobs(&self) -> Api<crate::kubernetes::watch::JobState> {
        Api::namespaced(self.jobs.clone().into_client(), &self.settings.namespace)
    }

    /// Lists the sessions (Jobs) whose labels match `selector` (added to the
    /// sessions selector; `""` for all).
    pub async fn list(&self, selector: &str) -> Result<Vec<SessionRecord>, SessionError> {
        let full = if selector.is_empty() {
            SESSION_SELECTOR.to_owned()
        } else {
            format!("{SESSION_SELECTOR},{selector}")
        };
        let jobs = self
            .slim_jobs()
            .list(&ListParams::default().labels(&full))
            .await
            .map_err(|e| api_error("list session jobs", e))?;
        Ok(jobs
            .items
            .into_iter()
            .map(Job::from)
            .filter_map(|j| {
                Some(SessionRecord {
                    ended: pod::job_ended(&j),
                    id: SessionId(j.metadata.name.clone()?),
                    labels: j.metadata.labels.clone().unwrap_or_default(),
                    annotations: j.metadata.annotations.clone().unwrap_or_default(),
                    created: j
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0.to_string()),
                })
            })
            .collect())
    }

    /// One session's record, if it exists.
    pub async fn get(&self, id: &SessionId) -> Result<Option<SessionRecord>, SessionError> {
        let job = self
            .slim_jobs()
            .get_opt(&id.0)
            .await
            .map_err(|e| api_error("get session job", e))?
            .map(Job::from);
        Ok(job.filter(pod::is_session).map(|j| SessionRecord {
            ended: pod::job_ended(&j),
            id: id.clone(),
            labels: j.metadata.labels.clone().unwrap_or_default(),
            annotations: j.metadata.annotations.clone().unwrap_or_default(),
            created: j
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
        }))
    }

    /// Deletes the Jobs of sessions that ended by themselves (idle timeout, max
    /// lifetime). Returns their ids. The service calls it periodically.
    pub async fn reap(&self) -> Result<Vec<SessionId>, SessionError> {
        let ended: Vec<SessionId> = self
            .list("")
            .await?
            .into_iter()
            .filter(|r| r.ended)
            .map(|r| r.id)
            .collect();
        for id in &ended {
            self.teardown(id).await?;
        }
        Ok(ended)
    }
}

#[async_trait]
impl SessionBackend for KubeSessions {
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
        let target = self.target(id).await?;
        let started = Instant::now();
        let argv = script::run_argv(&target.working_dir, command, opts.timeout);
        let wait = Duration::from_secs(script::timeout_secs(opts.timeout));
        let e = self
            .exec(&target, argv, None, opts.max_output_bytes, sink, wait)
            .await
            .inspect_err(|e| {
                if matches!(e, SessionError::NotFound(_)) {
                    self.forget(id);
                }
            })
            .map_err(|e| match e {
                SessionError::NotFound(_) => SessionError::NotFound(id.clone()),
                e => e,
            })?;
        let duration = started.elapsed();
        Ok(CommandOutput {
            exit_code: e.exit_code,
            timed_out: script::timed_out(e.exit_code, duration, opts.timeout),
            stdout: e.stdout.bytes,
            stderr: e.stderr.bytes,
            stdout_truncated: e.stdout.truncated,
            stderr_truncated: e.stderr.truncated,
            duration,
        })
    }

    async fn write_file(
        &self,
        id: &SessionId,
        path: &str,
        bytes: &[u8],
        mode: u32,
    ) -> Result<(), SessionError> {
        check_relative(path).map_err(SessionError::InvalidSpec)?;
        let mode = check_mode(mode)?;
        let target = self.target(id).await?;
        let argv = script::write_argv(&target.working_dir, path, &mode, bytes.len());
        let e = self
            .exec(&target, argv, Some(bytes), 4096, None, FILE_WAIT)
            .await
            .map_err(|e| match e {
                SessionError::NotFound(_) => SessionError::NotFound(id.clone()),
                e => e,
            })?;
        if e.exit_code != 0 {
            return Err(file_error(path, e.exit_code, &e.stderr));
        }
        Ok(())
    }

    async fn read_file(
        &self,
        id: &SessionId,
        path: &str,
        max_bytes: usize,
    ) -> Result<FileContents, SessionError> {
        check_relative(path).map_err(SessionError::InvalidSpec)?;
        let target = self.target(id).await?;
        let argv = script::read_argv(&target.working_dir, path, max_bytes.saturating_add(1));
        let e = self
            .exec(&target, argv, None, max_bytes, None, FILE_WAIT)
            .await
            .map_err(|e| match e {
                SessionError::NotFound(_) => SessionError::NotFound(id.clone()),
                e => e,
            })?;
        if e.exit_code != 0 {
            return Err(file_error(path, e.exit_code, &e.stderr));
        }
        Ok(FileContents {
            bytes: e.stdout.bytes,
            truncated: e.stdout.truncated,
        })
    }

    async fn teardown(&self, id: &SessionId) -> Result<(), SessionError> {
        self.forget(id);
        match self.jobs.delete(&id.0, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(api_error("delete session job", e)),
        }
    }
}

fn file_error(path: &str, code: i32, stderr: &Bounded) -> SessionError {
    let text = String::from_utf8_lossy(&stderr.bytes).trim().to_owned();
    SessionError::File {
        path: path.to_owned(),
        message: if text.is_empty() {
            format!("failed with exit code {code}")
        } else {
            text
        },
    }
}
