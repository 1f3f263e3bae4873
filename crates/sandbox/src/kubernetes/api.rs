//! [`KubeApi`]: the one type every Kubernetes call of the executor goes through.
//!
//! Each call asks the [`ApiGate`] for permission, records its [`CallClass`]
//! and duration, and is retried in place (bounded exponential backoff with
//! jitter, from backon; 429 waits at least the server's Retry-After) when the
//! error is transient. kube's own retry layer is turned off
//! (`Config::default_retry = false`) so the gate sees every failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::AsyncReadExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, GetParams, ListParams, LogParams, PostParams};
use kube::{Client, Config};
use sandfleet_settings::{KubernetesSettings, RetrySettings};

use super::watch::{JobState, PodState};
use crate::executor::ExecError;

/// Every (API group, resource, verb) the Kubernetes executor calls, through
/// [`KubeApi`] and the shared watchers. The worker's Role
/// (`k8s/base/worker-rbac.yaml`) must grant exactly these:
/// `scripts/deploy_checks.py rbac` compares the two, and the test suite records
/// the calls really made against kube-sim and compares those too.
pub const REQUIRED_PERMISSIONS: &[(&str, &str, &str)] = &[
    ("batch", "jobs", "create"),
    ("batch", "jobs", "get"),
    ("batch", "jobs", "list"),
    ("batch", "jobs", "watch"),
    ("batch", "jobs", "delete"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "pods/log", "get"),
];
use crate::gate::{ApiGate, ApiOp, CallClass, Permission};

/// In-place retries of transient API errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiRetry {
    /// Retries after the first try.
    pub retries: u32,
    /// First backoff delay; doubles per retry (with jitter), capped at 10 s.
    pub base: Duration,
}

impl Default for ApiRetry {
    fn default() -> Self {
        ApiRetry::from(&RetrySettings::default())
    }
}

impl From<&RetrySettings> for ApiRetry {
    fn from(r: &RetrySettings) -> Self {
        ApiRetry {
            retries: r.api_retries,
            base: Duration::from_millis(r.api_retry_base_ms),
        }
    }
}

/// The Kubernetes API, as the executor uses it: Jobs and Pods in one namespace.
#[derive(Clone)]
pub struct KubeApi {
    client: Client,
    namespace: String,
    jobs: Api<Job>,
    pods: Api<Pod>,
    gate: Arc<dyn ApiGate>,
    retry: ApiRetry,
    request_timeout: Duration,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("namespace", &self.namespace)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// Prepares a kube `Config`: our own retries instead of kube's, and the
/// request timeout from the settings.
pub fn tune_config(mut config: Config, settings: &KubernetesSettings) -> Config {
    config.default_retry = false;
    let timeout = Duration::from_secs(settings.request_timeout_secs.max(1));
    config.connect_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    // Reads include watches, which kube keeps open for up to ~5 minutes
    // (`timeoutSeconds=290`); a shorter read timeout would cut them.
    config.read_timeout = Some(Duration::from_secs(295).max(timeout));
    config
}

impl KubeApi {
    /// Connects with the ambient configuration (in-cluster service account, or
    /// `KUBECONFIG` / `~/.kube/config`), in `settings.namespace`.
    pub async fn infer(
        settings: &KubernetesSettings,
        gate: Arc<dyn ApiGate>,
        retry: ApiRetry,
    ) -> Result<KubeApi, ExecError> {
        let config = Config::infer()
            .await
            .map_err(|e| ExecError::Config(format!("kubernetes configuration: {e}")))?;
        KubeApi::from_config(config, settings, gate, retry)
    }

