//! The pure builder of a session's Job, and what the backend reads off Jobs
//! and Pods. The pod is hardened exactly like a task's ([`crate::job::build`];
//! a unit test compares the two), but runs the idle loop instead of a script.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use sandfleet_settings::KubernetesSettings;
use serde_json::{Value, json};

use super::SessionMeta;
use crate::job::{LABEL_JOB, LABEL_MANAGED_BY, STATE_PATH, WORKSPACE_PATH};
use crate::session::SessionSpec;
use crate::session::script::IDLE_LOOP;

pub use crate::job::CONTAINER;

/// `app.kubernetes.io/managed-by` of session Jobs: not `sandfleet`, so the
/// workers' watch and garbage collector leave sessions alone.
pub const MANAGED_BY_SESSIONS: &str = "sandfleet-sessions";
/// Label with the session id on the Job and its pod.
pub const LABEL_SESSION: &str = "sandfleet.dev/session";
/// Selector of every session Job.
pub const SESSION_SELECTOR: &str = "app.kubernetes.io/managed-by=sandfleet-sessions";
/// Annotation with the session's working dir.
pub const ANNOTATION_WORKING_DIR: &str = "sandfleet.dev/working-dir";
/// Annotation with the idle timeout, in seconds.
pub const ANNOTATION_IDLE_SECS: &str = "sandfleet.dev/idle-timeout-secs";
/// Annotation with the image.
pub const ANNOTATION_IMAGE: &str = "sandfleet.dev/image";

/// Why a session Job cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A resource quantity is malformed.
    #[error("resources.{field}: {message}")]
    Quantity {
        /// Which one.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// The manifest did not deserialize as a Job (a bug).
    #[error("session job manifest: {0}")]
    Manifest(String),
}

/// Kubernetes expands `$(VAR)` in env values; doubling `$` keeps values as given.
fn escape(value: &str) -> String {
    value.replace('$', "$$")
}

/// The Job of session `name`.
pub fn session_job(
    name: &str,
    spec: &SessionSpec,
    meta: &SessionMeta,
    settings: &KubernetesSettings,
) -> Result<Job, BuildError> {
    let r = &spec.resources;
    let mut requests = serde_json::Map::new();
    let mut limits = serde_json::Map::new();
    for (field, value, is_limit, key) in [
        ("cpu_request", &r.cpu_request, false, "cpu"),
        ("memory_request", &r.memory_request, false, "memory"),
        ("cpu_limit", &r.cpu_limit, true, "cpu"),
        ("memory_limit", &r.memory_limit, true, "memory"),
    ] {
        if let Some(v) = value {
            sandfleet_proto::quantity::Quantity::parse(v).map_err(|e| BuildError::Quantity {
                field,
                message: e.to_string(),
            })?;
            let map = if is_limit { &mut limits } else { &mut requests };
            map.insert(key.into(), json!(v));
        }
    }
    let mut resources = json!({});
    if !requests.is_empty() {
        resources["requests"] = Value::Object(requests);
    }
    if !limits.is_empty() {
        resources["limits"] = Value::Object(limits);
    }

    let mut labels: BTreeMap<String, String> = meta.labels.clone();
    labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY_SESSIONS.into());
    labels.insert(LABEL_SESSION.into(), name.into());
    let mut pod_labels = labels.clone();
    pod_labels.insert(LABEL_JOB.into(), name.into());
    let mut annotations = meta.annotations.clone();
    annotations.insert(ANNOTATION_WORKING_DIR.into(), spec.working_dir.clone());
    annotations.insert(
        ANNOTATION_IDLE_SECS.into(),
        spec.idle_timeout.as_secs().to_string(),
    );
    annotations.insert(ANNOTATION_IMAGE.into(), spec.image.clone());

    let mut env = vec![
        json!({"name": "SANDFLEET_STATE_DIR", "value": STATE_PATH}),
        json!({"name": "SANDFLEET_IDLE_SECS", "value": spec.idle_timeout.as_secs().max(1).to_string()}),
        json!({"name": "HOME", "value": WORKSPACE_PATH}),
    ];
    env.extend(
        spec.env
            .iter()
            .map(|(k, v)| json!({"name": k, "value": escape(v)})),
    );

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
        // The idle loop exits on TERM at once.
        "terminationGracePeriodSeconds": 5,
        "containers": [{
            "name": CONTAINER,
            "image": spec.image,
            "command": ["/bin/sh", "-c", IDLE_LOOP, "sandfleet-session"],
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
            "volumeMounts": [
                {"name": "workspace", "mountPath": WORKSPACE_PATH},
                {"name": "state", "mountPath": STATE_PATH},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }],
        "volumes": [
            {"name": "workspace", "emptyDir": {"sizeLimit": settings.workspace_size_limit}},
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
            // The max lifetime: the Job controller ends the pod.
            "activeDeadlineSeconds": spec.max_lifetime.as_secs().max(1),
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": pod_spec,
            },
        },
    });
    serde_json::from_value(manifest).map_err(|e| BuildError::Manifest(e.to_string()))
}

