//! The worker's Role (`k8s/base/worker-rbac.yaml`) allows exactly the
//! Kubernetes calls the kubernetes executor makes — no fewer (a call the Role
//! lacks is a 403 in production), no more (least privilege).
//!
//! The executor runs its whole repertoire against kube-sim: a task to its
//! end (create, shared list/watch of Jobs and pods, one log read, delete), an
//! adoption (create → 409 → get), a cancellation (delete) and orphan garbage
//! collection (list, delete). The (verb, resource) pairs the fake API server
//! recorded are then compared with the Role's rules.
//! `scripts/deploy_checks.py rbac` checks the same Role against the rendered
//! overlays and, with `scripts/check-rbac.sh`, against every request of the
//! whole test suite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sandfleet_kube_sim::{KubeSim, PodScript, SimOptions};
use sandfleet_proto::{Outcome, Task};
use sandfleet_sandbox::job::{self, job_name};
use sandfleet_sandbox::{ApiRetry, Executor, KubeApi, KubeExecutor, NoGate, RunContext};
use sandfleet_settings::KubernetesSettings;

const NS: &str = "sandfleet-sandboxes";

/// (API group, resource, verb), as in an RBAC rule.
type Permission = (String, String, String);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The rules of the one Role in `worker-rbac.yaml`.
///
/// A small reader for the file's own shape (flow lists of quoted strings
/// under `rules:`), so the test needs no YAML library; it fails loudly if the
/// file is reformatted beyond it. `scripts/deploy_checks.py` reads the same
/// file with a YAML parser and validates it against the Kubernetes schema.
fn role_permissions(yaml: &str) -> BTreeSet<Permission> {
    let role = yaml
        .split("\n---")
        .find(|doc| doc.lines().any(|l| l.trim() == "kind: Role"))
        .expect("worker-rbac.yaml has a `kind: Role` document");
    let rules = role
        .split_once("\nrules:")
        .expect("the Role has `rules:`")
        .1;
    let list = |line: &str, key: &str| -> Option<Vec<String>> {
        let rest = line.trim().trim_start_matches("- ").strip_prefix(key)?;
        let inner = rest.trim().strip_prefix('[')?.strip_suffix(']')?;
        Some(
            inner
                .split(',')
                .map(|s| s.trim().trim_matches('"').to_owned())
                .collect(),
        )
    };
    let mut perms = BTreeSet::new();
    let (mut groups, mut resources) = (None, None);
    for line in rules.lines().filter(|l| !l.trim_start().starts_with('#')) {
        if let Some(g) = list(line, "apiGroups:") {
            groups = Some(g);
        } else if let Some(r) = list(line, "resources:") {
            resources = Some(r);
        } else if let Some(verbs) = list(line, "verbs:") {
            let (g, r) = (
                groups.take().expect("apiGroups: [...] before verbs"),
                resources.take().expect("resources: [...] before verbs"),
            );
            for group in &g {
                for res in &r {
                    for v in &verbs {
                        perms.insert((group.clone(), res.clone(), v.clone()));
                    }
                }
            }
        } else if !line.trim().is_empty() {
            assert!(
                line.starts_with(' '),
                "unexpected line in the Role's rules (keep `key: [\"a\", \"b\"]` flow lists): {line}"
            );
        }
    }
    assert!(!perms.is_empty(), "no rules read from the Role");
    perms
}

fn task(script: &str) -> Task {
    let path = repo_root().join("examples/tasks/python-fix-attempt.json");
    let mut task: Task = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    task.id = uuid::Uuid::now_v7();
    task.files.clear();
    task.artifacts.clear();
    task.steps.truncate(1);
    task.steps[0].name = "work".into();
    task.steps[0].run = script.into();
    task
}

fn ctx() -> RunContext {
    RunContext {
        traceparent: None,
        worker: "rbac-test".into(),
        cancels_read_to: None,
    }
}