    /// Connects with a kubeconfig document (tests point it at kube-sim).
    pub async fn from_kubeconfig_yaml(
        yaml: &str,
        settings: &KubernetesSettings,
        gate: Arc<dyn ApiGate>,
        retry: ApiRetry,
    ) -> Result<KubeApi, ExecError> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(yaml)
            .map_err(|e| ExecError::Config(format!("kubeconfig: {e}")))?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| ExecError::Config(format!("kubeconfig: {e}")))?;
        KubeApi::from_config(config, settings, gate, retry)
    }

    /// Builds the client from `config` (tuned by [`tune_config`]).
    pub fn from_config(
        config: Config,
        settings: &KubernetesSettings,
        gate: Arc<dyn ApiGate>,
        retry: ApiRetry,
    ) -> Result<KubeApi, ExecError> {
        let config = tune_config(config, settings);
        let client = Client::try_from(config)
            .map_err(|e| ExecError::Config(format!("kubernetes client: {e}")))?;
        let namespace = settings.namespace.clone();
        Ok(KubeApi {
            jobs: Api::namespaced(client.clone(), &namespace),
            pods: Api::namespaced(client.clone(), &namespace),
            client,
            namespace,
            gate,
            retry,
            request_timeout: Duration::from_secs(settings.request_timeout_secs.max(1)),
        })
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// An API for the shared watchers (whose list/watch traffic is not
    /// gated) in the namespace, typed as the watch decodes its objects.
    pub(crate) fn watch_api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The kube client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs `call` through the gate, retrying transient failures in place.
    ///
    /// The request's future (kube's request and decoding, the timeout, the
    /// retry loop) is boxed: inline, its several KB would be part of every
    /// attempt's future for the attempt's whole life — minutes, for a
    /// request that lasts milliseconds — and the worker holds thousands.
    async fn call<T, F, Fut>(&self, op: ApiOp, call: F) -> Result<T, ExecError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        Box::pin(self.call_inline(op, call)).await
    }

    async fn call_inline<T, F, Fut>(&self, op: ApiOp, call: F) -> Result<T, ExecError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let verb = op.verb();
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.base)
            .with_max_delay(Duration::from_secs(10))
            .with_max_times(self.retry.retries as usize)
            .with_jitter()
            .build();
        loop {
            self.gate.permit(verb).map_err(|_| ExecError::Unavailable)?;
            let start = Instant::now();
            // A hung request (accepted, never answered) counts as a failure
            // after the request timeout; the retry then finds the Job (409).
            let result = match tokio::time::timeout(self.request_timeout, call()).await {
                Ok(r) => r,
                Err(_) => {
                    self.gate.record(verb, CallClass::Failure, start.elapsed());
                    let err = ExecError::Api {
                        verb,
                        status: None,
                        message: format!("no response within {:?}", self.request_timeout),
                        retry_after: None,
                    };
                    match backoff.next() {
                        Some(delay) => {
                            tracing::debug!(verb, error = %err, ?delay, "retrying kubernetes call");
                            tokio::time::sleep(delay).await;
                            continue;
                        }
                        None => return Err(err),
                    }
                }
            };
            let err = match result {
                Ok(v) => {
                    self.gate.record(verb, CallClass::Success, start.elapsed());
                    return Ok(v);
                }
                Err(e) => e,
            };
            self.gate.record(verb, class_of(&err), start.elapsed());
            let err = to_exec_error(verb, err);
            if let ExecError::Api {
                status: Some(401 | 403),
                message,
                ..
            } = &err
            {
                self.gate.denied(self.permission(op), message);
            }
            if !err.is_transient() {
                return Err(err);
            }
            match backoff.next() {
                Some(delay) => {
                    let delay = err.retry_after().map_or(delay, |ra| ra.max(delay));
                    tracing::debug!(verb, error = %err, ?delay, "retrying kubernetes call");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(err),
            }
        }
    }

    /// `op` in this API's namespace.
    pub fn permission(&self, op: ApiOp) -> Permission {
        Permission {
            op,
            namespace: self.namespace.clone(),
        }
    }

    /// Checks that `op` works, with one harmless call through the gate (no
    /// in-place retries): a server-side dry run (`dryRun=All`) of a Job
    /// create, a one-item list, or a read or delete of an object that does
    /// not exist, whose 404 proves the API answered and RBAC allowed it. A
    /// 404 counts as a success for the breaker; a 401/403 is reported to the
    /// gate as [`ApiGate::denied`], like any call's.
    pub async fn probe(&self, op: ApiOp) -> Result<(), ExecError> {
        let verb = op.verb();
        self.gate.permit(verb).map_err(|_| ExecError::Unavailable)?;
        let start = Instant::now();
        let call = async {
            let mut req = probe_request(op, &self.jobs, &self.pods)?;
            req.extensions_mut().insert(verb);
            // Only the HTTP status matters: the answer (a Job, a list, a
            // Status) is read, not decoded. Decoding it typed would be the
            // only use of the full Job and Pod decoders an idle worker makes
            // (the executor decodes its objects slim), and their code stays
            // mapped for the worker's life.
            self.client.request_text(req).await.map(drop)
        };
        let result = match tokio::time::timeout(self.request_timeout, call).await {
            Ok(r) => r,
            Err(_) => {
                self.gate.record(verb, CallClass::Failure, start.elapsed());
                return Err(ExecError::Api {
                    verb,
                    status: None,
                    message: format!("no response within {:?}", self.request_timeout),
                    retry_after: None,
                });
            }
        };
        match result {
            Ok(()) => {
                self.gate.record(verb, CallClass::Success, start.elapsed());
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 404 && op != ApiOp::CreateJob => {
                self.gate.record(verb, CallClass::Success, start.elapsed());
                Ok(())
            }
            Err(e) => {
                self.gate.record(verb, class_of(&e), start.elapsed());
                let err = to_exec_error(verb, e);
                if let ExecError::Api {
                    status: Some(401 | 403),
                    message,
                    ..
                } = &err
                {
                    self.gate.denied(self.permission(op), message);
                }
                Err(err)
            }
        }
    }

    /// Creates a Job. A 409 comes back as `ExecError::Api { status: Some(409) }`.
    ///
    /// The Job the server answers with is decoded slim, as the shared watch
    /// decodes it (metadata, status, `spec.suspend`; see [`JobState`]): the
    /// executor reads no more of it, and the rest of its spec is the
    /// generated script again. The manifest is serialized once, not per try.
    pub async fn create_job(&self, job: &Job) -> Result<Job, ExecError> {
        let body = serde_json::to_vec(job)
            .map_err(|e| ExecError::Config(format!("serializing the job: {e}")))?;
        let request = kube::core::Request::new(self.jobs.resource_url());
        let pp = PostParams::default();
        let create = || async {
            let mut req = request
                .create(&pp, body.clone())
                .map_err(kube::Error::BuildRequest)?;
            req.extensions_mut().insert("create");
            self.client.request::<JobState>(req).await
        };
        self.call(ApiOp::CreateJob, create).await.map(Job::from)
    }

    /// Reads a Job, slim (metadata, status, `spec.suspend`; as
    /// [`create_job`](Self::create_job) does); `None` when it does not exist.
    /// It is read when a create conflicts and when the watch cannot be
    /// trusted, for Jobs whose spec repeats the whole script.
    pub async fn get_job(&self, name: &str) -> Result<Option<Job>, ExecError> {
        let api: Api<JobState> = self.watch_api();
        self.call(ApiOp::GetJob, || api.get_opt(name))
            .await
            .map(|j| j.map(Job::from))
    }

    /// Deletes a Job with `propagationPolicy: Background` (its pods go too);
    /// deleting a Job that is already gone is not an error.
    ///
    /// The answer (the Job being deleted, script and all, or a `Status`) is
    /// read but not decoded: only its HTTP status matters.
    pub async fn delete_job(&self, name: &str) -> Result<(), ExecError> {
        let dp = DeleteParams::background();
        let request = kube::core::Request::new(self.jobs.resource_url());
        let delete = || async {
            let mut req = request
                .delete(name, &dp)
                .map_err(kube::Error::BuildRequest)?;
            req.extensions_mut().insert("delete");
            self.client.request_text(req).await.map(drop)
        };
        match self.call(ApiOp::DeleteJob, delete).await {
            Ok(_) => Ok(()),
            Err(ExecError::Api {
                status: Some(404), ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Lists Jobs matching a label selector, slim: metadata, status and
    /// `spec.suspend` (as the shared watch decodes them; the rest of the
    /// spec, with the generated script, is skipped unallocated), in pages of
    /// 500. A namespace holds thousands of sandbox Jobs at ~10 KB
    /// of JSON each: listed whole and decoded in full, the orphan collector
    /// held them all at once, hundreds of MB at 5,000 in flight.
    pub async fn list_jobs(&self, selector: &str) -> Result<Vec<Job>, ExecError> {
        let api: Api<JobState> = self.watch_api();
        let mut jobs = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut lp = ListParams::default().labels(selector).limit(LIST_PAGE);
            if let Some(t) = token.take() {
                lp = lp.continue_token(&t);
            }
            let page = self.call(ApiOp::ListJobs, || api.list(&lp)).await?;
            jobs.extend(page.items.into_iter().map(Job::from));
            match page.metadata.continue_ {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(jobs),
            }
        }
    }

    /// Lists Pods matching a label selector, slim: metadata and status (the
    /// spec, with the script again, is skipped unallocated).
    pub async fn list_pods(&self, selector: &str) -> Result<Vec<Pod>, ExecError> {
        let api: Api<PodState> = self.watch_api();
        let lp = ListParams::default().labels(selector);
        self.call(ApiOp::ListPods, || api.list(&lp))
            .await
            .map(|l| l.items.into_iter().map(Pod::from).collect())
    }

    /// Reads at most `limit_bytes` of a pod's log, as bytes (the log may not
    /// be UTF-8). `None` when the pod or its log is gone.
    pub async fn pod_log(&self, pod: &str, limit_bytes: i64) -> Result<Option<Vec<u8>>, ExecError> {
        let lp = LogParams {
            limit_bytes: Some(limit_bytes),
            container: Some(super::job::CONTAINER.to_owned()),
            ..LogParams::default()
        };
        let read = || async {
            let mut stream = self.pods.log_stream(pod, &lp).await?;
            let mut buf = Vec::new();
            stream
                .read_to_end(&mut buf)
                .await
                .map_err(kube::Error::ReadEvents)?;
            Ok(buf)
        };
        match self.call(ApiOp::ReadLog, read).await {
            Ok(b) => Ok(Some(b)),
            Err(ExecError::Api {
                status: Some(404), ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The name probes read and delete: no Job or Pod has it (sandbox Jobs are
/// `sf-<task>-a<n>`), so a permitted read answers 404.
const PROBE_NAME: &str = "sandfleet-api-probe";

/// Items per page of a list (`limit`); a real API server's default page
/// size for kube's own watcher too.
const LIST_PAGE: u32 = 500;

/// The request [`KubeApi::probe`] sends for `op`: a server-side dry run
/// (`dryRun=All`) of a Job create or delete, a one-item list, or a read of
/// an object that does not exist.
fn probe_request(
    op: ApiOp,
    jobs: &Api<Job>,
    pods: &Api<Pod>,
) -> Result<http::Request<Vec<u8>>, kube::Error> {
    let jobs = kube::core::Request::new(jobs.resource_url());
    let pods = kube::core::Request::new(pods.resource_url());
    let one = ListParams::default().limit(1);
    match op {
        ApiOp::CreateJob => {
            let pp = PostParams {
                dry_run: true,
                ..PostParams::default()
            };
            let body = serde_json::to_vec(&probe_job()).map_err(kube::Error::SerdeError)?;
            jobs.create(&pp, body)
        }
        ApiOp::GetJob => jobs.get(PROBE_NAME, &GetParams::default()),
        ApiOp::DeleteJob => {
            let dp = DeleteParams {
                dry_run: true,
                ..DeleteParams::background()
            };
            jobs.delete(PROBE_NAME, &dp)
        }
        ApiOp::ListJobs => jobs.list(&one),
        ApiOp::ListPods => pods.list(&one),
        ApiOp::ReadLog => pods.logs(PROBE_NAME, &LogParams::default()),
    }
    .map_err(kube::Error::BuildRequest)
}

/// The smallest valid Job, for the dry-run create probe; the server validates
/// and admits it, then persists nothing.
fn probe_job() -> Job {
    use k8s_openapi::api::batch::v1::JobSpec;
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
    Job {
        metadata: kube::api::ObjectMeta {
            name: Some(PROBE_NAME.to_owned()),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            template: PodTemplateSpec {
                spec: Some(PodSpec {
                    restart_policy: Some("Never".to_owned()),
                    containers: vec![Container {
                        name: "probe".to_owned(),
                        image: Some("busybox".to_owned()),
                        command: Some(vec!["/bin/true".to_owned()]),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The breaker's view of a failed call: the server's status, or a
/// transport failure (connect, timeout, reset, unreadable body).
pub(crate) fn class_of(e: &kube::Error) -> CallClass {
    match e {
        kube::Error::Api(status) => CallClass::from_status(status.code, retry_after(status)),
        _ => CallClass::Failure,
    }
}

/// The server's `details.retryAfterSeconds` (429, some 5xx), when set.
fn retry_after(status: &kube::core::Status) -> Option<Duration> {
    status
        .details
        .as_ref()
        .map(|d| d.retry_after_seconds)
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(u64::from(s)))
}

/// Maps a kube error to an [`ExecError`] with its status and Retry-After.
pub(crate) fn to_exec_error(verb: &'static str, e: kube::Error) -> ExecError {
    match e {
        kube::Error::Api(status) => {
            let retry_after = retry_after(&status);
            let code = status.code;
            let message = if status.message.is_empty() {
                status.reason.clone()
            } else {
                status.message.clone()
            };
            if (code == 400 || code == 422) && verb == "create" {
                return ExecError::Rejected(format!("the API refused the Job: {message}"));
            }
            ExecError::Api {
                verb,
                status: Some(code),
                message,
                retry_after: if code == 429 {
                    retry_after.or(Some(Duration::from_secs(1)))
                } else {
                    retry_after
                },
            }
        }
        other => ExecError::Api {
            verb,
            status: None,
            message: other.to_string(),
            retry_after: None,
        },
    }
}
