//! The configuration sections, one per component.

use std::collections::BTreeMap;
use std::time::Duration;

use sandfleet_proto::Step;
use serde::{Deserialize, Serialize};

/// Connection to RabbitMQ (section `amqp`).
///
/// `Debug` hides the password in `url`, so settings can be logged.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    /// `amqp://` or `amqps://` URL, credentials included.
    pub url: String,
    /// Connections kept in the pool.
    pub pool_size: usize,
    /// Heartbeat interval negotiated with the broker, in seconds (0 disables).
    pub heartbeat_secs: u16,
    /// Timeout for establishing a connection, in seconds.
    pub connect_timeout_secs: u64,
    /// Name shown for this process's connections in the broker's UI; defaults
    /// to `sandfleet-<component>@<host>`.
    pub connection_name: Option<String>,
    /// Bound on publishes awaiting their confirm, per publisher.
    pub max_outstanding_confirms: usize,
    /// Cap on the reconnect backoff, in seconds.
    pub reconnect_max_delay_secs: u64,
}

impl std::fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("heartbeat_secs", &self.heartbeat_secs)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("connection_name", &self.connection_name)
            .field("max_outstanding_confirms", &self.max_outstanding_confirms)
            .field("reconnect_max_delay_secs", &self.reconnect_max_delay_secs)
            .finish()
    }
}

/// `scheme://user:secret@host/...` → `scheme://user:***@host/...`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

impl Default for AmqpSettings {
    fn default() -> Self {
        AmqpSettings {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            pool_size: 4,
            heartbeat_secs: 30,
            connect_timeout_secs: 10,
            connection_name: None,
            max_outstanding_confirms: 1000,
            reconnect_max_delay_secs: 30,
        }
    }
}

/// Names and arguments of exchanges and queues (section `topology`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopologySettings {
    /// Prefix of every exchange and queue name (`<prefix>.tasks`, ...).
    pub prefix: String,
    /// Deliveries of one message before the broker dead-letters it (crash loops).
    pub delivery_limit: u32,
    /// The retry ladder: one delay queue per entry, with this TTL in seconds.
    pub retry_delays_secs: Vec<u64>,
    /// Age retention of the results stream (RabbitMQ `x-max-age`, e.g. `7D`, `24h`).
    pub results_max_age: String,
    /// Size bound of the results stream, in bytes.
    pub results_max_bytes: u64,
    /// Bound on ready messages in the task queue; publishes over it are
    /// rejected (`x-overflow: reject-publish`). 0 means unbounded.
    pub tasks_max_length: u64,
    /// Task queue shards for fair sharing (`docs/fairness.md`): producers
    /// publish each task to `<prefix>.tasks.<n>`, `n` a hash of its fairness
    /// key, and workers consume every shard and choose by weight. 0 (the
    /// default) keeps the single FIFO task queue.
    pub task_shards: u16,
}

impl Default for TopologySettings {
    fn default() -> Self {
        TopologySettings {
            prefix: "sandfleet".to_owned(),
            delivery_limit: 20,
            retry_delays_secs: vec![10, 60, 300, 1800],
            results_max_age: "7D".to_owned(),
            results_max_bytes: 5_000_000_000,
            tasks_max_length: 0,
            task_shards: 0,
        }
    }
}

/// The worker process (section `worker`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// Tasks run at once; also the consumer prefetch.
    pub concurrency: u16,
    /// Which executor runs sandboxes: `local` or `kubernetes`.
    pub executor: ExecutorKind,
    /// How long SIGTERM waits for in-flight tasks before releasing them, in seconds.
    pub drain_timeout_secs: u64,
    /// Address of the `/healthz`, `/readyz`, `/metrics` server.
    pub http_addr: String,
    /// This worker's name in results; defaults to the host name.
    pub name: Option<String>,
    /// How often the task queue's depth is polled for metrics, in seconds.
    pub queue_depth_poll_secs: u64,
    /// Threads of the worker's async runtime; 0 leaves it to tokio (one per
    /// CPU the process may use, or `TOKIO_WORKER_THREADS`).
    pub runtime_threads: u16,
    // The broker's consumer_timeout moved to `limits.broker_consumer_timeout_secs`,
    // where the intakes read it too; `load` names the new key for the old one.
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            concurrency: 4,
            executor: ExecutorKind::Local,
            drain_timeout_secs: 60,
            http_addr: "0.0.0.0:9090".to_owned(),
            name: None,
            queue_depth_poll_secs: 10,
            // What the runtime does (AMQP, HTTP to the API server, JSON) is
            // about a millisecond of CPU per task; a second thread costs
            // more in wake-ups than it adds (docs/worker.md).
            runtime_threads: 1,
        }
    }
}

