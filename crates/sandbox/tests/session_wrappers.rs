//! The session wrappers run directly under `/bin/sh`, beside a running idle
//! loop: the run wrapper takes the loop for its watchdog both when it leads
//! a process group of its own (it becomes the command) and when it does not
//! (the command gets a session of its own and the wrapper waits). The loop
//! runs as a pod starts it (under bash, which this machine has) unless a
//! test names its shell.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sandfleet_sandbox::session::SessionSpec;
use sandfleet_sandbox::session::script::{IDLE_LOOP, idle_argv, run_argv};

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

/// The loop as a pod starts it.
fn idle_loop() -> Loop {
    idle_loop_with(&idle_argv(), &[])
}

/// The loop from `argv`, with `env` besides its own, running until killed.
fn idle_loop_with(argv: &[String], env: &[(&str, &str)]) -> Loop {
    let state = tempfile::tempdir().unwrap();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("SANDFLEET_STATE_DIR", state.path())
        .env("SANDFLEET_IDLE_SECS", "60")
        .envs(env.iter().copied())
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

/// `shell -c IDLE_LOOP`, as the shell's own argv.
fn loop_under(shell: &str) -> Vec<String> {
    let mut argv: Vec<String> = shell.split(' ').map(str::to_owned).collect();
    argv.extend(["-c".into(), IDLE_LOOP.into(), "sandfleet-session".into()]);
    argv
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

/// A `sleep` first on `PATH` that notes every call in `log`; without
/// `system`, the `PATH` has only it and the loop's other tools (`mkfifo`,
/// `rm`): an image without bash.
fn counting_sleep(dir: &std::path::Path, log: &std::path::Path, system: bool) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let sleep = bin.join("sleep");
    std::fs::write(
        &sleep,
        format!(
            "#!/bin/sh\necho \"$@\" >>'{}'\nexec /bin/sleep \"$@\"\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&sleep, std::fs::Permissions::from_mode(0o755)).unwrap();
    if !system {
        for tool in ["mkfifo", "rm"] {
            std::os::unix::fs::symlink(format!("/usr/bin/{tool}"), bin.join(tool)).unwrap();
        }
        return bin.display().to_string();
    }
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap())
}

/// Where the shell's `read` has `-t` (bash, busybox ash) the loop waits its
/// seconds without a process of its own; under dash it forks `sleep 1`, as
/// before. Either way an idle sandbox ends after its idle timeout, not
/// before, and the pod's launcher picks bash when the image has it.
#[test]
fn the_idle_loop_forks_no_sleep_where_the_shell_can_wait_by_itself() {
    let launched = idle_argv();
    // (name, argv, the image has bash and the rest of the system, forks sleep)
    let shells: [(&str, Vec<String>, bool, bool); 5] = [
        ("the pod's launcher", launched.clone(), true, false),
        ("the pod's launcher, no bash", launched, false, true),
        ("bash", loop_under("bash"), true, false),
        ("busybox sh", loop_under("busybox sh"), true, false),
        ("dash", loop_under("dash"), true, true),
    ];
    // Side by side: each loop lives three seconds.
    std::thread::scope(|scope| {
        for (name, argv, system, forks_sleep) in shells {
            scope.spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                let state = dir.path().join("state");
                std::fs::create_dir(&state).unwrap();
                let log = dir.path().join("sleeps");
                let path = counting_sleep(dir.path(), &log, system);
                let started = Instant::now();
                let status = Command::new(&argv[0])
                    .args(&argv[1..])
                    .env("PATH", &path)
                    .env("SANDFLEET_STATE_DIR", &state)
                    .env("SANDFLEET_IDLE_SECS", "2")
                    .stdin(Stdio::null())
                    .status()
                    .unwrap_or_else(|e| {
                        panic!("{name}: {e} (scripts/setup.sh installs the shells)")
                    });
                let took = started.elapsed();
                assert!(status.success(), "{name}: {status}");
                // The first second marks the start as activity; two idle seconds follow.
                assert!(
                    took >= Duration::from_millis(2_800) && took < Duration::from_secs(6),
                    "{name}: an idle timeout of 2 s ended the loop after {took:?}"
                );
                let sleeps = std::fs::read_to_string(&log).unwrap_or_default();
                if forks_sleep {
                    assert!(sleeps.lines().count() >= 3, "{name}: {sleeps:?}");
                } else {
                    assert_eq!(sleeps, "", "{name} forked sleep");
                }
            });
        }
    });
}

/// The loop that waits with `sleep` (dash) is a watchdog as good as the one
/// that waits with `read -t`: a command past its deadline is killed.
#[test]
fn the_idle_loop_under_dash_kills_a_command_at_its_deadline() {
    let l = idle_loop_with(&loop_under("dash"), &[]);
    let (code, out, took) = run(&l, true, "echo started; sleep 30", Duration::from_secs(1));
    assert_eq!((code, out.as_str()), (137, "started\n"));
    assert!(took < Duration::from_secs(4), "{took:?}");
}

/// `read -t` returns on a signal: a loop told to stop (the kubelet's
/// SIGTERM) exits at once, not at the end of its second.
#[test]
fn the_idle_loop_stops_at_once_on_sigterm() {
    let mut l = idle_loop();
    // Past the first wait, which tells how the loop waits.
    std::thread::sleep(Duration::from_millis(1_500));
    let pid = rustix::process::Pid::from_child(&l.child);
    let sent = Instant::now();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = l.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "{:?}",
        sent.elapsed()
    );
}
