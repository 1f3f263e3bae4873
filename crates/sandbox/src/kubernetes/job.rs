//! The pure Job builder: one attempt of a task → one `batch/v1` Job.
//!
//! No I/O: the manifest is a function of the task, the attempt, the run
//! context and [`KubernetesSettings`], built from k8s-openapi's typed structs
//! (a misspelt field does not compile, where a `json!` literal would vanish
//! on deserialization) and checked by a committed snapshot
//! (`tests/snapshots/job.json`).

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, LocalObjectReference,
    PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile,
    SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sandfleet_proto::{Task, TaskId};
use sandfleet_settings::KubernetesSettings;

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
/// Annotation with the cancellations stream offset the worker had read up
/// to when it created the Job: every cancel below it was seen first.
pub const ANNOTATION_CANCELS_READ_TO: &str = "sandfleet.dev/cancels-read-to";
/// Job label naming the Kueue `LocalQueue` the Job is submitted to
/// (`sandbox.kubernetes.kueue_queue`). Only the Job carries it: Kueue manages
/// the Job, not its pods.
pub const LABEL_KUEUE_QUEUE: &str = "kueue.x-k8s.io/queue-name";

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
    /// A part of the manifest could not be encoded (the task's labels as JSON).
    #[error("job manifest: {0}")]
    Manifest(String),
}

/// Builds the Job for attempt `attempt` of `task`, with the typed
/// k8s-openapi structs: a field that does not exist does not compile.
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
    let resources = resources(task, settings)?;

    let labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (LABEL_TASK_ID.to_owned(), task_id.clone()),
        (LABEL_ATTEMPT.to_owned(), attempt.to_string()),
    ]);
    let mut pod_labels = labels.clone();
    pod_labels.insert(LABEL_JOB.to_owned(), name.clone());
    let mut labels = labels;
    if let Some(queue) = &settings.kueue_queue {
        labels.insert(LABEL_KUEUE_QUEUE.to_owned(), queue.clone());
    }

    let mut annotations = BTreeMap::new();
    annotations.insert(LABEL_TASK_ID.to_owned(), task_id.clone());
    if let Some(tp) = &ctx.traceparent {
        annotations.insert(ANNOTATION_TRACEPARENT.to_owned(), tp.clone());
    }
    if !ctx.worker.is_empty() {
        annotations.insert(ANNOTATION_WORKER.to_owned(), ctx.worker.clone());
    }
    if let Some(offset) = ctx.cancels_read_to {
        annotations.insert(ANNOTATION_CANCELS_READ_TO.to_owned(), offset.to_string());
    }
    if !task.labels.is_empty() {
        annotations.insert(
            ANNOTATION_LABELS.to_owned(),
            serde_json::to_string(&task.labels).map_err(|e| BuildError::Manifest(e.to_string()))?,
        );
    }

    let var = |name: &str, value: String| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        ..EnvVar::default()
    };
    let mut env = vec![
        var(ENV_SCRIPT, escape(&script.text)),
        var(ENV_WORKSPACE, WORKSPACE_PATH.to_owned()),
        var(ENV_STATE_DIR, STATE_PATH.to_owned()),
        var(ENV_TERMINATION_LOG, TERMINATION_MESSAGE_PATH.to_owned()),
        var("HOME", WORKSPACE_PATH.to_owned()),
    ];
    env.extend(script.env.iter().map(|(k, v)| var(k, escape(v))));

    let pod_spec = sandbox_pod_spec(
        &task.sandbox.image,
        COMMAND.iter().map(|&c| c.to_owned()).collect(),
        env,
        resources,
        settings,
    )?;

    // The pending phase counts toward activeDeadlineSeconds, so it gets its own allowance.
    // (A suspended Job's deadline does not run: the Job controller restarts
    // `startTime` when Kueue admits it.)
    let active_deadline = task
        .sandbox
        .deadline_secs
        .saturating_add(task.sandbox.pending_timeout_secs);
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(settings.namespace.clone()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            completions: Some(1),
            parallelism: Some(1),
            active_deadline_seconds: Some(i64::try_from(active_deadline).unwrap_or(i64::MAX)),
            ttl_seconds_after_finished: Some(settings.ttl_seconds_after_finished),
            // Under Kueue the Job waits suspended (no pod) until admitted:
            // Kueue's own webhook would suspend it anyway, and creating it
            // suspended keeps a pod from starting before admission.
            suspend: settings.kueue_queue.is_some().then_some(true),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(LABEL_TASK_ID.to_owned(), task_id)])),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

