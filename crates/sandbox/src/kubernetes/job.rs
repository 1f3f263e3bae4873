//! The pure Job builder: one attempt of a task → one `batch/v1` Job.
//!
//! No I/O: the manifest is a function of the task, the attempt, the run
//! context and [`KubernetesSettings`], checked by a committed snapshot
//! (`tests/snapshots/job.json`).

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use sandfleet_proto::{Task, TaskId};
use sandfleet_settings::KubernetesSettings;
use serde_json::{Value, json};

use crate::RunContext;
use crate::script::{
    self, ENV_SCRIPT, ENV_STATE_DIR, ENV_TERMINATION_LOG, ENV_WORKSPACE, ScriptOptions,
};

/// Label every sandfleet Job and pod carries: `app.kubernetes.io/managed-by=sandfleet`.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "sandfleet";
/// Label selector matching every sandfleet Job and pod.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=sandfleet";
/// Label (and annotation) with the task id.
pub const LABEL_TASK_ID: &str = "sandfleet.dev/task-id";
/// Label with the attempt number.
pub const LABEL_ATTEMPT: &str = "sandfleet.dev/attempt";
/// Pod label naming the Job, so the shared pod watch maps pods to Jobs.
pub const LABEL_JOB: &str = "sandfleet.dev/job";
/// Annotation with the task's W3C trace context.
pub const ANNOTATION_TRACEPARENT: &str = "sandfleet.dev/traceparent";
/// Annotation with the task's free-form labels, as a JSON object.
pub const ANNOTATION_LABELS: &str = "sandfleet.dev/labels";
/// Annotation with the worker that created the Job.
pub const ANNOTATION_WORKER: &str = "sandfleet.dev/worker";

/// The workspace mount in the pod.
pub const WORKSPACE_PATH: &str = "/workspace";
/// The script's private state mount in the pod.
pub const STATE_PATH: &str = "/sandfleet";
/// The container's termination-message path (the kubelet's default).
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// The container's name.
pub const CONTAINER: &str = "sandbox";

/// The pod's command. The script travels in `$SANDFLEET_SCRIPT`; the outer
/// shell only expands that variable inside double quotes (no word splitting,
/// no re-parsing) and execs a shell that runs it. Nothing is interpolated.
pub const COMMAND: [&str; 3] = [
    "/bin/sh",
    "-c",
    "exec /bin/sh -c \"$SANDFLEET_SCRIPT\" sandfleet",
];

/// The deterministic Job name of an attempt: `sf-<32 hex>-a<attempt>` (at
/// most 46 characters, DNS-1123).
pub fn job_name(task_id: TaskId, attempt: u32) -> String {
    format!("sf-{}-a{attempt}", task_id.simple())
}

/// Kubernetes expands `$(VAR)` in env values and reduces `$$` to `$`:
/// doubling every `$` keeps values byte-for-byte.
fn escape(value: &str) -> String {
    value.replace('$', "$$")
}