/// Whether a Job is a session's.
pub fn is_session(job: &Job) -> bool {
    job.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_MANAGED_BY))
        .is_some_and(|v| v == MANAGED_BY_SESSIONS)
}

/// Whether a session's Job has finished (its pod ended by idle timeout or lifetime).
pub fn job_ended(job: &Job) -> bool {
    let Some(status) = job.status.as_ref() else {
        return false;
    };
    status.succeeded.unwrap_or(0) > 0
        || status.failed.unwrap_or(0) > 0
        || status.conditions.iter().flatten().any(|c| {
            (c.type_ == "Complete" || c.type_ == "Failed" || c.type_ == "FailureTarget")
                && c.status == "True"
        })
}

/// Where a session pod stands on its way up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Still pending.
    Waiting,
    /// Running: its name.
    Running(String),
    /// It will not run: why.
    Failed(String),
}

/// Reads a pod's readiness for exec.
pub fn readiness(pod: &Pod) -> Readiness {
    let name = pod.metadata.name.clone().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        return Readiness::Failed(format!("pod {name} is being deleted"));
    }
    let Some(status) = pod.status.as_ref() else {
        return Readiness::Waiting;
    };
    match status.phase.as_deref() {
        Some("Running") => {
            let running = status
                .container_statuses
                .iter()
                .flatten()
                .any(|c| c.state.as_ref().and_then(|s| s.running.as_ref()).is_some());
            if running {
                Readiness::Running(name)
            } else {
                Readiness::Waiting
            }
        }
        Some("Succeeded") | Some("Failed") => {
            Readiness::Failed(format!("pod {name} ended before the session started"))
        }
        _ => {
            let waiting = status
                .container_statuses
                .iter()
                .flatten()
                .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
                .find(|w| {
                    matches!(
                        w.reason.as_deref(),
                        Some(
                            "ErrImagePull"
                                | "ImagePullBackOff"
                                | "InvalidImageName"
                                | "CreateContainerConfigError"
                        )
                    )
                });
            match waiting {
                Some(w) => Readiness::Failed(format!(
                    "{}: {}",
                    w.reason.clone().unwrap_or_default(),
                    w.message.clone().unwrap_or_default()
                )),
                None => Readiness::Waiting,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn pod_spec_json(job: &Job) -> Value {
        serde_json::to_value(&job.spec.as_ref().unwrap().template.spec).unwrap()
    }

    #[test]
    fn session_pods_are_hardened_like_task_pods() {
        let settings = KubernetesSettings::default();
        let task: sandfleet_proto::Task = serde_json::from_value(json!({
            "schema_version": 1,
            "id": uuid::Uuid::now_v7(),
            "source": {"repository": "https://example.com/r.git", "commit": "0123456789abcdef0123456789abcdef01234567"},
            "sandbox": {"image": "alpine:3.20", "deadline_secs": 60},
            "steps": [{"name": "t", "command": "true", "timeout_secs": 5}],
        }))
        .unwrap();
        let ctx = crate::RunContext::default();
        let task_job = crate::job::build(&task, 1, &ctx, &settings).unwrap();
        let session = session_job(
            "ss-x",
            &SessionSpec::new("alpine:3.20"),
            &SessionMeta::default(),
            &settings,
        )
        .unwrap();
        let (t, s) = (pod_spec_json(&task_job), pod_spec_json(&session));
        for key in [
            "automountServiceAccountToken",
            "enableServiceLinks",
            "serviceAccountName",
            "securityContext",
            "volumes",
            "restartPolicy",
        ] {
            assert_eq!(t[key], s[key], "{key}");
        }
        for key in ["securityContext", "volumeMounts", "workingDir"] {
            assert_eq!(t["containers"][0][key], s["containers"][0][key], "{key}");
        }
    }

    #[test]
    fn values_travel_as_env_and_survive_kubernetes_expansion() {
        let mut spec = SessionSpec::new("img");
        spec.env.insert("TOKEN".into(), "a$(HOME)b".into());
        let job = session_job(
            "ss-x",
            &spec,
            &SessionMeta::default(),
            &KubernetesSettings::default(),
        )
        .unwrap();
        let c = &pod_spec_json(&job)["containers"][0];
        let env = c["env"].as_array().unwrap();
        assert!(env.contains(&json!({"name": "TOKEN", "value": "a$$(HOME)b"})));
        assert_eq!(
            c["command"][2], IDLE_LOOP,
            "the pod's command is the constant idle loop"
        );
        let spec_json = serde_json::to_value(job.spec.as_ref().unwrap()).unwrap();
        assert_eq!(spec_json["activeDeadlineSeconds"], 3600);
        assert!(!is_session(&Job::default()));
        assert!(is_session(&job));
    }
}