/// The hardened pod of every sandfleet sandbox (task Jobs here, session Jobs
/// in [`crate::session::kubernetes`]): no service-account token, no service
/// links, `RuntimeDefault` seccomp, all capabilities dropped, read-only root,
/// emptyDir workspace, state and `/tmp` bounded by the workspace limit, and
/// the settings' scheduling and pull options. The caller gives the image,
/// command, env and resources.
pub fn sandbox_pod_spec(
    image: &str,
    command: Vec<String>,
    env: Vec<EnvVar>,
    resources: ResourceRequirements,
    settings: &KubernetesSettings,
) -> Result<PodSpec, BuildError> {
    let tolerations = settings
        .tolerations
        .iter()
        .enumerate()
        .map(|(index, t)| {
            serde_json::from_value::<Toleration>(t.clone()).map_err(|e| BuildError::Toleration {
                index,
                message: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let uid = settings.run_as_user;
    let pod_security = PodSecurityContext {
        run_as_non_root: Some(settings.run_as_non_root),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..SeccompProfile::default()
        }),
        run_as_user: uid,
        run_as_group: uid,
        fs_group: uid,
        ..PodSecurityContext::default()
    };
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        ..VolumeMount::default()
    };
    let container = Container {
        name: CONTAINER.to_owned(),
        image: Some(image.to_owned()),
        command: Some(command),
        working_dir: Some(WORKSPACE_PATH.to_owned()),
        env: Some(env),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(settings.run_as_non_root),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.to_owned()),
        termination_message_policy: Some("File".to_owned()),
        volume_mounts: Some(vec![
            mount("workspace", WORKSPACE_PATH),
            mount("state", STATE_PATH),
            mount("tmp", "/tmp"),
        ]),
        ..Container::default()
    };
    // Captured step output and /tmp are bounded by the workspace limit as well.
    let volume = |name: &str| Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity(settings.workspace_size_limit.clone())),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    };
    Ok(PodSpec {
        restart_policy: Some("Never".to_owned()),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        service_account_name: Some(settings.service_account.clone()),
        security_context: Some(pod_security),
        containers: vec![container],
        volumes: Some(vec![volume("workspace"), volume("state"), volume("tmp")]),
        node_selector: (!settings.node_selector.is_empty()).then(|| settings.node_selector.clone()),
        tolerations: (!tolerations.is_empty()).then_some(tolerations),
        runtime_class_name: settings.runtime_class.clone(),
        image_pull_secrets: (!settings.image_pull_secrets.is_empty()).then(|| {
            settings
                .image_pull_secrets
                .iter()
                .map(|s| LocalObjectReference { name: s.clone() })
                .collect()
        }),
        ..PodSpec::default()
    })
}

/// The container's requests and limits: the task's, else the defaults from
/// the settings, never above `max_resources`.
///
/// Where a default meets a task value that it contradicts, the task wins: a
/// task request above the default limit raises the limit to the request, and
/// a task limit below the default request lowers the request to the limit.
/// Ephemeral storage comes from the settings only (tasks cannot set it).
pub fn resources(
    task: &Task,
    settings: &KubernetesSettings,
) -> Result<ResourceRequirements, BuildError> {
    resources_for(&task.sandbox.resources, settings)
}

/// [`resources`] for any sandbox's requested resources (a session's too).
pub fn resources_for(
    r: &sandfleet_proto::Resources,
    settings: &KubernetesSettings,
) -> Result<ResourceRequirements, BuildError> {
    let d = &settings.default_resources;
    let m = &settings.max_resources;
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for (resource, field, (task_req, task_lim), (def_req, def_lim), max) in [
        (
            "cpu",
            "cpu",
            (&r.cpu_request, &r.cpu_limit),
            (&d.cpu_request, &d.cpu_limit),
            &m.cpu,
        ),
        (
            "memory",
            "memory",
            (&r.memory_request, &r.memory_limit),
            (&d.memory_request, &d.memory_limit),
            &m.memory,
        ),
        (
            "ephemeral-storage",
            "ephemeral_storage",
            (&None, &None),
            (&d.ephemeral_storage_request, &d.ephemeral_storage_limit),
            &None,
        ),
    ] {
        let max = match max {
            Some(v) => Some((v, parse(v, "max")?)),
            None => None,
        };
        let task_value = |kind: &'static str, v: &Option<String>| {
            let Some(v) = v else { return Ok(None) };
            let field: &'static str = match (field, kind) {
                ("cpu", "request") => "cpu_request",
                ("cpu", _) => "cpu_limit",
                ("memory", "request") => "memory_request",
                _ => "memory_limit",
            };
            let q = parse(v, field)?;
            if let Some((max_text, max)) = &max
                && q > *max
            {
                return Err(BuildError::Quantity {
                    field,
                    message: format!(
                        "{v:?} is above the most a sandbox may get here, {max_text} \
                         (sandbox.kubernetes.max_resources.{resource})"
                    ),
                });
            }
            Ok(Some((v.clone(), q)))
        };
        let task_req = task_value("request", task_req)?;
        let task_lim = task_value("limit", task_lim)?;
        let default = |v: &Option<String>| -> Result<Option<(String, f64)>, BuildError> {
            match v {
                Some(v) => Ok(Some((v.clone(), parse(v, "default")?))),
                None => Ok(None),
            }
        };
        let mut request = task_req.clone().or(default(def_req)?);
        let mut limit = task_lim.clone().or(default(def_lim)?);
        if let (Some((_, rq)), Some((_, lq))) = (&request, &limit)
            && rq > lq
        {
            match (&task_req, &task_lim) {
                (Some(_), None) => limit = request.clone(),
                (None, Some(_)) => request = limit.clone(),
                // Both the task's (validation refuses that) or both defaults
                // (the settings refuse that): leave it to the API server.
                _ => {}
            }
        }
        if let Some((v, _)) = request {
            requests.insert(resource.to_owned(), Quantity(v));
        }
        if let Some((v, _)) = limit {
            limits.insert(resource.to_owned(), Quantity(v));
        }
    }
    Ok(ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    })
}

fn parse(v: &str, field: &'static str) -> Result<f64, BuildError> {
    sandfleet_proto::quantity::Quantity::parse(v)
        .map(|q| q.0)
        .map_err(|e| BuildError::Quantity {
            field,
            message: e.to_string(),
        })
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