/// Which executor runs sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorKind {
    /// A child process in a temp directory (the embedded default).
    Local,
    /// A Kubernetes Job per task (production).
    Kubernetes,
}

/// The circuit breaker around the Kubernetes API (section `breaker`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker.
    pub consecutive_failures: u32,
    /// Failure rate (0..1) over the window that opens the breaker.
    pub failure_rate: f64,
    /// Calls in the sliding window for the failure rate.
    pub window: u32,
    /// Calls the window must hold before the rate is judged.
    pub min_calls: u32,
    /// How long the breaker stays open before probing, in seconds.
    pub cooldown_secs: u64,
    /// Probe calls let through while half-open; all must succeed to close.
    pub half_open_probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: 20,
            min_calls: 10,
            cooldown_secs: 30,
            half_open_probes: 3,
        }
    }
}

/// Retries of infrastructure failures (section `retry`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Backoff before attempt 2, in seconds; doubles per attempt.
    pub base_delay_secs: u64,
    /// Cap on the backoff, in seconds.
    pub max_delay_secs: u64,
    /// Jitter as a fraction of the delay (0..1); the delay is drawn from
    /// `[d * (1 - jitter), d]`.
    pub jitter: f64,
    /// Retries of a transient Kubernetes API error inside one attempt.
    pub api_retries: u32,
    /// First delay of those in-place retries, in milliseconds.
    pub api_retry_base_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            base_delay_secs: 10,
            max_delay_secs: 1800,
            jitter: 0.2,
            api_retries: 3,
            api_retry_base_ms: 200,
        }
    }
}

/// Executors (section `sandbox`, with `sandbox.local` and `sandbox.kubernetes`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSettings {
    /// The local executor.
    pub local: LocalSettings,
    /// The Kubernetes executor.
    pub kubernetes: KubernetesSettings,
}

/// The local executor (section `sandbox.local`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalSettings {
    /// Where workspaces are created; the system temp dir when unset.
    pub work_dir: Option<String>,
    /// The POSIX shell that runs the generated script.
    pub shell: String,
    /// Bound on captured output per task, in bytes.
    pub max_output_bytes: usize,
    /// Run the script under bubblewrap when it is installed.
    pub bubblewrap: bool,
    /// Largest file a step may write, in bytes: its captured output and any
    /// single file in its workspace (`ulimit -f`). Reaching it ends the task
    /// as `failed` with a reason that says so.
    pub max_file_bytes: u64,
    /// Disk space a run may use, in bytes: the workspace and the captured
    /// output together, measured every second. Passing it stops the task as
    /// `failed` with a reason that says so.
    pub max_workspace_bytes: u64,
}

impl Default for LocalSettings {
    fn default() -> Self {
        LocalSettings {
            work_dir: None,
            shell: "/bin/sh".to_owned(),
            max_output_bytes: 64 * 1024,
            bubblewrap: false,
            max_file_bytes: 1 << 30,
            max_workspace_bytes: 4 << 30,
        }
    }
}

