//! The Kubernetes session backend on kube-sim: the shared scenario over
//! `pods/exec`, the teardown paths, and exec faults.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use sandfleet_kube_sim::{FaultAction, FaultRule, KubeSim, SimOptions};
use sandfleet_sandbox::session::kubernetes::SESSION_PERMISSIONS;
use sandfleet_sandbox::session::{
    KubeSessions, RunOptions, Session, SessionBackend, SessionError, SessionSpec, conformance,
};
use sandfleet_settings::KubernetesSettings;
use tokio::time::Instant;

const NS: &str = "sessions";

async fn env() -> (KubeSim, KubeSessions) {
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let settings = KubernetesSettings {
        namespace: NS.into(),
        ..KubernetesSettings::default()
    };
    let backend = KubeSessions::from_kubeconfig_yaml(&sim.kubeconfig_yaml(NS), settings)
        .await
        .unwrap()
        .with_start_timeout(Duration::from_secs(20));
    (sim, backend)
}

/// Waits (bounded) until `cond` holds.
async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn kube_backend_passes_the_shared_scenario() {
    let (sim, backend) = env().await;
    let mut session = Session::start(Arc::new(backend.clone()), &conformance::spec("alpine:3.20"))
        .await
        .unwrap();
    let transcript = conformance::scenario(&session).await.unwrap();
    assert_eq!(transcript, conformance::expected());

    // Commands went through pods/exec, and every call is one the sessions Role grants.
    let log = sim.request_log();
    assert!(log.iter().any(|r| r.resource() == "pods/exec"));
    for r in log.iter().filter(|r| !r.resource().is_empty()) {
        assert!(
            SESSION_PERMISSIONS
                .iter()
                .any(|(_, res, verb)| *res == r.resource() && *verb == r.verb()),
            "{} {} is not in SESSION_PERMISSIONS",
            r.verb(),
            r.resource()
        );
    }
    assert_eq!(sim.jobs(NS).len(), 1);
    session.teardown().await.unwrap();
    session.teardown().await.unwrap();
    eventually("the session job is gone", Duration::from_secs(10), || {
        sim.jobs(NS).is_empty() && sim.pods(NS).is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_dropped_exec_connection_is_connection_lost_never_an_exit_code() {
    let (sim, backend) = env().await;
    let backend = Arc::new(backend);
    let mut session = Session::start(backend.clone(), &SessionSpec::new("img"))
        .await
        .unwrap();
    let run = session.run("sleep 20; echo done", Duration::from_secs(5));
    let cut = async {
        eventually("the exec stream is open", Duration::from_secs(10), || {
            sim.open_exec_streams() > 0
        })
        .await;
        sim.drop_exec_connections();
    };
    let started = Instant::now();
    let (result, ()) = tokio::join!(run, cut);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "noticed at once, not at a timeout"
    );
    let err = result.unwrap_err();
    assert!(err.is_connection_lost(), "{err}");
    assert!(err.to_string().contains("fate is unknown"), "{err}");
    // The session itself still works.
    let o = session
        .run("echo still here", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(o.stdout, b"still here\n");
    session.teardown().await.unwrap();
}

#[tokio::test]
async fn a_refused_exec_is_an_error_and_the_next_one_works() {
    let (sim, backend) = env().await;
    let mut session = Session::start(Arc::new(backend), &SessionSpec::new("img"))
        .await
        .unwrap();
    for code in [500, 403] {
        sim.faults().inject(
            FaultRule::new(
                "*",
                "/exec",
                FaultAction::Status {
                    code,
                    retry_after_secs: None,
                },
            )
            .times(1),
        );
        let err = session
            .run("true", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, SessionError::Unavailable(_)), "{code}: {err}");
    }
    // A slow upgrade only delays the command.
    sim.faults().inject(
        FaultRule::new("*", "/exec", FaultAction::Delay(Duration::from_millis(300))).times(1),
    );
    let o = session
        .run("echo ok", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!((o.exit_code, o.stdout.as_slice()), (0, &b"ok\n"[..]));
    assert!(o.duration >= Duration::from_millis(300));
    session.teardown().await.unwrap();
}

#[tokio::test]
async fn idle_timeout_and_max_lifetime_end_the_pod_and_reap_deletes_the_job() {
    let (sim, backend) = env().await;
    let mut idle = SessionSpec::new("img");
    idle.idle_timeout = Duration::from_secs(1);
    let mut short = SessionSpec::new("img");
    short.max_lifetime = Duration::from_secs(2);
    let a = backend.start(&idle).await.unwrap();
    let b = backend.start(&short).await.unwrap();
    // Keep `b` busy past its lifetime: the deadline still ends it.
    let busy = backend.run(
        &b,
        "sleep 30",
        RunOptions::new(Duration::from_secs(60)),
        None,
    );
    let busy = tokio::time::timeout(Duration::from_secs(20), busy)
        .await
        .unwrap();
    // The container's end kills the exec'd command, as in a real kubelet.
    assert!(
        busy.is_err() || matches!(&busy, Ok(o) if o.exit_code == 137),
        "{busy:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reaped = backend.reap().await.unwrap();
        let _ = reaped;
        if sim.jobs(NS).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ended sessions were not reaped: {:?}",
            sim.jobs(NS).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in [a, b] {
        let err = backend
            .run(&id, "true", RunOptions::new(Duration::from_secs(1)), None)
            .await
            .unwrap_err();
        assert!(matches!(err, SessionError::NotFound(_)), "{err}");
    }
}

#[tokio::test]
async fn a_dropped_handle_deletes_the_job() {
    let (sim, backend) = env().await;
    let backend = Arc::new(backend);
    let b = backend.clone();
    let joined = tokio::spawn(async move {
        let session = Session::start(b, &SessionSpec::new("img")).await.unwrap();
        session.run("true", Duration::from_secs(5)).await.unwrap();
        panic!("the caller's code panics while holding the session");
    })
    .await;
    assert!(joined.is_err());
    eventually(
        "the dropped session's job is gone",
        Duration::from_secs(10),
        || sim.jobs(NS).is_empty(),
    )
    .await;
}

/// The idle loop the pod runs is every command's watchdog: its pid, written
/// as `"$$"`, survives Kubernetes' `$$` expansion of the pod's command. An
/// exec'd wrapper leads its own process group, so it becomes the command:
/// `running.<pid>` holds the deadline and the command's own pid as its
/// group, and no watchdog subshell, `sleep` or `setsid` of its own run
/// beside it. A command past its timeout is killed by the loop; what a
/// command leaves behind is gone before the next one starts.
#[tokio::test]
async fn the_idle_loop_is_the_watchdog_of_every_command() {
    let (_sim, backend) = env().await;
    let mut session = Session::start(Arc::new(backend), &SessionSpec::new("img"))
        .await
        .unwrap();
    let probe = r#"s=$SANDFLEET_STATE_DIR
read -r w <"$s/watchdog" && kill -0 "$w" && echo "loop $w alive"
echo "pid $$"
cat "$s/running.$$"
if [ -e "$s/sleep.$$" ]; then echo "a watchdog of its own"; fi"#;
    let out = session.run(probe, Duration::from_secs(30)).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        out.exit_code,
        0,
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("loop ") && lines[0].ends_with(" alive"),
        "{text}"
    );
    let pid = lines[1].strip_prefix("pid ").unwrap();
    let fields: Vec<&str> = lines[2].split(' ').collect();
    assert!(
        fields.len() == 3
            && fields[0].bytes().all(|b| b.is_ascii_digit())
            && fields[1] == pid
            && fields[2] == ".",
        "running file of {pid}: {:?}",
        lines[2]
    );

    let started = Instant::now();
    let out = session
        .run("sleep 30 & sleep 30; echo never", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(out.timed_out, "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "killed {:?} after start, the loop ticks every second",
        started.elapsed()
    );

    let out = session
        .run(
            "sleep 30 >/dev/null 2>&1 & echo $! > left.pid",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");
    let out = session
        .run(
            "s=$(sed 's/.*) //' /proc/\"$(cat left.pid)\"/stat 2>/dev/null | cut -c1); \
             case \"$s\" in ''|Z|X) echo gone ;; *) echo alive ;; esac",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "gone\n", "{out:?}");
    session.teardown().await.unwrap();
}