/// Why a Job cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The task cannot become a script.
    #[error(transparent)]
    Script(#[from] script::ScriptError),
    /// A resource quantity of the task is malformed.
    #[error("sandbox.resources.{field}: {message}")]
    Quantity {
        /// Which one.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// A toleration in the settings is not a valid Toleration.
    #[error("sandbox.kubernetes.tolerations[{index}]: {message}")]
    Toleration {
        /// Which one.
        index: usize,
        /// Why.
        message: String,
    },
    /// The manifest did not deserialize as a Job (a bug).
    #[error("job manifest: {0}")]
    Manifest(String),
}

/// Builds the Job for attempt `attempt` of `task`.
pub fn build(
    task: &Task,
    attempt: u32,
    ctx: &RunContext,
    settings: &KubernetesSettings,
) -> Result<Job, BuildError> {
    let budget = u64::try_from(settings.log_limit_bytes).unwrap_or(64 * 1024);
    let script = script::generate(task, attempt, &ScriptOptions::for_budget(task, budget))?;
    let name = job_name(task.id, attempt);
    let task_id = task.id.to_string();

    let r = &task.sandbox.resources;
    for (field, value) in [
        ("cpu_request", &r.cpu_request),
        ("cpu_limit", &r.cpu_limit),
        ("memory_request", &r.memory_request),
        ("memory_limit", &r.memory_limit),
    ] {
        if let Some(v) = value {
            sandfleet_proto::quantity::Quantity::parse(v).map_err(|e| BuildError::Quantity {
                field,
                message: e.to_string(),
            })?;
        }
    }
    for (index, t) in settings.tolerations.iter().enumerate() {
        serde_json::from_value::<k8s_openapi::api::core::v1::Toleration>(t.clone()).map_err(
            |e| BuildError::Toleration {
                index,
                message: e.to_string(),
            },
        )?;
    }

    let labels = json!({
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_TASK_ID: task_id,
        LABEL_ATTEMPT: attempt.to_string(),
    });
    let mut pod_labels = labels.clone();
    pod_labels[LABEL_JOB] = json!(name);

    let mut annotations = BTreeMap::new();
    annotations.insert(LABEL_TASK_ID.to_owned(), task_id.clone());
    if let Some(tp) = &ctx.traceparent {
        annotations.insert(ANNOTATION_TRACEPARENT.to_owned(), tp.clone());
    }
    if !ctx.worker.is_empty() {
        annotations.insert(ANNOTATION_WORKER.to_owned(), ctx.worker.clone());
    }
    if !task.labels.is_empty() {
        annotations.insert(
            ANNOTATION_LABELS.to_owned(),
            serde_json::to_string(&task.labels).map_err(|e| BuildError::Manifest(e.to_string()))?,
        );
    }

    let mut env = vec![
        json!({"name": ENV_SCRIPT, "value": escape(&script.text)}),
        json!({"name": ENV_WORKSPACE, "value": WORKSPACE_PATH}),
        json!({"name": ENV_STATE_DIR, "value": STATE_PATH}),
        json!({"name": ENV_TERMINATION_LOG, "value": TERMINATION_MESSAGE_PATH}),
        json!({"name": "HOME", "value": WORKSPACE_PATH}),
    ];
    env.extend(
        script
            .env
            .iter()
            .map(|(k, v)| json!({"name": k, "value": escape(v)})),
    );

    let mut requests = serde_json::Map::new();
    let mut limits = serde_json::Map::new();
    if let Some(v) = &r.cpu_request {
        requests.insert("cpu".into(), json!(v));
    }
    if let Some(v) = &r.memory_request {
        requests.insert("memory".into(), json!(v));
    }
    if let Some(v) = &r.cpu_limit {
        limits.insert("cpu".into(), json!(v));
    }
    if let Some(v) = &r.memory_limit {
        limits.insert("memory".into(), json!(v));
    }
    let mut resources = json!({});
    if !requests.is_empty() {
        resources["requests"] = Value::Object(requests);
    }
    if !limits.is_empty() {
        resources["limits"] = Value::Object(limits);
    }

    let mut pod_security = json!({
        "runAsNonRoot": settings.run_as_non_root,
        "seccompProfile": {"type": "RuntimeDefault"},
    });
    if let Some(uid) = settings.run_as_user {
        pod_security["runAsUser"] = json!(uid);
        pod_security["runAsGroup"] = json!(uid);
        pod_security["fsGroup"] = json!(uid);
    }

    let mut pod_spec = json!({
        "restartPolicy": "Never",
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "serviceAccountName": settings.service_account,
        "securityContext": pod_security,
        "containers": [{
            "name": CONTAINER,
            "image": task.sandbox.image,
            "command": COMMAND,
            "workingDir": WORKSPACE_PATH,
            "env": env,
            "resources": resources,
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "privileged": false,
                "readOnlyRootFilesystem": true,
                "runAsNonRoot": settings.run_as_non_root,
                "capabilities": {"drop": ["ALL"]},
            },
            "terminationMessagePath": TERMINATION_MESSAGE_PATH,
            "terminationMessagePolicy": "File",
            "volumeMounts": [
                {"name": "workspace", "mountPath": WORKSPACE_PATH},
                {"name": "state", "mountPath": STATE_PATH},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }],
        "volumes": [
            {"name": "workspace", "emptyDir": {"sizeLimit": settings.workspace_size_limit}},
            // Captured step output: bounded by the workspace limit as well.
            {"name": "state", "emptyDir": {"sizeLimit": settings.workspace_size_limit}},
            {"name": "tmp", "emptyDir": {"sizeLimit": settings.workspace_size_limit}},
        ],
    });
    if !settings.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(settings.node_selector);
    }
    if !settings.tolerations.is_empty() {
        pod_spec["tolerations"] = json!(settings.tolerations);
    }
    if let Some(rc) = &settings.runtime_class {
        pod_spec["runtimeClassName"] = json!(rc);
    }
    if !settings.image_pull_secrets.is_empty() {
        pod_spec["imagePullSecrets"] = settings
            .image_pull_secrets
            .iter()
            .map(|s| json!({"name": s}))
            .collect();
    }

    // The pending phase counts toward activeDeadlineSeconds, so it gets its own allowance.
    let active_deadline = task
        .sandbox
        .deadline_secs
        .saturating_add(task.sandbox.pending_timeout_secs);
    let manifest = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "backoffLimit": 0,
            "completions": 1,
            "parallelism": 1,
            "activeDeadlineSeconds": active_deadline,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {LABEL_TASK_ID: task_id},
                },
                "spec": pod_spec,
            },
        },
    });
    serde_json::from_value(manifest).map_err(|e| BuildError::Manifest(e.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_1123_and_short() {
        let id = uuid::Uuid::now_v7();
        let name = job_name(id, u32::MAX);
        assert!(name.len() <= 63, "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert!(name.starts_with("sf-") && name.ends_with("-a4294967295"));
    }

    #[test]
    fn dollar_signs_survive_kubernetes_expansion() {
        assert_eq!(escape("a $(HOME) $$ b$"), "a $$(HOME) $$$$ b$$");
    }
}
