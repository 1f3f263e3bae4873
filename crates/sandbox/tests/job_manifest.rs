//! The Job manifest, against a committed snapshot; its default and bounded
//! resources, and the kustomize base's LimitRange that mirrors them.
//!
//! After an intended change: `SANDFLEET_BLESS=1 cargo nextest run -p
//! sandfleet-sandbox --test job_manifest` rewrites `tests/snapshots/job.json`;
//! review the diff before committing it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use sandfleet_proto::Task;
use sandfleet_sandbox::RunContext;
use sandfleet_sandbox::job::{self, COMMAND};
use sandfleet_settings::KubernetesSettings;
use serde_json::{Value, json};

fn task() -> Task {
    // The example has a fixed id, so the manifest is deterministic.
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tasks/python-fix-attempt.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn settings() -> KubernetesSettings {
    KubernetesSettings {
        namespace: "sandfleet-sandboxes".into(),
        node_selector: BTreeMap::from([("sandfleet.dev/pool".into(), "sandbox".into())]),
        tolerations: vec![json!({"key": "sandbox", "operator": "Exists", "effect": "NoSchedule"})],
        runtime_class: Some("gvisor".into()),
        image_pull_secrets: vec!["registry-creds".into()],
        ..KubernetesSettings::default()
    }
}

fn ctx() -> RunContext {
    RunContext {
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        worker: "sandfleet-worker-0".into(),
        cancels_read_to: Some(42),
    }
}

fn manifest() -> Value {
    serde_json::to_value(job::build(&task(), 2, &ctx(), &settings()).unwrap()).unwrap()
}

#[test]
fn manifest_matches_the_snapshot() {
    let actual = serde_json::to_string_pretty(&manifest()).unwrap() + "\n";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/job.json");
    if std::env::var_os("SANDFLEET_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with SANDFLEET_BLESS=1 to create it)",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "the Job manifest changed; if intended, rerun with SANDFLEET_BLESS=1 and review the diff of {}",
        path.display()
    );
}

#[test]
fn manifest_is_locked_down() {
    let m = manifest();
    let spec = &m["spec"];
    assert_eq!(
        m["metadata"]["name"],
        "sf-0193a6d29c447e11b8d051f2a3b4c5d6-a2"
    );
    assert_eq!(
        m["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "sandfleet"
    );
    assert_eq!(
        m["metadata"]["annotations"]["sandfleet.dev/task-id"],
        "0193a6d2-9c44-7e11-b8d0-51f2a3b4c5d6"
    );
    // How far the worker had read the cancellations stream.
    assert_eq!(
        m["metadata"]["annotations"]["sandfleet.dev/cancels-read-to"],
        "42"
    );
    assert_eq!(spec["backoffLimit"], 0);
    assert_eq!(spec["activeDeadlineSeconds"], 600 + 300);
    assert_eq!(spec["ttlSecondsAfterFinished"], 600);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(pod["runtimeClassName"], "gvisor");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["resources"]["limits"]["memory"], "512Mi");
    assert_eq!(c["command"], json!(COMMAND));
    assert!(c.get("args").is_none());
    // The command holds no task value; every step command is an env value.
    let env: BTreeMap<String, String> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(env["SANDFLEET_STEP_1_RUN"].starts_with("python3 -m unittest"));
    // `$` is doubled so Kubernetes' $(VAR) expansion leaves values intact.
    assert!(env["SANDFLEET_STEP_1_RUN"].contains("status=$$?"));
    assert!(!env["SANDFLEET_SCRIPT"].contains("unittest"));
    assert_eq!(env["SANDFLEET_WORKSPACE"], "/workspace");
    assert_eq!(env["SANDFLEET_TERMINATION_LOG"], "/dev/termination-log");
}

fn container_resources(task: &Task, settings: &KubernetesSettings) -> Value {
    let job = serde_json::to_value(job::build(task, 1, &ctx(), settings).unwrap()).unwrap();
    job["spec"]["template"]["spec"]["containers"][0]["resources"].clone()
}

#[test]
fn a_task_without_resources_gets_the_default_requests_and_limits() {
    // Like every webhook task: the gateway's template sets no resources.
    let mut t = task();
    t.sandbox.resources = Default::default();
    let r = container_resources(&t, &KubernetesSettings::default());
    assert_eq!(
        r,
        json!({
            "requests": {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "1Gi"},
            "limits": {"cpu": "2", "memory": "2Gi", "ephemeral-storage": "12Gi"},
        }),
        "not a BestEffort pod"
    );
    // Defaults the operator turned off are left out.
    let mut s = KubernetesSettings::default();
    s.default_resources.cpu_limit = None;
    let r = container_resources(&t, &s);
    assert!(r["limits"].get("cpu").is_none(), "{r}");
    assert_eq!(r["requests"]["cpu"], "500m");
}

#[test]
fn task_values_win_over_defaults_and_stay_consistent() {
    let mut t = task();
    t.sandbox.resources = Default::default();
    // A request above the default limit raises the limit with it...
    t.sandbox.resources.memory_request = Some("3Gi".into());
    // ...and a limit below the default request lowers the request.
    t.sandbox.resources.cpu_limit = Some("250m".into());
    let r = container_resources(&t, &KubernetesSettings::default());
    assert_eq!(r["requests"]["memory"], "3Gi");
    assert_eq!(r["limits"]["memory"], "3Gi");
    assert_eq!(r["limits"]["cpu"], "250m");
    assert_eq!(r["requests"]["cpu"], "250m");
    assert_eq!(r["limits"]["ephemeral-storage"], "12Gi");
}

#[test]
fn a_task_above_the_bounds_is_refused_with_the_setting_named() {
    let settings = KubernetesSettings::default();
    for (field, value, key) in [
        ("memory_limit", "64Gi", "max_resources.memory"),
        ("cpu_request", "32", "max_resources.cpu"),
    ] {
        let mut t = task();
        match field {
            "memory_limit" => t.sandbox.resources.memory_limit = Some(value.into()),
            _ => t.sandbox.resources.cpu_request = Some(value.into()),
        }
        let err = job::build(&t, 1, &ctx(), &settings)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("sandbox.resources.{field}: ")),
            "{err}"
        );
        assert!(
            err.contains(value) && err.contains(&format!("sandbox.kubernetes.{key}")),
            "{err}"
        );
    }
    // At the bound is fine.
    let mut t = task();
    t.sandbox.resources.memory_limit = Some("16Gi".into());
    assert!(job::build(&t, 1, &ctx(), &settings).is_ok());
}

