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

/// A pool member as its pod starts it: the launcher's loop, with a pipe for
/// its stdin (`stdin: true`) and its stdout read line by line, in working
/// dir `work`.
struct Member {
    child: Child,
    stdin: std::process::ChildStdin,
    answers: std::sync::mpsc::Receiver<String>,
    state: tempfile::TempDir,
    work: tempfile::TempDir,
}

impl Member {
    fn start(argv: &[String]) -> Member {
        use std::io::BufRead as _;
        let state = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir(work.path())
            .env("SANDFLEET_STATE_DIR", state.path())
            .env("SANDFLEET_IDLE_SECS", "60")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, answers) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !state.path().join("watchdog").exists() {
            assert!(Instant::now() < deadline, "the loop did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Member {
            child,
            stdin,
            answers,
            state,
            work,
        }
    }

    /// Writes `message` and returns the loop's answer to `nonce`, and how
    /// long it took.
    fn hand_over(&mut self, message: &str, nonce: &str) -> (String, Duration) {
        use std::io::Write as _;
        let sent = Instant::now();
        self.stdin.write_all(message.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
        let tag = format!("sandfleet-claim {nonce} ");
        loop {
            let line = self
                .answers
                .recv_timeout(Duration::from_secs(10))
                .expect("the loop answers a hand-over");
            if let Some(answer) = line.strip_prefix(&tag) {
                return (answer.to_owned(), sent.elapsed());
            }
        }
    }

    /// What the readiness probe prints in this sandbox.
    fn probe(&self) -> String {
        probe(self.state.path())
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn probe(state: &std::path::Path) -> String {
    let argv = sandfleet_sandbox::session::script::prepare_argv(".");
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(work.path())
        .env("SANDFLEET_STATE_DIR", state)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A member's loop takes its claim from its stdin: the session's env (quotes,
/// `$(...)`, backticks and a newline kept literal), working dir, idle timeout
/// and lifetime land in its state dir with no process started, the loop
/// answers at once (not at its next second), and a second claim is refused.
#[test]
fn a_member_loop_takes_its_claim_from_stdin_and_serves_one_session() {
    use sandfleet_sandbox::session::script::{env_file, handover_message};
    let mut m = Member::start(&idle_argv());
    assert_eq!(m.probe(), "stdin");
    let env = std::collections::BTreeMap::from([
        ("A".to_owned(), "x y".to_owned()),
        (
            "Q".to_owned(),
            "it's $(echo no) `echo no`\nline 2".to_owned(),
        ),
    ]);
    let env = env_file(&env);
    let message = handover_message(
        "n1",
        "src/app",
        Duration::from_secs(30),
        Duration::from_secs(600),
        &env,
    )
    .unwrap();
    let (answer, took) = m.hand_over(&message, "n1");
    assert_eq!(answer, "ok");
    assert!(took < Duration::from_millis(900), "answered after {took:?}");
    let state = m.state.path();
    assert_eq!(
        std::fs::read_to_string(state.join("session.env")).unwrap(),
        env
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(state.join("session.env"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(state.join("idle")).unwrap(), "30\n");
    assert_eq!(
        std::fs::read_to_string(state.join("lifetime")).unwrap(),
        "600\n"
    );
    assert!(state.join("claimed").exists());
    assert!(m.work.path().join("src/app").is_dir());
    // The run wrapper sources what the loop wrote.
    let argv = run_argv(".", "printf '%s|%s' \"$A\" \"$Q\"", Duration::from_secs(10));
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(m.work.path())
        .env("SANDFLEET_STATE_DIR", state)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "x y|it's $(echo no) `echo no`\nline 2"
    );
    // One session per member, whichever way the second claim comes.
    let again = handover_message(
        "n2",
        ".",
        Duration::from_secs(1),
        Duration::from_secs(1),
        "",
    )
    .unwrap();
    assert_eq!(m.hand_over(&again, "n2").0, "refused");
    // A malformed header is answered, not obeyed.
    assert_eq!(m.hand_over("sandfleet-claim n3 x 1 0\n.\n", "n3").0, "bad");
}

/// The readiness probe tells a promoter how a sandbox takes its claim: a
/// loop under bash with a pipe for stdin reads it; one under dash (no
/// `read -t`), or with no stdin, takes the claim exec; before the loop runs,
/// the probe says so.
#[test]
fn the_probe_says_how_the_sandbox_takes_a_claim() {
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(probe(empty.path()), "starting");
    assert_eq!(Member::start(&idle_argv()).probe(), "stdin");
    assert_eq!(Member::start(&loop_under("dash")).probe(), "exec");
    assert_eq!(probe(idle_loop().state.path()), "exec");
}

/// A loop whose stdin ends (a runtime that closes it) goes back to waiting
/// its seconds: it neither spins on the closed pipe nor counts its idle
/// time faster.
#[test]
fn a_member_loop_whose_stdin_closes_keeps_its_pace() {
    let state = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let argv = idle_argv();
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .env("SANDFLEET_STATE_DIR", state.path())
        .env("SANDFLEET_IDLE_SECS", "2")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    let took = started.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took >= Duration::from_millis(2_800) && took < Duration::from_secs(6),
        "an idle timeout of 2 s ended the loop after {took:?}"
    );
}

/// A hand-over that reaches the loop in pieces (an attach sends stdin in
/// frames) is read whole, even when the loop's second ends between them.
#[test]
fn a_hand_over_split_across_the_loops_second_is_read_whole() {
    use std::io::Write as _;
    let mut m = Member::start(&idle_argv());
    let message = sandfleet_sandbox::session::script::handover_message(
        "n5",
        "x",
        Duration::from_secs(30),
        Duration::from_secs(60),
        "export A='1'\n",
    )
    .unwrap();
    let (head, rest) = message.split_at(20);
    m.stdin.write_all(head.as_bytes()).unwrap();
    m.stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(m.hand_over(rest, "n5").0, "ok");
    assert_eq!(
        std::fs::read_to_string(m.state.path().join("session.env")).unwrap(),
        "export A='1'\n"
    );
}
