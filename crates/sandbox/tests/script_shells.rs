//! The generated script, run for real under dash, bash and busybox sh.
//!
//! These shells must be installed (`apt-get install -y dash bash busybox`);
//! a missing one fails the test with that message rather than skipping it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandfleet_proto::{Provider, SandboxSpec, Source, Task};
use sandfleet_sandbox::script::{self, ParsedLog, ScriptOptions, StepStatus, Summary};

const SHELLS: [(&str, &[&str]); 3] = [
    ("dash", &["/bin/dash"]),
    ("bash", &["/bin/bash"]),
    ("busybox", &["/bin/busybox", "sh"]),
];

const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

fn task() -> Task {
    Task::fix_attempt(
        Source {
            provider: Provider::Github,
            repository: "acme/widgets".into(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            git_ref: Some("refs/heads/main".into()),
            ci_run_id: None,
            pull_request: None,
            url: None,
        },
        SandboxSpec {
            image: "alpine:3.20".into(),
            resources: Default::default(),
            env: BTreeMap::from([("GREETING".into(), "hello $(not run) `world`".into())]),
            deadline_secs: 60,
            pending_timeout_secs: 60,
        },
    )
}

const OPTS: ScriptOptions = ScriptOptions {
    step_output_bytes: 1000,
    artifact_bytes: 64,
    kill_grace_secs: 1,
    max_file_bytes: None,
    file_block_bytes: None,
    executor_watchdog: false,
    steps_in_script_shell: false,
    start_on_stdin: false,
    record_script_pid: true,
};

struct Run {
    dir: tempfile::TempDir,
    summary: Summary,
    summary_text: String,
    log: ParsedLog,
    raw_log: String,
    code: Option<i32>,
    elapsed: Duration,
}

impl Run {
    fn ws(&self) -> PathBuf {
        self.dir.path().join("ws")
    }
}

fn shell(argv: &[&str]) -> Command {
    assert!(
        Path::new(argv[0]).is_file(),
        "{} is not installed: the script tests need dash, bash and busybox (apt-get install -y dash bash busybox)",
        argv[0]
    );
    let mut c = Command::new(argv[0]);
    c.args(&argv[1..]);
    c
}

/// Runs the script for `task`; `before_wait` may signal the child.
fn run_with(argv: &[&str], task: &Task, path: &str, before_wait: impl FnOnce(u32, &Path)) -> Run {
    run_opts(argv, task, path, &OPTS, before_wait)
}

fn run_opts(
    argv: &[&str],
    task: &Task,
    path: &str,
    opts: &ScriptOptions,
    before_wait: impl FnOnce(u32, &Path),
) -> Run {
    let script = script::generate(task, 1, opts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    let state = dir.path().join("state");
    let tlog = dir.path().join("termination-log");
    let out = std::fs::File::create(dir.path().join("out")).unwrap();
    let start = Instant::now();
    let mut child = shell(argv)
        .arg("-c")
        .arg(&script.text)
        .env_clear()
        .env("PATH", path)
        .env("HOME", &ws)
        .envs(script.env.iter().map(|(k, v)| (k, v)))
        .env(script::ENV_WORKSPACE, &ws)
        .env(script::ENV_STATE_DIR, &state)
        .env(script::ENV_TERMINATION_LOG, &tlog)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    before_wait(child.id(), &state);
    let status = child.wait().unwrap();
    let elapsed = start.elapsed();
    let summary_text = std::fs::read_to_string(&tlog).unwrap_or_default();
    let raw = std::fs::read(dir.path().join("out")).unwrap();
    Run {
        summary: script::parse_summary(&summary_text),
        summary_text,
        log: script::parse_log(&raw),
        raw_log: String::from_utf8_lossy(&raw).into_owned(),
        code: status.code(),
        elapsed,
        dir,
    }
}

fn run(argv: &[&str], task: &Task) -> Run {
    run_with(argv, task, PATH, |_, _| {})
}

/// Reads the pid a step left in its workspace's `grandchild.pid` and waits
/// for that process to be gone: `when` names what should have killed it.
fn assert_grandchild_gone(r: &Run, name: &str, when: &str) {
    let gc: u32 = std::fs::read_to_string(r.ws().join("grandchild.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(wait_dead(gc), "{name}: grandchild {gc} survived {when}");
}

/// True when the process is gone or a zombie (reaped by nobody in a container).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap();
            state == "Z" || state == "X"
        }
    }
}

fn wait_dead(pid: u32) -> bool {
    for _ in 0..50 {
        if dead(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn files_steps_env_and_exit_codes() {
    let mut t = task()
        .with_file("src/app/config.txt", "line1\n'quoted' $HOME `x`\n")
        .with_file("run.sh", "#!/bin/sh\necho ran-script \"$1\"\n")
        .with_step(
            "check",
            "cat src/app/config.txt && printf '%s\\n' \"$GREETING\" && pwd",
            10,
        )
        .with_step(
            "exec",
            "./run.sh arg && echo \"$STEP_ONLY\" && echo repo=$SANDFLEET_REPOSITORY",
            10,
        )
        .with_step("soft-fail", "echo soft >&2; exit 3", 10)
        .with_step("hard-fail", "echo failing; exit 7", 10)
        .with_step("never", "echo never", 10);
    t.files[1].executable = true;
    t.steps[1]
        .env
        .insert("STEP_ONLY".into(), "only-here; $(id)".into());
    t.steps[2].continue_on_error = true;
    for (name, argv) in SHELLS {
        let r = run(argv, &t);
        assert_eq!(r.code, Some(7), "{name}: {}", r.raw_log);
        let s = &r.summary;
        assert!(s.started, "{name}");
        assert_eq!(s.exit_code, Some(7), "{name}: {}", r.summary_text);
        let codes: Vec<_> = s
            .steps
            .iter()
            .map(|l| (l.index, l.exit_code, l.status))
            .collect();
        assert_eq!(
            codes,
            [
                (0, 0, StepStatus::Ok),
                (1, 0, StepStatus::Ok),
                (2, 3, StepStatus::Fail),
                (3, 7, StepStatus::Fail)
            ],
            "{name}: {}\n{}",
            r.summary_text,
            r.raw_log
        );
        let out0 = &r.log.steps[&0].text;
        assert_eq!(
            out0,
            &format!(
                "line1\n'quoted' $HOME `x`\nhello $(not run) `world`\n{}\n",
                r.ws().display()
            ),
            "{name}"
        );
        assert_eq!(
            r.log.steps[&1].text, "ran-script arg\nonly-here; $(id)\nrepo=acme/widgets\n",
            "{name}"
        );
        assert_eq!(r.log.steps[&2].text, "soft\n", "{name}");
        assert!(
            !r.log.steps.contains_key(&4),
            "{name}: skipped step printed output"
        );
        assert!(
            std::fs::read_to_string(r.ws().join("src/app/config.txt"))
                .unwrap()
                .contains("'quoted'"),
            "{name}"
        );
        // STEP_ONLY is scoped to its step.
        assert!(!r.raw_log.contains("only-here; $(id)\nonly-here"), "{name}");
    }
}

#[test]
fn step_timeout_kills_the_whole_process_tree() {
    // The step's shell starts a grandchild that would outlive a plain kill.
    let t = task()
        .with_step(
            "hang",
            "sleep 300 & echo $! > grandchild.pid; echo started; sleep 300",
            1,
        )
        .with_step("after", "echo after", 5);
    for (name, argv) in SHELLS {
        let r = run(argv, &t);
        assert!(
            r.elapsed < Duration::from_secs(6),
            "{name}: took {:?}",
            r.elapsed
        );
        let line = r.summary.steps[0];
        assert_eq!(
            line.status,
            StepStatus::Timeout,
            "{name}: {}",
            r.summary_text
        );
        assert!(line.duration_ms >= 900, "{name}: {line:?}");
        assert_eq!(
            r.summary.steps.len(),
            1,
            "{name}: the next step must not run"
        );
        assert_eq!(r.log.steps[&0].text, "started\n", "{name}");
        assert_grandchild_gone(&r, name, "the step timeout");
    }
}

#[test]
fn a_step_in_the_script_shell_starts_from_a_fresh_state() {
    // What `/bin/sh -c` would give the step: none of the script's variables
    // and functions, `set -u` off, no positional parameters; exit codes,
    // syntax errors and a timeout killing the step's tree as before.
    let mut t = task()
        .with_step(
            "state",
            "set | grep -c '^sf_' || :; command -v sf_now || echo no-functions; \
             echo \"args=$# ${unset_var}ok\"; echo \"$GREETING\"; echo \"$STEP_ONLY\"",
            10,
        )
        .with_step("exit", "echo before; exit 7; echo after", 10)
        .with_step("syntax", "if then fi", 10)
        .with_step(
            "hang",
            "sleep 300 & echo $! > grandchild.pid; echo started; sleep 300",
            1,
        )
        .with_step("never", "echo never", 5);
    t.steps[0]
        .env
        .insert("STEP_ONLY".into(), "only-here; $(id)".into());
    t.steps[1].continue_on_error = true;
    t.steps[2].continue_on_error = true;
    let opts = ScriptOptions {
        steps_in_script_shell: true,
        ..OPTS
    };
    assert!(
        !script::generate(&t, 1, &opts)
            .unwrap()
            .text
            .contains("/bin/sh -c")
    );
    for (name, argv) in SHELLS {
        let r = run_opts(argv, &t, PATH, &opts, |_, _| {});
        let codes: Vec<_> = r
            .summary
            .steps
            .iter()
            .map(|l| (l.index, l.exit_code, l.status))
            .collect();
        assert_eq!(
            codes[..3],
            [
                (0, 0, StepStatus::Ok),
                (1, 7, StepStatus::Fail),
                (2, 2, StepStatus::Fail),
            ],
            "{name}: {}\n{}",
            r.summary_text,
            r.raw_log
        );
        assert_eq!(
            codes[3].2,
            StepStatus::Timeout,
            "{name}: {}",
            r.summary_text
        );
        assert_eq!(r.summary.steps.len(), 4, "{name}: {}", r.summary_text);
        assert_eq!(
            r.log.steps[&0].text,
            "0\nno-functions\nargs=0 ok\nhello $(not run) `world`\nonly-here; $(id)\n",
            "{name}"
        );
        assert_eq!(r.log.steps[&1].text, "before\n", "{name}");
        assert_eq!(r.log.steps[&3].text, "started\n", "{name}");
        assert_grandchild_gone(&r, name, "the step timeout");
    }
}

#[test]
fn without_setsid_the_process_tree_is_still_killed() {
    // A PATH with the utilities the script needs but no setsid, as in a
    // minimal image: the watchdog falls back to walking /proc.
    let bin = tempfile::tempdir().unwrap();
    for tool in [
        "mkdir", "cat", "tail", "head", "wc", "date", "sleep", "rm", "chmod",
    ] {
        let src = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.is_file())
            .unwrap();
        std::os::unix::fs::symlink(src, bin.path().join(tool)).unwrap();
    }
    let path = bin.path().display().to_string();
    let t = task().with_step("hang", "sleep 300 & echo $! > grandchild.pid; sleep 300", 1);
    for (name, argv) in SHELLS {
        let r = run_with(argv, &t, &path, |_, _| {});
        assert_eq!(
            r.summary.steps[0].status,
            StepStatus::Timeout,
            "{name}: {}",
            r.raw_log
        );
        assert_grandchild_gone(&r, name, "without setsid");
    }
}

#[test]
fn output_is_bounded_with_an_explicit_marker() {
    let t = task()
        .with_step("noisy", "i=0; while [ $i -lt 500 ]; do printf 'line %04d\\n' $i; i=$((i+1)); done; printf 'no-newline'", 10)
        .with_step("quiet", "true", 10);
    for (name, argv) in SHELLS {
        let r = run(argv, &t);
        let out = &r.log.steps[&0];
        assert!(out.truncated, "{name}");
        // 500 lines of 10 bytes + 10 bytes, 1000 kept.
        assert!(
            out.text
                .starts_with("[sandfleet: output truncated, 4010 bytes omitted]\n"),
            "{name}: {}",
            &out.text[..80]
        );
        assert!(out.text.ends_with("line 0499\nno-newline\n"), "{name}");
        assert_eq!(
            out.text.len(),
            "[sandfleet: output truncated, 4010 bytes omitted]\n".len() + 1001
        );
        assert_eq!(r.log.steps[&1].text, "", "{name}");
        assert!(!r.log.steps[&1].truncated, "{name}");
    }
}

#[test]
fn summary_fits_the_termination_message_at_max_steps() {
    let mut t = task();
    for i in 0..script::MAX_STEPS {
        t = t.with_step(&format!("s{i}"), "exit 255", 1);
        t.steps[i].continue_on_error = true;
    }
    let (name, argv) = SHELLS[0];
    // Steps in the script's subshell too: the local executor passes the
    // script as one argument, which Linux caps at 128 KiB.
    for opts in [
        OPTS,
        ScriptOptions {
            steps_in_script_shell: true,
            ..OPTS
        },
    ] {
        let text = script::generate(&t, 1, &opts).unwrap().text;
        assert!(text.len() < 64 * 1024, "the script is {} bytes", text.len());
        let r = run_opts(argv, &t, PATH, &opts, |_, _| {});
        assert_eq!(
            r.summary.steps.len(),
            script::MAX_STEPS,
            "{name}: {}",
            r.raw_log
        );
        assert!(r.summary.steps.iter().all(|s| s.exit_code == 255));
        assert!(
            r.summary_text.len() <= 4096,
            "summary is {} bytes",
            r.summary_text.len()
        );
        assert_eq!(r.code, Some(0));
    }
}

#[test]
fn artifacts_are_printed_bounded() {
    let mut t = task().with_step("report", "mkdir -p out && printf 'ok report' > out/report.txt && head -c 200 /dev/zero | tr '\\0' y > big.txt", 5);
    t.artifacts = vec![
        "out/report.txt".into(),
        "big.txt".into(),
        "missing.txt".into(),
    ];
    for (name, argv) in SHELLS {
        let r = run(argv, &t);
        assert_eq!(r.log.artifacts[&0].content, b"ok report", "{name}");
        assert_eq!(r.log.artifacts[&1].size_bytes, 200, "{name}");
        assert_eq!(r.log.artifacts[&1].content.len(), 64, "{name}");
        assert!(!r.log.artifacts.contains_key(&2), "{name}");
    }
}

#[test]
fn term_stops_the_running_step_and_records_it() {
    let t = task()
        .with_step("first", "echo one", 5)
        .with_step(
            "long",
            "sleep 300 & echo $! > grandchild.pid; echo waiting; sleep 300",
            100,
        )
        .with_step("never", "echo never", 5);
    for (name, argv) in SHELLS {
        let r = run_with(argv, &t, PATH, |pid, state| {
            // Wait until the long step runs, then stop the script.
            let marker = state.join("out.1");
            for _ in 0..200 {
                if std::fs::read_to_string(&marker).is_ok_and(|s| s.contains("waiting")) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .unwrap();
        });
        assert_eq!(r.code, Some(143), "{name}: {}", r.raw_log);
        assert_eq!(r.summary.exit_code, Some(143), "{name}");
        assert_eq!(
            r.summary.steps[1].status,
            StepStatus::Killed,
            "{name}: {}",
            r.summary_text
        );
        assert_eq!(r.log.steps[&1].text, "waiting\n", "{name}");
        assert_grandchild_gone(&r, name, "TERM");
        assert!(r.elapsed < Duration::from_secs(10), "{name}");
    }
}

#[test]
fn an_unwritable_input_file_is_a_setup_failure() {
    // "a" is a file, so "a/b" cannot be created.
    let t = task()
        .with_file("a", "x")
        .with_file("a/b", "y")
        .with_step("never", "echo never", 5);
    for (name, argv) in SHELLS {
        let r = run(argv, &t);
        assert_eq!(r.code, Some(125), "{name}");
        assert_eq!(r.summary.setup_failure.as_deref(), Some("file 1"), "{name}");
        assert!(r.summary.steps.is_empty(), "{name}");
        // The shell's own error says why, in the log before the marker.
        let (why, marker) = r
            .raw_log
            .split_once("::sandfleet:: setup failed: file 1")
            .unwrap();
        assert!(why.contains("mkdir"), "{name}: {}", r.raw_log);
        assert_eq!(marker.trim(), "", "{name}: {}", r.raw_log);
    }
}

#[test]
fn a_step_ignoring_term_is_killed_after_the_grace_period() {
    // `trap '' TERM` is inherited: neither the step's shell nor its sleep die on TERM.
    let t = task().with_step(
        "stubborn",
        "trap '' TERM; sleep 300 & echo $! > grandchild.pid; sleep 300",
        1,
    );
    for (name, argv) in SHELLS {
        let r = run(argv, &t);
        let line = r.summary.steps[0];
        assert_eq!(
            line.status,
            StepStatus::Timeout,
            "{name}: {}",
            r.summary_text
        );
        assert_eq!(line.exit_code, 137, "{name}: KILL after the grace period");
        // 1 s timeout + 1 s grace (OPTS.kill_grace_secs), with slack for a busy machine.
        assert!(
            r.elapsed < Duration::from_secs(6),
            "{name}: {:?}",
            r.elapsed
        );
        assert_grandchild_gone(&r, name, "KILL");
    }
}

#[test]
fn a_task_ifs_does_not_break_the_script() {
    let mut t = task().with_step("hang", "sleep 300 & echo $! > grandchild.pid; sleep 300", 1);
    t.sandbox.env.insert("IFS".into(), "0123456789".into());
    for (name, argv) in SHELLS {
        let r = run(argv, &t);
        assert_eq!(
            r.summary.steps[0].status,
            StepStatus::Timeout,
            "{name}: {}",
            r.raw_log
        );
        assert_grandchild_gone(&r, name, "the step timeout with a task IFS");
    }
}

#[test]
fn large_input_files_arrive_whole() {
    // Over the kernel's 128 KiB per-string limit: written from several chunks.
    let content: String = (0..40_000).map(|i| format!("{i:07}\n")).collect();
    let t = task()
        .with_file("data/big.txt", &content)
        .with_step("size", "wc -c < data/big.txt", 5);
    for (name, argv) in SHELLS {
        let r = run(argv, &t);
        assert_eq!(
            r.log.steps[&0].text.trim(),
            "320000",
            "{name}: {}",
            r.raw_log
        );
        assert_eq!(
            std::fs::read_to_string(r.ws().join("data/big.txt")).unwrap(),
            content,
            "{name}"
        );
    }
}

/// The block size of `ulimit -f` in a shell, measured once as the local
/// executor does.
fn block_bytes(argv: &[&str]) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe");
    let status = shell(argv)
        .arg("-c")
        .arg(script::ULIMIT_PROBE)
        .arg("sh")
        .arg(&probe)
        .status()
        .unwrap();
    assert!(status.success());
    script::ulimit_block_bytes(std::fs::metadata(&probe).map_or(0, |m| m.len()))
}

#[test]
fn a_block_size_measured_once_gives_the_same_exact_cap() {
    let t = task().with_step("noisy", "echo begin; yes sandfleet", 30);
    for (name, argv) in SHELLS {
        let unit = block_bytes(argv);
        assert_eq!(unit, if name == "bash" { 1024 } else { 512 }, "{name}");
        let opts = ScriptOptions {
            max_file_bytes: Some(64 * 1024 + 100),
            file_block_bytes: Some(unit),
            ..OPTS
        };
        let r = run_opts(argv, &t, PATH, &opts, |_, _| {});
        assert_eq!(
            r.summary.steps[0].status,
            StepStatus::FileLimit,
            "{name}: {}",
            r.summary_text
        );
        // Rounded up to whole blocks of the shell's unit.
        let captured = std::fs::metadata(r.dir.path().join("state/out.0"))
            .unwrap()
            .len();
        assert_eq!(
            captured,
            (64 * 1024 + 100_u64).div_ceil(unit) * unit,
            "{name}"
        );
        assert!(r.log.steps[&0].truncated, "{name}");
    }
}

#[test]
fn a_step_reaching_the_file_limit_is_stopped_and_recorded() {
    let t = task()
        .with_step("noisy", "echo begin; yes sandfleet", 30)
        .with_step("never", "echo never", 5);
    let mut t = t;
    // The limit stops the task even when the step may fail.
    t.steps[0].continue_on_error = true;
    let opts = ScriptOptions {
        max_file_bytes: Some(64 * 1024),
        ..OPTS
    };
    for (name, argv) in SHELLS {
        let r = run_opts(argv, &t, PATH, &opts, |_, _| {});
        assert_eq!(
            r.summary.steps[0].status,
            StepStatus::FileLimit,
            "{name}: {}",
            r.summary_text
        );
        assert_eq!(r.summary.steps.len(), 1, "{name}: {}", r.summary_text);
        // `ulimit -f` counts 512- or 1024-byte blocks depending on the shell:
        // the script measured which, so the cap is exact everywhere.
        let captured = std::fs::metadata(r.dir.path().join("state/out.0"))
            .unwrap()
            .len();
        assert_eq!(captured, 64 * 1024, "{name}");
        assert!(r.log.steps[&0].truncated, "{name}");
        assert!(
            !r.raw_log.contains("File size limit"),
            "{name}: {}",
            r.raw_log
        );
        assert!(r.elapsed < Duration::from_secs(10), "{name}");
        // A workspace file hits the same cap.
        let big = task().with_step("big", "head -c 100000 /dev/zero > big.bin", 30);
        let r = run_opts(argv, &big, PATH, &opts, |_, _| {});
        assert_eq!(
            r.summary.steps[0].status,
            StepStatus::FileLimit,
            "{name}: {}",
            r.summary_text
        );
        assert_eq!(
            std::fs::metadata(r.ws().join("big.bin")).unwrap().len(),
            64 * 1024,
            "{name}"
        );
    }
}

/// A script started on stdin readies its sandbox and waits: the task's files
/// and steps come only after a line there, and its steps read `/dev/null`,
/// not that stdin. End of file instead ends it with 125, nothing of the task
/// done: what the local executor relies on when the start is called off.
#[test]
fn a_script_started_on_stdin_waits_for_its_line_and_ends_on_end_of_file() {
    use std::io::Write;
    let t = task().with_file("note.txt", "written").with_step(
        "run",
        "cat >read-from-stdin; touch ran",
        10,
    );
    let opts = ScriptOptions {
        start_on_stdin: true,
        executor_watchdog: true,
        steps_in_script_shell: true,
        ..OPTS
    };
    let script = script::generate(&t, 1, &opts).unwrap();
    let start = |argv: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let (ws, state) = (dir.path().join("ws"), dir.path().join("state"));
        let child = shell(argv)
            .arg("-c")
            .arg(&script.text)
            .env_clear()
            .env("PATH", PATH)
            .envs(script.env.iter().map(|(k, v)| (k, v)))
            .env(script::ENV_WORKSPACE, &ws)
            .env(script::ENV_STATE_DIR, &state)
            .env(script::ENV_TERMINATION_LOG, dir.path().join("tlog"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        (child, dir)
    };
    // Readied, held: its pid is written, nothing of the task is.
    let held = |dir: &Path| {
        let pid = dir.join("state/script.pid");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&pid).is_ok_and(|p| p.ends_with('\n')) {
            assert!(
                Instant::now() < deadline,
                "the script never readied its sandbox"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !dir.join("ws/note.txt").exists(),
            "a file was written before the start"
        );
        assert!(!dir.join("ws/ran").exists(), "a step ran before the start");
    };
    for (name, argv) in SHELLS {
        let (mut child, dir) = start(argv);
        held(dir.path());
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"go\nthis line is not for the step\n")
            .unwrap();
        let status = child.wait().unwrap();
        drop(stdin);
        assert_eq!(status.code(), Some(0), "{name}");
        let ws = dir.path().join("ws");
        assert_eq!(
            std::fs::read_to_string(ws.join("note.txt")).unwrap(),
            "written",
            "{name}"
        );
        assert!(ws.join("ran").exists(), "{name}: the step did not run");
        assert_eq!(
            std::fs::read_to_string(ws.join("read-from-stdin")).unwrap(),
            "",
            "{name}: the step read the script's stdin"
        );

        let (mut child, dir) = start(argv);
        held(dir.path());
        drop(child.stdin.take());
        assert_eq!(child.wait().unwrap().code(), Some(125), "{name}");
        assert!(!dir.path().join("ws/note.txt").exists(), "{name}");
        assert!(!dir.path().join("ws/ran").exists(), "{name}");
    }
}