#[test]
fn the_limitrange_in_the_kustomize_base_matches_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../k8s/base/sandbox-limitrange.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    let s = KubernetesSettings::default();
    let (d, m) = (&s.default_resources, &s.max_resources);
    let o = |v: &Option<String>| v.clone().unwrap();
    for line in [
        format!(
            "defaultRequest: {{cpu: \"{}\", memory: \"{}\", ephemeral-storage: \"{}\"}}",
            o(&d.cpu_request),
            o(&d.memory_request),
            o(&d.ephemeral_storage_request)
        ),
        format!(
            "default: {{cpu: \"{}\", memory: \"{}\", ephemeral-storage: \"{}\"}}",
            o(&d.cpu_limit),
            o(&d.memory_limit),
            o(&d.ephemeral_storage_limit)
        ),
        format!(
            "max: {{cpu: \"{}\", memory: \"{}\"}}",
            o(&m.cpu),
            o(&m.memory)
        ),
    ] {
        assert!(yaml.contains(&line), "{} lacks {line:?}", path.display());
    }
    assert!(yaml.contains("namespace: sandfleet-sandboxes"));
    let kustomization = std::fs::read_to_string(path.with_file_name("kustomization.yaml")).unwrap();
    assert!(kustomization.contains("- sandbox-limitrange.yaml"));
}

