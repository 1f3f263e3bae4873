//! The session wrappers run directly under `/bin/sh`, beside a running idle
//! loop: the run wrapper takes the loop for its watchdog both when it leads
//! a process group of its own (it becomes the command) and when it does not
//! (the command gets a session of its own and the wrapper waits).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sandfleet_sandbox::session::SessionSpec;
use sandfleet_sandbox::session::script::{IDLE_LOOP, run_argv};

struct Loop {
    child: Child,
    state: tempfile::TempDir,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn idle_loop() -> Loop {
    let state = tempfile::tempdir().unwrap();
    let child = Command::new("/bin/sh")
        .args(["-c", IDLE_LOOP, "sandfleet-session"])
        .env("SANDFLEET_STATE_DIR", state.path())
        .env("SANDFLEET_IDLE_SECS", "60")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state.path().join("watchdog").exists() {
        assert!(Instant::now() < deadline, "the loop did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Loop { child, state }
}

/// Runs `command` through the run wrapper with `timeout`, as its own
/// process group's leader or not; returns the exit code, stdout and time.
fn run(l: &Loop, leader: bool, command: &str, timeout: Duration) -> (i32, String, Duration) {
    let work = tempfile::tempdir().unwrap();
    let argv = run_argv(work.path().to_str().unwrap(), command, timeout);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("SANDFLEET_STATE_DIR", l.state.path())
        .stdin(Stdio::null());
    if leader {
        cmd.process_group(0);
    }
    let started = Instant::now();
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(128 + 9),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn a_group_leader_wrapper_becomes_the_command() {
    let l = idle_loop();
    let (code, out, _) = run(
        &l,
        true,
        "echo \"$$ $PPID\"; exit 3",
        Duration::from_secs(30),
    );
    assert_eq!(code, 3);
    let pid = out.split_whitespace().next().unwrap().to_owned();
    let running = std::fs::read_to_string(l.state.path().join(format!("running.{pid}"))).unwrap();
    let fields: Vec<&str> = running.split_whitespace().collect();
    assert_eq!(
        fields.get(1),
        Some(&pid.as_str()),
        "the command's own group: {running:?}"
    );

    // It sees a fresh `sh -c`'s state, not the wrapper's.
    let (code, fresh, _) = run(
        &l,
        true,
        "echo \"$0 $# ${sf_s:-unset} ${undefined}x\"; read -r line && echo read",
        Duration::from_secs(30),
    );
    assert_eq!((code, fresh.as_str()), (1, "/bin/sh 0 unset x\n"));

    // The loop kills it at its deadline: SIGKILL, a timeout to the caller.
    let (code, out, took) = run(&l, true, "echo started; sleep 30", Duration::from_secs(1));
    assert_eq!((code, out.as_str()), (137, "started\n"));
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[test]
fn a_wrapper_in_another_group_waits_for_the_command_in_a_session_of_its_own() {
    let l = idle_loop();
    let (code, out, _) = run(&l, false, "echo hi; exit 3", Duration::from_secs(30));
    assert_eq!((code, out.as_str()), (3, "hi\n"));
    let (code, out, took) = run(
        &l,
        false,
        "echo started; sleep 30 & sleep 30",
        Duration::from_secs(1),
    );
    assert_eq!((code, out.as_str()), (124, "started\n"));
    assert!(took < Duration::from_secs(4), "{took:?}");
    // No watchdog of its own: nothing but finished `running.*` files.
    let names: Vec<String> = std::fs::read_dir(l.state.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sleep."))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn a_session_env_may_not_name_the_wrappers_variables() {
    let mut spec = SessionSpec::new("img");
    spec.env.insert("sf_s".into(), "x".into());
    let err = spec.validate().unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
}
