//! A fake Kubernetes API server with a simulated Job controller and kubelet, for
//! sandfleet's tests.
//!
//! [`KubeSim::start`] serves `batch/v1` Jobs and `v1` Pods over plain HTTP on
//! `127.0.0.1`, reached through an ordinary kubeconfig ([`KubeSim::kubeconfig_yaml`]),
//! so the production kube client path — hyper connection, `Status` errors, the watch
//! line decoder, `runtime::watcher` — runs unchanged. Creating a Job makes the
//! simulated controller create a Pod, and the simulated kubelet **runs the
//! container's `command`/`args` locally** with the pod's env (emptyDir mounts and the
//! termination-message path become host temp dirs, on tmpfs for `medium: Memory`).
//! Tests can script pods to
//! OOM-kill, never schedule, fail image pulls, be evicted or lose their node
//! ([`KubeSim::script_pods`], or the [`SCRIPT_ANNOTATION`] on the pod template), inject
//! faults ([`KubeSim::faults`]) and inspect every request ([`KubeSim::request_log`]).
//!
//! Where to start: [`KubeSim`]; then `docs/kube-sim.md` for where the fake diverges
//! from a real API server. Inside, `api` (routes) sits on `store` (objects, revisions,
//! history) and `watch`; `controller` and `kubelet` drive Jobs and Pods through their
//! phases; `server` owns the sockets, `faults` and `request_log`; `exec` and `attach`
//! (`pods/exec`, `pods/attach`) speak the channel protocol of `remote_command`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use sandfleet_kube_sim::{KubeSim, SimOptions};
//! let sim = KubeSim::start(SimOptions::default()).await?;
//! let yaml = sim.kubeconfig_yaml("default");
//! // let kubeconfig = kube::config::Kubeconfig::from_yaml(&yaml)?;
//! // let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
//! // let client = kube::Client::try_from(config)?;
//! # let _ = yaml; Ok(()) }
//! ```
//!
//! **Retries in kube's client.** kube 5's default client retries 429, 503 and 504
//! responses by itself (`RetryPolicy::server_retry`: several attempts, honouring
//! `Retry-After`). A fault rule returning 503 twice is therefore invisible to code
//! using the default client; to see injected 429/503/504 errors, inject more failures
//! than the client retries, use 500 (not retried), or build the client from a
//! `Config` with `default_retry = false`. Every retried attempt still shows up in
//! [`KubeSim::request_log`].

mod admission;
mod api;
mod attach;
mod controller;
mod deletion;
mod exec;
mod faults;
mod kubelet;
mod kueue;
mod meta;
mod pod_log;
mod remote_command;
mod request_log;
mod script;
mod selector;
mod server;
mod shared;
mod status;
mod store;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

pub use faults::{FaultAction, FaultRule, Faults};
pub use request_log::{OBSERVED_ENV, RequestRecord};
pub use script::{AFTER_MS_ANNOTATION, EXIT_CODE_ANNOTATION, PodScript, SCRIPT_ANNOTATION};
pub use selector::{LabelSelector, SelectorError};

use crate::remote_command::StreamKind;
use crate::server::Server;
use crate::shared::Shared;
use crate::store::Kind;

/// Errors of the simulator itself (not of the API it serves).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The listener could not be bound (or re-bound after
    /// [`KubeSim::refuse_connections`]).
    #[error("kube-sim could not listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl SimError {
    /// Whether retrying may help (a port briefly held elsewhere).
    pub fn is_transient(&self) -> bool {
        matches!(self, SimError::Bind { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse)
    }
}

/// Options of a simulated cluster. Times are compressed so tests run fast.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Where to listen; port 0 picks a free port.
    pub addr: SocketAddr,
    /// How many change events the store keeps for watches; a watch from an older
    /// resourceVersion gets 410 Expired.
    pub history_limit: usize,
    /// Pending (ContainerCreating) → Running, and other kubelet steps.
    pub pod_start_delay: Duration,
    /// Delay before the garbage collector deletes a removed Job's pods.
    pub gc_delay: Duration,
    /// Cap on `terminationGracePeriodSeconds` between SIGTERM and SIGKILL.
    pub max_termination_grace: Duration,
    /// Interval of BOOKMARK events on watches that allow them.
    pub bookmark_interval: Duration,
    /// Simulate Kueue: suspended Jobs labelled `kueue.x-k8s.io/queue-name`
    /// are admitted (unsuspended) in FIFO order, at most this many admitted
    /// and unfinished per queue. `None`: no Kueue, suspended Jobs stay so.
    pub kueue_quota: Option<usize>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            history_limit: 1000,
            pod_start_delay: Duration::from_millis(20),
            gc_delay: Duration::from_millis(50),
            max_termination_grace: Duration::from_secs(2),
            bookmark_interval: Duration::from_secs(5),
            kueue_quota: None,
        }
    }
}