/// The Kubernetes executor (section `sandbox.kubernetes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesSettings {
    /// Namespace the sandbox Jobs are created in.
    pub namespace: String,
    /// Service account of sandbox pods (its token is never mounted).
    pub service_account: String,
    /// Require a non-root user in the sandbox.
    pub run_as_non_root: bool,
    /// UID to run the sandbox as, when the image does not set a numeric user.
    pub run_as_user: Option<i64>,
    /// Node selector for sandbox pods.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for sandbox pods, in Kubernetes' JSON form.
    pub tolerations: Vec<serde_json::Value>,
    /// RuntimeClass of sandbox pods (gVisor, Kata).
    pub runtime_class: Option<String>,
    /// Image pull secrets of sandbox pods.
    pub image_pull_secrets: Vec<String>,
    /// `ttlSecondsAfterFinished` of sandbox Jobs.
    pub ttl_seconds_after_finished: i32,
    /// Bound on the pod log read into a result, in bytes (`limitBytes`).
    pub log_limit_bytes: i64,
    /// How often orphaned Jobs are garbage-collected, in seconds.
    pub gc_interval_secs: u64,
    /// Age after which a sandfleet Job no worker claims is deleted, in seconds.
    pub orphan_max_age_secs: u64,
    /// Size limit of the workspace `emptyDir` (e.g. `10Gi`).
    pub workspace_size_limit: String,
    /// Timeout of a single API request, in seconds.
    pub request_timeout_secs: u64,
    /// Requests and limits of every sandbox pod, for what its task leaves unset.
    pub default_resources: DefaultResources,
    /// The most a sandbox may get; a task asking for more is refused.
    pub max_resources: MaxResources,
    /// Kueue `LocalQueue` for sandbox Jobs. When set, Jobs carry the label
    /// `kueue.x-k8s.io/queue-name` and are created suspended; Kueue admits
    /// (unsuspends) them against the cluster's quotas.
    pub kueue_queue: Option<String>,
    /// How long a Job may wait suspended for Kueue's admission, in seconds,
    /// before the attempt ends as `unschedulable` (retried). The pending
    /// timeout starts only at admission. The worker also keeps the wait
    /// inside the broker's consumer timeout.
    pub admission_timeout_secs: u64,
}

/// Requests and limits a sandbox pod gets where its task sets none (section
/// `sandbox.kubernetes.default_resources`), as Kubernetes quantities. Unset
/// means none from sandfleet (a namespace LimitRange may still set one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DefaultResources {
    /// CPU request (`500m`).
    pub cpu_request: Option<String>,
    /// CPU limit.
    pub cpu_limit: Option<String>,
    /// Memory request.
    pub memory_request: Option<String>,
    /// Memory limit; exceeding it ends the attempt as `oom_killed`.
    pub memory_limit: Option<String>,
    /// Ephemeral-storage request (tasks cannot set this one).
    pub ephemeral_storage_request: Option<String>,
    /// Ephemeral-storage limit: the workspace, captured output, `/tmp` and
    /// logs together; a pod over it is evicted by the kubelet.
    pub ephemeral_storage_limit: Option<String>,
}

impl Default for DefaultResources {
    fn default() -> Self {
        DefaultResources {
            cpu_request: Some("500m".to_owned()),
            cpu_limit: Some("2".to_owned()),
            memory_request: Some("1Gi".to_owned()),
            memory_limit: Some("2Gi".to_owned()),
            ephemeral_storage_request: Some("1Gi".to_owned()),
            ephemeral_storage_limit: Some("12Gi".to_owned()),
        }
    }
}

/// Upper bounds on a sandbox's resources (section
/// `sandbox.kubernetes.max_resources`): a task whose request or limit is
/// above one is refused with a reason naming both. Unset means no bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaxResources {
    /// Most CPU a task may request or be limited to.
    pub cpu: Option<String>,
    /// Most memory a task may request or be limited to.
    pub memory: Option<String>,
}

impl Default for MaxResources {
    fn default() -> Self {
        MaxResources {
            cpu: Some("8".to_owned()),
            memory: Some("16Gi".to_owned()),
        }
    }
}

impl Default for KubernetesSettings {
    fn default() -> Self {
        KubernetesSettings {
            namespace: "sandfleet-sandboxes".to_owned(),
            service_account: "sandfleet-sandbox".to_owned(),
            run_as_non_root: true,
            run_as_user: Some(65532),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            runtime_class: None,
            image_pull_secrets: Vec::new(),
            ttl_seconds_after_finished: 600,
            log_limit_bytes: 64 * 1024,
            gc_interval_secs: 300,
            orphan_max_age_secs: 24 * 3600,
            workspace_size_limit: "10Gi".to_owned(),
            request_timeout_secs: 30,
            default_resources: DefaultResources::default(),
            max_resources: MaxResources::default(),
            kueue_queue: None,
            admission_timeout_secs: 3600,
        }
    }
}

