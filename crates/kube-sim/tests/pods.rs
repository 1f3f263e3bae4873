//! The simulated kubelet: scripted pod fates, retries, deadlines, the sandbox env
//! contract (emptyDir / termination-message remapping) and pod logs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{NS, client, condition, eventually, finished, shell_job, start};
use futures::{AsyncBufReadExt as _, TryStreamExt as _};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use kube::api::{Api, ListParams, LogParams, PostParams};
use sandfleet_kube_sim::{KubeSim, PodScript};
use serde_json::json;

async fn pods_of(pods: &Api<Pod>, job: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .unwrap()
        .items
}

fn terminated(pod: &Pod) -> Option<ContainerStateTerminated> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .clone()
}

async fn setup() -> (KubeSim, Api<Job>, Api<Pod>) {
    let sim = start().await;
    let c = client(&sim).await;
    (sim, Api::namespaced(c.clone(), NS), Api::namespaced(c, NS))
}

#[tokio::test]
async fn oom_kill_fails_the_job_with_137() {
    let (sim, jobs, pods) = setup().await;
    sim.script_pods("job-name=oom", PodScript::OomKill);
    jobs.create(&PostParams::default(), &shell_job("oom", "sleep 60"))
        .await
        .unwrap();
    let job = finished(&jobs, "oom").await;
    assert_eq!(
        condition(&job, "Failed").unwrap().1.as_deref(),
        Some("BackoffLimitExceeded")
    );
    let t = terminated(&pods_of(&pods, "oom").await[0]).unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (137, Some("OOMKilled")));
}

#[tokio::test]
async fn eviction_marks_the_pod_evicted_with_disruption_target() {
    let (sim, jobs, pods) = setup().await;
    sim.script_pods(
        "job-name=ev",
        PodScript::Evict {
            after: Duration::from_millis(100),
        },
    );
    jobs.create(&PostParams::default(), &shell_job("ev", "sleep 60"))
        .await
        .unwrap();
    finished(&jobs, "ev").await;
    let pod = pods_of(&pods, "ev").await.remove(0);
    let status = pod.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    assert_eq!(status.reason.as_deref(), Some("Evicted"));
    let dt = status
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "DisruptionTarget")
        .unwrap();
    assert_eq!(dt.status, "True");
}