async fn wait_for_pod(sim: &KubeSim, job: &str) {
    for _ in 0..500 {
        if sim
            .pods(NS)
            .iter()
            .any(|p| p["metadata"]["labels"]["sandfleet.dev/job"] == job)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no pod for job {job}");
}

/// Every (group, resource, verb) the executor sent to the API server.
async fn exercise_executor() -> BTreeSet<Permission> {
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let settings = KubernetesSettings {
        namespace: NS.into(),
        gc_interval_secs: 0,
        orphan_max_age_secs: 0,
        ..KubernetesSettings::default()
    };
    let retry = ApiRetry {
        retries: 1,
        base: Duration::from_millis(10),
    };
    let api =
        KubeApi::from_kubeconfig_yaml(&sim.kubeconfig_yaml(NS), &settings, Arc::new(NoGate), retry)
            .await
            .unwrap();
    let exec = KubeExecutor::new(api, settings.clone());

    // A task to its end.
    let done = exec.run(&task("echo ok"), 1, &ctx()).await.unwrap();
    assert_eq!(done.outcome, Outcome::Succeeded, "{done:#?}");

    // Adoption: a previous delivery created the Job.
    let again = task("echo adopted");
    let manifest = job::build(&again, 1, &ctx(), &settings).unwrap();
    exec.api().create_job(&manifest).await.unwrap();
    let adopted = exec.run(&again, 1, &ctx()).await.unwrap();
    assert!(adopted.adopted);

    // Cancellation of a running attempt.
    let hung = task("sleep 60");
    sim.script_pods(
        &format!("sandfleet.dev/task-id={}", hung.id),
        PodScript::Hang,
    );
    let running = {
        let (exec, hung) = (exec.clone(), hung.clone());
        tokio::spawn(async move { exec.run(&hung, 1, &ctx()).await })
    };
    wait_for_pod(&sim, &job_name(hung.id, 1)).await;
    exec.cancel(hung.id, 1).await.unwrap();
    let cancelled = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(cancelled.outcome, Outcome::Cancelled);

    // Orphan garbage collection over a Job no worker is running.
    let orphan = task("echo orphan");
    sim.script_pods(
        &format!("sandfleet.dev/task-id={}", orphan.id),
        PodScript::Instant { exit_code: 0 },
    );
    exec.api()
        .create_job(&job::build(&orphan, 1, &ctx(), &settings).unwrap())
        .await
        .unwrap();
    wait_for_pod(&sim, &job_name(orphan.id, 1)).await;
    for _ in 0..200 {
        if !exec.collect_garbage().await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let observed = sim
        .request_log()
        .iter()
        .filter(|r| !r.verb().is_empty() && !r.resource().is_empty())
        .map(|r| {
            let group = if r.resource().starts_with("jobs") {
                "batch"
            } else {
                ""
            };
            (
                group.to_owned(),
                r.resource().to_owned(),
                r.verb().to_owned(),
            )
        })
        .collect();
    sim.stop().await;
    observed
}

#[tokio::test]
async fn the_worker_role_allows_exactly_the_calls_the_executor_makes() {
    let yaml = std::fs::read_to_string(repo_root().join("k8s/base/worker-rbac.yaml")).unwrap();
    let granted = role_permissions(&yaml);
    let used = exercise_executor().await;

    let missing: Vec<_> = used.difference(&granted).collect();
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(
        missing.is_empty(),
        "the executor calls {missing:?}, which the worker's Role does not allow (a 403 in production); \
         add them to k8s/base/worker-rbac.yaml"
    );
    assert!(
        unused.is_empty(),
        "the worker's Role allows {unused:?}, which the executor never calls; \
         remove them from k8s/base/worker-rbac.yaml (least privilege)"
    );
}

#[test]
fn the_role_reader_reads_every_rule() {
    let yaml = "kind: ServiceAccount\n---\n# c\nkind: Role\nrules:\n  # why\n  - apiGroups: [\"batch\"]\n    \
                resources: [\"jobs\"]\n    verbs: [\"create\", \"get\"]\n  - apiGroups: [\"\"]\n    \
                resources: [\"pods\", \"pods/log\"]\n    verbs: [\"get\"]\n---\nkind: RoleBinding\n";
    let perms = role_permissions(yaml);
    let want: BTreeSet<Permission> = [
        ("batch", "jobs", "create"),
        ("batch", "jobs", "get"),
        ("", "pods", "get"),
        ("", "pods/log", "get"),
    ]
    .into_iter()
    .map(|(g, r, v)| (g.to_owned(), r.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(perms, want);
}
