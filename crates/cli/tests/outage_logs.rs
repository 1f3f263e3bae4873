//! A worker that cannot log in (wrong password) retries forever; its log
//! says so once per interval instead of several lines per attempt.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn a_worker_with_wrong_credentials_says_so_once_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!(
        "sf-clitest-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args(["--prefix", &prefix])
        .args([
            "--amqp-url",
            "amqp://guest:wrong-password@127.0.0.1:5672/%2f",
        ])
        .args(["worker", "--http-addr", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        // Retry at least once a second, so the window below sees many attempts.
        .env("SANDFLEET__AMQP__RECONNECT_MAX_DELAY_SECS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // An absence over a window: about ten attempts at one per second or faster
    // (first delays 0.1, 0.2, 0.4, 0.8 s, then 1 s), well inside the 60 s interval.
    let window = Duration::from_secs(8);
    let started = Instant::now();
    while started.elapsed() < window {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the worker keeps retrying"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    let unavailable: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("broker unavailable"))
        .collect();
    assert_eq!(unavailable.len(), 1, "one line per interval:\n{stderr}");
    assert!(
        unavailable[0].contains("ACCESS_REFUSED"),
        "the line says why: {}",
        unavailable[0]
    );
    assert!(
        !stderr.contains("lapin"),
        "no library lines for each attempt:\n{stderr}"
    );
    assert!(
        status.code().is_some(),
        "SIGTERM stops a worker that never connected"
    );
}