/// A running fake API server with its controller and kubelet. Dropping it (or
/// [`KubeSim::stop`]) shuts everything down and kills running containers.
pub struct KubeSim {
    shared: Arc<Shared>,
    server: Arc<Server>,
}

impl std::fmt::Debug for KubeSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSim")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

impl KubeSim {
    /// Starts the server, the Job controller and the kubelet.
    pub async fn start(options: SimOptions) -> Result<Self, SimError> {
        let addr = options.addr;
        let shared = Arc::new(Shared::new(options));
        let server = Server::start(shared.clone(), addr)
            .map_err(|source| SimError::Bind { addr, source })?;
        tokio::spawn(controller::run(shared.clone()));
        tokio::spawn(kubelet::run_events(shared.clone()));
        if let Some(quota) = shared.options.kueue_quota {
            tokio::spawn(kueue::run(shared.clone(), quota));
        }
        Ok(Self { shared, server })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// A kubeconfig pointing at this server with `namespace` as the default namespace,
    /// for `kube::config::Kubeconfig::from_yaml` + `Config::from_custom_kubeconfig`.
    pub fn kubeconfig_yaml(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: kube-sim\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: kube-sim\n  context:\n    cluster: kube-sim\n    user: kube-sim\n    namespace: {namespace}\n\
             current-context: kube-sim\n\
             users:\n\
             - name: kube-sim\n  user: {{}}\n\
             preferences: {{}}\n",
            url = self.url(),
        )
    }

    /// Fault injection rules.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Every request received so far, in order.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.shared.requests.snapshot()
    }

    /// Forgets the requests logged so far.
    pub fn clear_request_log(&self) {
        self.shared.requests.clear();
    }

    /// Scripts pods whose labels match `label_selector` (created from now on). The most
    /// recently registered matching rule wins over earlier ones and over annotations.
    ///
    /// # Panics
    /// When `label_selector` is not a valid selector (a bug in the test).
    pub fn script_pods(&self, label_selector: &str, script: PodScript) {
        match LabelSelector::parse(label_selector) {
            Ok(sel) => self.shared.kubelet.scripts.add(sel, script),
            Err(e) => panic!("kube-sim: invalid label selector {label_selector:?}: {e}"),
        }
    }

    /// The Jobs in `namespace`, as stored.
    pub fn jobs(&self, namespace: &str) -> Vec<Value> {
        self.shared.store.list(Kind::Job, Some(namespace)).0
    }

    /// The Pods in `namespace`, as stored.
    pub fn pods(&self, namespace: &str) -> Vec<Value> {
        self.shared.store.list(Kind::Pod, Some(namespace)).0
    }

    /// Preempts an admitted, unfinished Kueue-managed Job the way Kueue does
    /// for a higher-priority workload: suspends it again (the Job controller
    /// deletes its pods) and requeues it behind the Jobs already waiting.
    /// Returns false when the Job is not admitted, not Kueue's, or finished.
    pub fn kueue_preempt(&self, namespace: &str, job: &str) -> bool {
        kueue::preempt(&self.shared, namespace, job)
    }

    /// The captured log of a pod's container, while the pod exists.
    pub fn pod_log(&self, namespace: &str, pod: &str) -> Option<String> {
        self.shared
            .kubelet
            .log(namespace, pod)
            .map(|l| String::from_utf8_lossy(&l.contents()).into_owned())
    }

    /// How many `pods/exec` streams are open now (attaches are not counted
    /// here: see [`KubeSim::open_attach_streams`]).
    pub fn open_exec_streams(&self) -> usize {
        self.shared.streams.open(StreamKind::Exec)
    }

    /// How many `pods/attach` streams are open now.
    pub fn open_attach_streams(&self) -> usize {
        self.shared.streams.open(StreamKind::Attach)
    }

    /// Cuts every open `pods/exec` and `pods/attach` stream, without a close
    /// frame or a status (a lost node or proxy). Exec'd commands keep running
    /// until their container ends; an attached container keeps running and
    /// its stdin stays open (unless `stdinOnce`, which closes it as any
    /// detach does).
    pub fn drop_exec_connections(&self) {
        self.shared.streams.cut_all();
    }

    /// Closes the listener and every open connection (`true`: clients get "connection
    /// refused"), or reopens it on the same port (`false`).
    pub async fn refuse_connections(&self, refuse: bool) -> Result<(), SimError> {
        self.server
            .refuse_connections(refuse)
            .await
            .map_err(|source| SimError::Bind {
                addr: self.server.addr(),
                source,
            })
    }

    /// Stops the server, controller and kubelet, killing running containers.
    pub async fn stop(self) {
        self.shared.shutdown.cancel();
        let _ = self.server.refuse_connections(true).await;
        // Let runners observe the shutdown and kill their processes.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for KubeSim {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.shared.kubelet.kill_all();
    }
}
