//! The long-running commands and signals: the first SIGTERM drains, a second
//! one exits at once (status 130) with a message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, free_addr, http_status, task};

fn spawn(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> Child {
    env.command(args, vars)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn term(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn stderr(child: &mut Child) -> String {
    let mut s = String::new();
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_stops_cleanly_on_sigterm() {
    let env = Env::new().await;
    let addr = free_addr();
    let mut child = spawn(
        &env,
        &["gateway", "--listen", &addr],
        &[("SANDFLEET__GATEWAY__GITHUB_SECRET", "s3cret")],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_status(&addr, "/readyz") != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the gateway never became ready: {}",
            stderr(&mut child)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_status(&addr, "/healthz"), Some(200));
    term(&child);
    let code = wait_exit(&mut child, Duration::from_secs(10));
    let err = stderr(&mut child);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("received SIGTERM; draining"), "{err}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_drains_on_the_first_sigterm_and_exits_at_once_on_the_second() {
    let env = Env::new().await;
    let mut long = task("octo-org/octo-repo");
    long.steps[0].run = "sleep 60".to_owned();
    long.steps[0].timeout_secs = 120;
    let producer = sandfleet_producer::Producer::with_amqp(
        &env.amqp,
        env.topology.clone(),
        sandfleet_proto::Limits::default(),
        false,
    )
    .await
    .unwrap();
    producer.enqueue(&long).await.unwrap();
    let mut child = spawn(&env, &["worker", "--http-addr", "127.0.0.1:0"], &[]);
    // Wait until the worker holds the task (nothing ready in the queue).
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.depth(&env.topology.tasks_queue).await != 0 {
        assert!(Instant::now() < deadline, "the worker never took the task");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    term(&child);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(2)),
        None,
        "the first SIGTERM drains: the 60 s task keeps it alive"
    );
    term(&child);
    let code = wait_exit(&mut child, Duration::from_secs(5));
    let err = stderr(&mut child);
    assert_eq!(code, Some(130), "{err}");
    assert!(
        err.contains("draining") && err.contains("exiting now"),
        "{err}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn results_tail_follow_prints_new_results_until_interrupted() {
    use std::io::BufRead;
    let env = Env::new().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args([
            "--prefix",
            &env.prefix,
            "--json",
            "results",
            "tail",
            "--follow",
            "--from",
            "first",
        ])
        .current_dir(env.dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    // The stream is empty: whatever it prints was published after it started
    // (from `first`, so there is no race with its subscription).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = task("octo-org/octo-repo");
    let r = common::result(
        &t,
        sandfleet_proto::Outcome::Failed,
        true,
        chrono::Utc::now(),
    );
    env.publish_result(&r).await;
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the new result is printed");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["task_id"], t.id.to_string());
    assert_eq!(v["outcome"], "failed");
    assert_eq!(
        wait_exit(&mut child, Duration::from_millis(500)),
        None,
        "--follow keeps going"
    );
    term(&child);
    let code = wait_exit(&mut child, Duration::from_secs(5));
    let err = stderr(&mut child);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("stopping"), "{err}");
    env.cleanup().await;
}
