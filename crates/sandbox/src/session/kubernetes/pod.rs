//! The pure builder of a session's Job, and what the backend reads off Jobs
//! and Pods. The pod is the hardened sandbox pod of task Jobs
//! ([`crate::job::sandbox_pod_spec`], with the same default and maximum
//! resources), running the idle loop instead of a script.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{EnvVar, Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sandfleet_settings::KubernetesSettings;

use super::SessionMeta;
use crate::job::{self, BuildError, LABEL_JOB, LABEL_MANAGED_BY, STATE_PATH, WORKSPACE_PATH};
use crate::session::SessionSpec;
use crate::session::script;

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

/// The pod volume mounted at [`STATE_PATH`].
const STATE_VOLUME: &str = "state";

/// The size limit of a session's state dir (in memory, see [`session_job`]).
const STATE_SIZE_LIMIT: &str = "16Mi";

/// The idle loop exits on TERM at once: a short grace is plenty.
const TERMINATION_GRACE_SECS: i64 = 5;

/// Kubernetes expands `$(VAR)` in env values and in a container's command
/// and args, and turns `$$` into `$`; doubling `$` keeps a text as given.
fn escape(value: &str) -> String {
    value.replace('$', "$$")
}

/// The session pod's command: the idle loop ([`script::idle_argv`]),
/// escaped for Kubernetes. Left as written, the loop's `"$$"` (its own pid,
/// which it leaves in `watchdog`) would reach the shell as `"$"`: no run
/// wrapper could find the loop alive, and every command would pay for a
/// watchdog of its own.
pub fn idle_command() -> Vec<String> {
    script::idle_argv().iter().map(|a| escape(a)).collect()
}

/// Gives a session's container a stdin that stays open for its whole life
/// (`stdin: true`; `stdinOnce` unset, so detaching never closes it). A pool
/// member's idle loop reads its claim's values from it: a claimer writes
/// them through `pods/attach`, which starts no process in the sandbox, where
/// an exec starts a shell.
pub fn open_stdin(job: &mut Job) {
    let containers = job
        .spec
        .iter_mut()
        .flat_map(|s| s.template.spec.iter_mut())
        .flat_map(|p| p.containers.iter_mut());
    for c in containers {
        c.stdin = Some(true);
    }
}

/// The Job of session `name`.
pub fn session_job(
    name: &str,
    spec: &SessionSpec,
    meta: &SessionMeta,
    settings: &KubernetesSettings,
) -> Result<Job, BuildError> {
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

    let var = |name: &str, value: String| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        ..EnvVar::default()
    };
    let mut env = vec![
        var("SANDFLEET_STATE_DIR", STATE_PATH.to_owned()),
        var(
            "SANDFLEET_IDLE_SECS",
            spec.idle_timeout.as_secs().max(1).to_string(),
        ),
        var("HOME", WORKSPACE_PATH.to_owned()),
    ];
    env.extend(spec.env.iter().map(|(k, v)| var(k, escape(v))));

    let command = idle_command();
    let resources = job::resources_for(&spec.resources, settings)?;
    let mut pod_spec = job::sandbox_pod_spec(&spec.image, command, env, resources, settings)?;
    pod_spec.termination_grace_period_seconds = Some(TERMINATION_GRACE_SECS);
    // A session's state dir holds only small files (activity markers, a
    // claimed member's env) that every operation writes: in memory, they
    // cost no disk writes on the node.
    for v in pod_spec.volumes.iter_mut().flatten() {
        if let (true, Some(d)) = (v.name == STATE_VOLUME, v.empty_dir.as_mut()) {
            d.medium = Some("Memory".to_owned());
            d.size_limit = Some(Quantity(STATE_SIZE_LIMIT.to_owned()));
        }
    }

    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            completions: Some(1),
            parallelism: Some(1),
            // The max lifetime: the Job controller ends the pod.
            active_deadline_seconds: Some(
                i64::try_from(spec.max_lifetime.as_secs().max(1)).unwrap_or(i64::MAX),
            ),
            ttl_seconds_after_finished: Some(settings.ttl_seconds_after_finished),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
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

    use serde_json::{Value, json};

    fn pod_spec_json(job: &Job) -> Value {
        serde_json::to_value(&job.spec.as_ref().unwrap().template.spec).unwrap()
    }

    #[test]
    fn session_pods_are_hardened_like_task_pods() {
        let settings = KubernetesSettings::default();
        let task = sandfleet_proto::Task::fix_attempt(
            sandfleet_proto::Source {
                provider: sandfleet_proto::Provider::Api,
                repository: "octo/repo".into(),
                commit: "0".repeat(40),
                git_ref: None,
                ci_run_id: None,
                pull_request: None,
                url: None,
            },
            sandfleet_proto::SandboxSpec {
                image: "alpine:3.20".into(),
                resources: Default::default(),
                env: Default::default(),
                deadline_secs: 60,
                pending_timeout_secs: 60,
            },
        )
        .with_step("t", "true", 5);
        let ctx = crate::RunContext::default();
        let task_job = crate::job::build(&task, 1, &ctx, &settings).unwrap();
        let session = session_job(
            "ss-x",
            &SessionSpec::new("alpine:3.20"),
            &SessionMeta::default(),
            &settings,
        )
        .unwrap();
        let (mut t, s) = (pod_spec_json(&task_job), pod_spec_json(&session));
        // The one difference: the session's state dir is in memory.
        let state = t["volumes"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|v| v["name"] == STATE_VOLUME)
            .unwrap();
        state["emptyDir"] = json!({"medium": "Memory", "sizeLimit": STATE_SIZE_LIMIT});
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
        for key in ["securityContext", "volumeMounts", "workingDir", "resources"] {
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
        let command: Vec<String> = c["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().replace("$$", "$"))
            .collect();
        assert_eq!(
            command,
            script::idle_argv(),
            "the pod's command is the constant idle loop, escaped as Kubernetes expects"
        );
        assert!(
            c["command"][4]
                .as_str()
                .unwrap()
                .contains(r#""$$$$" >"$$s/watchdog""#),
            "the loop's own pid survives Kubernetes' `$$` expansion"
        );
        let spec_json = serde_json::to_value(job.spec.as_ref().unwrap()).unwrap();
        assert_eq!(spec_json["activeDeadlineSeconds"], 3600);
        assert!(!is_session(&Job::default()));
        assert!(is_session(&job));
    }
}