/// The sessions service, `sandfleet sessions` (section `sessions`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsSettings {
    /// Where sessions run: `kubernetes` or `local`.
    pub backend: SessionBackendKind,
    /// Warm pools the service keeps full (`[[sessions.pools]]`; Kubernetes only).
    pub pools: Vec<PoolSettings>,
}

/// Where the sessions service runs sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionBackendKind {
    /// A Job per session in `sandbox.kubernetes.namespace`, driven through
    /// `pods/exec` (production; any number of replicas).
    #[default]
    Kubernetes,
    /// Child processes in a temp dir on the service's own host: one replica,
    /// no isolation; for trying the service out and for client tests.
    Local,
}

/// One warm pool: idle sandboxes a session claims instead of waiting for a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    /// The pool's name, as sessions ask for it (`pool: NAME`).
    pub name: String,
    /// Container image of every member.
    pub image: String,
    /// Idle members kept ready.
    pub size: usize,
    /// Seconds after which an idle member is replaced.
    #[serde(default = "default_pool_max_age")]
    pub max_age_secs: u64,
    /// CPU request of every member (the sandbox default when unset).
    #[serde(default)]
    pub cpu_request: Option<String>,
    /// CPU limit.
    #[serde(default)]
    pub cpu_limit: Option<String>,
    /// Memory request.
    #[serde(default)]
    pub memory_request: Option<String>,
    /// Memory limit.
    #[serde(default)]
    pub memory_limit: Option<String>,
}

fn default_pool_max_age() -> u64 {
    3600
}

/// The operator console, `sandfleet console` (section `console`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Listen address.
    pub listen_addr: String,
    /// Whether reading (every page) needs a token too; actions always do.
    pub read_requires_token: bool,
    /// Who may sign in, and what they may do.
    pub tokens: Vec<ConsoleToken>,
    /// Worker HTTP endpoints (`http://host:9090`) whose readiness, breaker
    /// and running attempts the overview shows.
    pub workers: Vec<String>,
    /// The sessions service; the overview shows its sessions when set.
    pub sessions_url: Option<String>,
    /// The bearer token the console lists sessions with.
    pub sessions_token: Option<String>,
    /// How often the overview's live figures are gathered.
    pub refresh_secs: u64,
    /// How many recent results the console keeps in memory.
    pub results_kept: usize,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        ConsoleSettings {
            listen_addr: "127.0.0.1:8070".to_owned(),
            read_requires_token: false,
            tokens: Vec::new(),
            workers: Vec::new(),
            sessions_url: None,
            sessions_token: None,
            refresh_secs: 2,
            results_kept: 5000,
        }
    }
}

/// A console sign-in token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleToken {
    /// Who holds it, shown on the page and in the logs.
    pub name: String,
    /// The secret itself (at least 16 characters).
    pub token: String,
    /// What it may do.
    pub role: ConsoleRole,
}

/// What a console token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleRole {
    /// Read every page.
    Viewer,
    /// Read, and act: requeue, purge, replay.
    Operator,
}

/// The webhook gateway (section `gateway`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySettings {
    /// Listen address.
    pub listen_addr: String,
    /// GitHub webhook secret (HMAC-SHA256); GitHub intake is off when unset.
    pub github_secret: Option<String>,
    /// GitLab webhook token; GitLab intake is off when unset.
    pub gitlab_token: Option<String>,
    /// Bearer tokens accepted by `POST /v1/tasks`; the API is off when empty.
    pub api_tokens: Vec<String>,
    /// Repositories (`owner/name`, or `owner/*`) whose events become tasks.
    pub allowed_repositories: Vec<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// The fix attempt built from a CI event.
    pub template: FixTemplate,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            listen_addr: "0.0.0.0:8080".to_owned(),
            github_secret: None,
            gitlab_token: None,
            api_tokens: Vec::new(),
            allowed_repositories: Vec::new(),
            max_body_bytes: 1024 * 1024,
            template: FixTemplate::default(),
        }
    }
}

/// How a CI event becomes a fix attempt (section `gateway.template`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FixTemplate {
    /// Sandbox image.
    pub image: String,
    /// Steps; event values are available as `SANDFLEET_REPOSITORY`,
    /// `SANDFLEET_COMMIT`, `SANDFLEET_REF`, `SANDFLEET_CLONE_URL` env vars.
    pub steps: Vec<Step>,
    /// Overall deadline, in seconds.
    pub deadline_secs: u64,
    /// How long the sandbox may wait to start (image pull, scheduling), in
    /// seconds. With `deadline_secs` it must fit the broker's consumer
    /// timeout (`limits.broker_consumer_timeout_secs`) less 60 s.
    pub pending_timeout_secs: u64,
    /// Attempts for infrastructure failures.
    pub max_attempts: u32,
}