#[tokio::test]
async fn node_loss_fails_and_deletes_the_pod_then_retries() {
    let (sim, jobs, pods) = setup().await;
    let mut job = shell_job("nl", "sleep 60");
    job.spec.as_mut().unwrap().backoff_limit = Some(1);
    sim.script_pods(
        "job-name=nl",
        PodScript::NodeLost {
            after: Duration::from_millis(100),
        },
    );
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let job = finished(&jobs, "nl").await;
    assert_eq!(
        job.status.as_ref().unwrap().failed,
        Some(2),
        "a replacement pod ran and was lost too"
    );
    // Lost pods are deleted once counted.
    eventually(15, "lost pods to be removed", || async {
        pods_of(&pods, "nl").await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn image_pull_backoff_never_finishes_and_logs_are_refused() {
    let (sim, jobs, pods) = setup().await;
    let mut job = shell_job("img", "true");
    job.spec
        .as_mut()
        .unwrap()
        .template
        .metadata
        .as_mut()
        .unwrap()
        .annotations = Some(
        [(
            "kube-sim.sandfleet.dev/script".to_owned(),
            "image-pull-backoff".to_owned(),
        )]
        .into(),
    );
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let pod = eventually(15, "ImagePullBackOff", || async {
        let p = pods_of(&pods, "img").await.into_iter().next()?;
        let waiting = p.status.as_ref()?.container_statuses.as_ref()?[0]
            .state
            .as_ref()?
            .waiting
            .clone()?;
        (waiting.reason.as_deref() == Some("ImagePullBackOff")).then_some(p)
    })
    .await;
    let name = pod.metadata.name.unwrap();
    let err = pods.logs(&name, &LogParams::default()).await.unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 400);
            assert!(s.message.contains("is waiting to start"), "{}", s.message);
        }
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let j = jobs.get("img").await.unwrap();
    assert!(condition(&j, "Failed").is_none() && condition(&j, "Complete").is_none());
    drop(sim);
}

#[tokio::test]
async fn never_schedule_stays_pending_unschedulable() {
    let (sim, jobs, pods) = setup().await;
    sim.script_pods("job-name=ns1", PodScript::NeverSchedule);
    jobs.create(&PostParams::default(), &shell_job("ns1", "true"))
        .await
        .unwrap();
    eventually(15, "Unschedulable", || async {
        let p = pods_of(&pods, "ns1").await.into_iter().next()?;
        let st = p.status?;
        let c = st
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "PodScheduled")?;
        (st.phase.as_deref() == Some("Pending")
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable"))
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn backoff_limit_recreates_pods_until_exhausted() {
    let (_sim, jobs, pods) = setup().await;
    let mut job = shell_job("retry", "echo attempt; exit 1");
    job.spec.as_mut().unwrap().backoff_limit = Some(2);
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let job = finished(&jobs, "retry").await;
    assert_eq!(job.status.as_ref().unwrap().failed, Some(3));
    assert_eq!(pods_of(&pods, "retry").await.len(), 3);
}

#[tokio::test]
async fn active_deadline_kills_the_process() {
    let (_sim, jobs, pods) = setup().await;
    let mut job = shell_job("slow", "sleep 30");
    job.spec.as_mut().unwrap().active_deadline_seconds = Some(1);
    let started = std::time::Instant::now();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let job = finished(&jobs, "slow").await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        condition(&job, "Failed").unwrap().1.as_deref(),
        Some("DeadlineExceeded")
    );
    assert_eq!(
        condition(&job, "FailureTarget").unwrap().1.as_deref(),
        Some("DeadlineExceeded")
    );
    // The controller deleted the running pod; the kubelet killed its process.
    assert_eq!(job.status.as_ref().unwrap().failed, Some(1));
    eventually(15, "deadline pod removed", || async {
        pods_of(&pods, "slow").await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn sandbox_contract_env_mounts_and_termination_message() {
    let (sim, jobs, pods) = setup().await;
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "contract"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "volumes": [{"name": "ws", "emptyDir": {}}],
            "containers": [{
                "name": "main",
                "image": "busybox:1.36",
                "workingDir": "/workspace",
                "command": ["sh", "-c",
                    "echo data > \"$SANDFLEET_WORKSPACE/f\"; cat f; \
                     echo \"pod=$POD task=$TASK\"; printf summary > \"$SANDFLEET_TERMINATION_LOG\""],
                "env": [
                    {"name": "SANDFLEET_WORKSPACE", "value": "/workspace"},
                    {"name": "SANDFLEET_TERMINATION_LOG", "value": "/dev/termination-log"},
                    {"name": "TASK", "value": "t-1"},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                ],
                "volumeMounts": [{"name": "ws", "mountPath": "/workspace"}],
            }],
        }}},
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let j = finished(&jobs, "contract").await;
    assert!(condition(&j, "Complete").is_some(), "{:?}", j.status);
    let pod = pods_of(&pods, "contract").await.remove(0);
    let name = pod.metadata.name.clone().unwrap();
    let t = terminated(&pod).unwrap();
    assert_eq!(t.message.as_deref(), Some("summary"));
    let log = pods.logs(&name, &LogParams::default()).await.unwrap();
    assert_eq!(log, format!("data\npod={name} task=t-1\n"));
    assert_eq!(sim.pod_log(NS, &name).as_deref(), Some(log.as_str()));

    // tailLines and limitBytes.
    let tail = pods
        .logs(
            &name,
            &LogParams {
                tail_lines: Some(1),
                ..LogParams::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(tail, format!("pod={name} task=t-1\n"));
    let limited = pods
        .logs(
            &name,
            &LogParams {
                limit_bytes: Some(3),
                ..LogParams::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(limited, "dat");
}

#[tokio::test]
async fn termination_message_is_capped_at_4096_bytes() {
    let (_sim, jobs, pods) = setup().await;
    let mut job = shell_job("bigmsg", "head -c 10000 /dev/zero | tr '\\0' x > \"$TL\"");
    job.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .env = Some(vec![
        serde_json::from_value(json!({"name": "TL", "value": "/dev/termination-log"})).unwrap(),
    ]);
    jobs.create(&PostParams::default(), &job).await.unwrap();
    finished(&jobs, "bigmsg").await;
    let t = terminated(&pods_of(&pods, "bigmsg").await[0]).unwrap();
    assert_eq!(t.message.unwrap().len(), 4096);
}

#[tokio::test]
async fn follow_streams_log_lines_until_the_container_exits() {
    let (_sim, jobs, pods) = setup().await;
    jobs.create(
        &PostParams::default(),
        &shell_job("follow", "for i in 1 2 3; do echo line$i; sleep 0.1; done"),
    )
    .await
    .unwrap();
    let pod = eventually(15, "pod running", || async {
        let p = pods_of(&pods, "follow").await.into_iter().next()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(p)
    })
    .await;
    let lines: Vec<String> = pods
        .log_stream(
            &pod.metadata.name.unwrap(),
            &LogParams {
                follow: true,
                ..LogParams::default()
            },
        )
        .await
        .unwrap()
        .lines()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(lines, ["line1", "line2", "line3"]);
}

/// stdout and stderr reach the log in the order the container wrote them,
/// as a runtime's one log file keeps them.
#[tokio::test]
async fn the_log_keeps_stdout_and_stderr_in_write_order() {
    let (_sim, jobs, pods) = setup().await;
    let script = "for i in 1 2 3 4 5 6; do echo out$i; echo err$i >&2; done";
    jobs.create(&PostParams::default(), &shell_job("order", script))
        .await
        .unwrap();
    finished(&jobs, "order").await;
    let pod = pods_of(&pods, "order").await.remove(0);
    let log = pods
        .logs(&pod.metadata.name.unwrap(), &LogParams::default())
        .await
        .unwrap();
    let expected: String = (1..=6).map(|i| format!("out{i}\nerr{i}\n")).collect();
    assert_eq!(log, expected);
}

#[tokio::test]
async fn instant_script_needs_no_process() {
    let (sim, jobs, pods) = setup().await;
    sim.script_pods("", PodScript::Instant { exit_code: 0 });
    jobs.create(&PostParams::default(), &shell_job("inst", "exit 9"))
        .await
        .unwrap();
    let j = finished(&jobs, "inst").await;
    assert!(condition(&j, "Complete").is_some());
    let t = terminated(&pods_of(&pods, "inst").await[0]).unwrap();
    assert_eq!(t.exit_code, 0);
}

#[tokio::test]
async fn on_failure_restarts_in_place_and_keeps_the_previous_log() {
    let (_sim, jobs, pods) = setup().await;
    // First run fails, the restarted container (same pod, same $HOME) keeps running.
    let mut job = shell_job(
        "onf",
        "if [ -f \"$HOME/once\" ]; then echo second; sleep 30; \
         else touch \"$HOME/once\"; echo first; exit 2; fi",
    );
    let spec = job.spec.as_mut().unwrap();
    spec.backoff_limit = Some(3);
    spec.template.spec.as_mut().unwrap().restart_policy = Some("OnFailure".into());
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let pod = eventually(20, "restarted and running", || async {
        let p = pods_of(&pods, "onf").await.into_iter().next()?;
        let cs = p.status.as_ref()?.container_statuses.as_ref()?[0].clone();
        (cs.restart_count == 1 && cs.state.as_ref()?.running.is_some()).then_some(p)
    })
    .await;
    assert_eq!(pods_of(&pods, "onf").await.len(), 1, "restarted in place");
    let name = pod.metadata.name.unwrap();
    let last = pod.status.unwrap().container_statuses.unwrap()[0]
        .last_state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(last.exit_code, 2);
    let prev = pods
        .logs(
            &name,
            &LogParams {
                previous: true,
                ..LogParams::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(prev, "first\n");
    let current = eventually(15, "second log", || async {
        let l = pods.logs(&name, &LogParams::default()).await.ok()?;
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(current, "second\n");
}

#[tokio::test]
async fn hanging_pod_runs_until_deleted_and_its_log_goes_with_it() {
    let (sim, jobs, pods) = setup().await;
    sim.script_pods("job-name=hang", PodScript::Hang);
    jobs.create(&PostParams::default(), &shell_job("hang", "true"))
        .await
        .unwrap();
    let pod = eventually(15, "running", || async {
        let p = pods_of(&pods, "hang").await.into_iter().next()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(p)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let name = pod.metadata.name.unwrap();
    assert_eq!(
        pods.get(&name)
            .await
            .unwrap()
            .status
            .unwrap()
            .phase
            .as_deref(),
        Some("Running")
    );
    jobs.delete("hang", &kube::api::DeleteParams::background())
        .await
        .unwrap();
    eventually(20, "pod gone", || async {
        pods.get_opt(&name).await.unwrap().is_none().then_some(())
    })
    .await;
    match pods.logs(&name, &LogParams::default()).await.unwrap_err() {
        kube::Error::Api(s) => assert_eq!(s.code, 404),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn start_error_when_the_command_does_not_exist() {
    let (_sim, jobs, pods) = setup().await;
    let mut job = shell_job("noexe", "true");
    job.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .command = Some(vec!["/definitely/not/here".into()]);
    jobs.create(&PostParams::default(), &job).await.unwrap();
    finished(&jobs, "noexe").await;
    let t = terminated(&pods_of(&pods, "noexe").await[0]).unwrap();
    assert_eq!(
        (t.exit_code, t.reason.as_deref()),
        (128, Some("StartError"))
    );
}