/// Through the executor, against kube-sim: a task above the bounds ends as a
/// rejection that names the key, and no Job is ever created; a task without
/// resources runs with the defaults on its pod.
#[tokio::test]
async fn the_executor_refuses_a_task_above_the_bounds_before_any_api_call() {
    use sandfleet_sandbox::{ApiRetry, ExecError, Executor, KubeApi, KubeExecutor, NoGate};
    let sim = sandfleet_kube_sim::KubeSim::start(sandfleet_kube_sim::SimOptions::default())
        .await
        .unwrap();
    let settings = KubernetesSettings {
        namespace: "sandboxes".into(),
        ..KubernetesSettings::default()
    };
    let api = KubeApi::from_kubeconfig_yaml(
        &sim.kubeconfig_yaml("sandboxes"),
        &settings,
        std::sync::Arc::new(NoGate),
        ApiRetry::default(),
    )
    .await
    .unwrap();
    let exec = KubeExecutor::new(api, settings);
    let mut t = task();
    t.id = uuid::Uuid::now_v7();
    t.sandbox.resources.memory_limit = Some("64Gi".into());
    let err = exec.run(&t, 1, &ctx()).await.unwrap_err();
    let ExecError::Rejected(reason) = &err else {
        panic!("expected a rejection, got {err:?}");
    };
    assert!(
        reason.contains("sandbox.kubernetes.max_resources.memory"),
        "{reason}"
    );
    assert!(!err.is_transient());
    assert!(
        sim.request_log()
            .iter()
            .all(|r| !(r.method == "POST" && r.path.ends_with("/jobs"))),
        "no Job was created"
    );

    let mut plain = task();
    plain.id = uuid::Uuid::now_v7();
    plain.sandbox.resources = Default::default();
    plain.steps.truncate(1);
    plain.steps[0].run = "echo hi".into();
    plain.files.clear();
    plain.artifacts.clear();
    let _ = exec.run(&plain, 1, &ctx()).await.unwrap();
    let created = sim
        .request_log()
        .into_iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/jobs") && r.status == 201)
        .expect("the plain task's Job");
    let resources = created
        .body
        .unwrap()
        .pointer("/spec/template/spec/containers/0/resources")
        .cloned()
        .unwrap();
    assert_eq!(resources["limits"]["memory"], "2Gi", "{resources}");
    assert_eq!(resources["requests"]["ephemeral-storage"], "1Gi");
    sim.stop().await;
}

#[test]
fn under_kueue_the_job_is_created_suspended_with_the_queue_label() {
    // Without a queue: no label, not suspended (the snapshot above).
    let plain = manifest();
    assert!(plain["spec"].get("suspend").is_none());
    assert!(
        plain["metadata"]["labels"]
            .get(job::LABEL_KUEUE_QUEUE)
            .is_none()
    );

    let kueue = KubernetesSettings {
        kueue_queue: Some("sandboxes".into()),
        ..settings()
    };
    let m = serde_json::to_value(job::build(&task(), 2, &ctx(), &kueue).unwrap()).unwrap();
    assert_eq!(m["spec"]["suspend"], true);
    assert_eq!(
        m["metadata"]["labels"][job::LABEL_KUEUE_QUEUE],
        "sandboxes",
        "Kueue reads the queue from the Job's labels"
    );
    // Kueue manages the Job; its pods carry no queue label (a labelled
    // pod would be managed as a plain pod workload of its own).
    assert!(
        m["spec"]["template"]["metadata"]["labels"]
            .get(job::LABEL_KUEUE_QUEUE)
            .is_none()
    );
    // Everything else is the same manifest.
    let (mut a, mut b) = (plain, m);
    a["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove(job::LABEL_KUEUE_QUEUE);
    b["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove(job::LABEL_KUEUE_QUEUE);
    b["spec"].as_object_mut().unwrap().remove("suspend");
    assert_eq!(a, b);
}