impl Default for FixTemplate {
    fn default() -> Self {
        let step = |name: &str, run: &str, timeout_secs| Step {
            name: name.to_owned(),
            run: run.to_owned(),
            timeout_secs,
            env: BTreeMap::new(),
            continue_on_error: false,
        };
        FixTemplate {
            image: "docker.io/library/alpine:3.20".to_owned(),
            steps: vec![
                step(
                    "checkout",
                    "git clone --filter=blob:none \"$SANDFLEET_CLONE_URL\" src && git -C src checkout \"$SANDFLEET_COMMIT\"",
                    120,
                ),
                step("build", "cd src && make", 480),
                step("test", "cd src && make test", 600),
            ],
            // The worker holds the delivery unacked while the sandbox runs, so
            // deadline + pending timeout must fit RabbitMQ's default
            // consumer_timeout (30 min) less the worker's 60 s margin.
            deadline_secs: 1200,
            pending_timeout_secs: 300,
            max_attempts: 3,
        }
    }
}

/// Logs and traces (section `telemetry`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// `human` or `json`.
    pub log_format: LogFormat,
    /// `tracing` env-filter directives (`info`, `sandfleet_worker=debug`).
    pub log_filter: String,
    /// OTLP/HTTP endpoint for traces; no export when unset.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported traces.
    pub service_name: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            log_format: LogFormat::Human,
            log_filter: "info".to_owned(),
            otlp_endpoint: None,
            service_name: "sandfleet".to_owned(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Seconds as a [`Duration`]; helper for the `*_secs` fields.
pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_broker_password() {
        let settings = AmqpSettings {
            url: "amqps://worker:s3cr3t@rabbit.internal:5671/prod".to_owned(),
            ..AmqpSettings::default()
        };
        let printed = format!("{settings:?}");
        assert!(!printed.contains("s3cr3t"), "{printed}");
        assert!(printed.contains("amqps://worker:***@rabbit.internal:5671/prod"));
        assert_eq!(redact_url("amqp://localhost"), "amqp://localhost");
    }
}

/// Fair sharing between tenants and keys (section `fairness`); in force when
/// `topology.task_shards` is above 0. See `docs/fairness.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FairnessSettings {
    /// Weight of a tenant or key not listed below.
    pub default_weight: u32,
    /// Tasks of one key a worker runs at once at most, for keys not listed
    /// below; 0 = no cap.
    pub default_key_cap: u32,
    /// Tenants with their own weight or cap.
    pub tenants: Vec<FairShare>,
    /// Keys (repositories) with their own weight or cap.
    pub keys: Vec<FairShare>,
    /// Unacknowledged deliveries a worker holds per shard queue (its
    /// prefetch there): enough that a shard's next task is at hand when one
    /// is taken, small so that no worker hoards.
    pub prefetch_per_shard: u16,
    /// A delivery held back this long (its key at its cap) is handed back to
    /// its shard as a fresh copy, long before the broker's consumer timeout.
    pub max_hold_secs: u64,
    /// Distinct keys and tenants a worker names in its metrics; later ones
    /// are counted under `other` (listed keys and tenants are always named).
    pub metric_keys: usize,
}

impl Default for FairnessSettings {
    fn default() -> Self {
        FairnessSettings {
            default_weight: 1,
            default_key_cap: 0,
            tenants: Vec::new(),
            keys: Vec::new(),
            prefetch_per_shard: 2,
            max_hold_secs: 300,
            metric_keys: 50,
        }
    }
}

/// The weight and cap of one tenant or key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FairShare {
    /// The tenant or key (`acme`, `acme/web`).
    pub name: String,
    /// Its share of service relative to the others' weights.
    #[serde(default = "one")]
    pub weight: u32,
    /// Tasks of it a worker runs at once at most; 0 = no cap.
    #[serde(default)]
    pub cap: u32,
}

fn one() -> u32 {
    1
}
