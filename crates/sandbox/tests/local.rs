//! The local executor running real tasks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use sandfleet_proto::{Outcome, Task};
use sandfleet_sandbox::{Executor, LocalExecutor, RunContext};
use sandfleet_settings::LocalSettings;

fn example(name: &str) -> Task {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/tasks")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut task: Task = serde_json::from_str(&text).unwrap();
    // A fresh id per test run: runs of the same task must not collide.
    task.id = uuid::Uuid::now_v7();
    task
}

/// Fails (never skips) when a tool the sandbox needs is missing, naming the
/// Debian package that provides it.
fn require(tool: &str, package: &str) {
    let found = std::env::split_paths(sandfleet_sandbox::local::SANDBOX_PATH)
        .any(|d| d.join(tool).is_file());
    assert!(
        found,
        "{tool} is not installed in the sandbox PATH ({}): install it with `apt-get install -y {package}` (scripts/setup.sh does)",
        sandfleet_sandbox::local::SANDBOX_PATH
    );
}

fn executor() -> LocalExecutor {
    LocalExecutor::new(LocalSettings::default()).unwrap()
}

fn ctx() -> RunContext {
    RunContext {
        traceparent: None,
        worker: "test".into(),
        cancels_read_to: None,
    }
}

fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => matches!(
            stat.rsplit(')').next().unwrap().split_whitespace().next(),
            Some("Z" | "X")
        ),
    }
}

/// The one run directory under `base`, once it exists.
fn run_dir(base: &Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(base)
        .unwrap()
        .flatten()
        .find(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.path())
}

/// The pid a step wrote to `file` in the workspace of the one run under
/// `base`, once both exist.
async fn workspace_pid(base: &Path, file: &str) -> u32 {
    let ws = loop {
        if let Some(run) = run_dir(base) {
            break run.join("workspace");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    wait_for_file(&ws.join(file)).await.trim().parse().unwrap()
}

async fn wait_for_file(path: &Path) -> String {
    for _ in 0..500 {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.trim().is_empty()
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never appeared", path.display());
}

#[tokio::test]
async fn python_fix_attempt_succeeds_with_step_output_and_artifact() {
    require("python3", "python3");
    require("patch", "patch");
    let task = example("python-fix-attempt.json");
    let exec = executor().run(&task, 1, &ctx()).await.unwrap();
    assert_eq!(exec.outcome, Outcome::Succeeded, "{exec:#?}");
    assert_eq!(exec.exit_code, Some(0));
    let names: Vec<_> = exec
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.exit_code))
        .collect();
    assert_eq!(names, [("apply-patch", Some(0)), ("test", Some(0))]);
    assert!(
        exec.steps[0]
            .output_tail
            .contains("patching file calc/stats.py"),
        "{:?}",
        exec.steps[0]
    );
    assert!(
        exec.steps[1]
            .output_tail
            .contains("test_even_length_averages_the_middle_pair")
    );
    assert!(exec.steps[1].output_tail.contains("OK"));
    let report = &exec.artifacts[0];
    assert_eq!(report.path, "test-report.txt");
    assert!(report.content.as_deref().unwrap().contains("Ran 2 tests"));
    assert!(!report.truncated);
    assert!(!exec.log_truncated);
    // The workspace is gone afterwards.
    assert!(!Path::new(&exec.sandbox).exists());
}

#[tokio::test]
async fn failing_test_step_gives_failed_with_its_exit_code() {
    require("python3", "python3");
    let mut task = example("python-fix-attempt.json");
    // Without the patch the even-length test fails.
    task.steps.remove(0);
    task.steps.push(sandfleet_proto::Step {
        name: "never".into(),
        run: "echo never".into(),
        timeout_secs: 5,
        env: Default::default(),
        continue_on_error: false,
    });
    let exec = executor().run(&task, 1, &ctx()).await.unwrap();
    assert_eq!(exec.outcome, Outcome::Failed);
    assert_eq!(exec.exit_code, Some(1));
    assert!(exec.error.as_deref().unwrap().contains("\"test\""));
    assert!(exec.steps[0].output_tail.contains("FAILED (failures=1)"));
    assert!(exec.steps[1].skipped);
    assert_eq!(exec.steps[1].exit_code, None);
    assert!(
        exec.artifacts[0]
            .content
            .as_deref()
            .unwrap()
            .contains("AssertionError")
    );
    assert!(!exec.outcome.is_retryable());
}

#[tokio::test]
async fn environment_is_clean() {
    let mut task = example("python-fix-attempt.json");
    task.files.clear();
    task.steps.truncate(1);
    task.steps[0].run = "env | sort".into();
    let exec = executor().run(&task, 2, &ctx()).await.unwrap();
    let out = &exec.steps[0].output_tail;
    // The test process runs with CARGO_* variables; none may leak.
    assert!(!out.contains("CARGO"), "{out}");
    assert!(out.contains("PYTHONUNBUFFERED=1"));
    assert!(out.contains("SANDFLEET_ATTEMPT=2"));
    assert!(out.contains(&format!("HOME={}/workspace", exec.sandbox)));
    assert!(out.contains(&format!("PATH={}", sandfleet_sandbox::local::SANDBOX_PATH)));
}

#[tokio::test]
async fn overall_deadline_kills_everything() {
    let mut task = example("python-fix-attempt.json");
    task.files.clear();
    task.sandbox.deadline_secs = 1;
    task.steps.truncate(1);
    task.steps[0].run = "sleep 300 & echo $! > gc.pid; echo started; sleep 300".into();
    task.steps[0].timeout_secs = 600;
    let dir = tempfile::tempdir().unwrap();
    let exec = LocalExecutor::new(LocalSettings {
        work_dir: Some(dir.path().display().to_string()),
        ..LocalSettings::default()
    })
    .unwrap();
    let started = Instant::now();
    let ctx = ctx();
    let run = exec.run(&task, 1, &ctx);
    let (result, gc) = tokio::join!(run, workspace_pid(dir.path(), "gc.pid"));
    let exec = result.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(exec.outcome, Outcome::TimedOut, "{exec:#?}");
    assert!(exec.error.as_deref().unwrap().contains("deadline of 1s"));
    assert_eq!(exec.steps[0].output_tail, "started\n");
    // Killed by then; the kernel may take a moment to show it.
    for _ in 0..100 {
        if dead(gc) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(dead(gc), "grandchild {gc} outlived the deadline");
}

#[tokio::test]
async fn a_step_past_its_timeout_is_stopped_with_its_process_group() {
    let mut task = example("python-fix-attempt.json");
    task.files.clear();
    task.steps.truncate(1);
    // The step and everything it starts ignore TERM, so only the KILL after
    // the grace period (2 s) stops them; the next step still runs.
    task.steps[0].run =
        "trap '' TERM; sleep 300 & echo $! > gc.pid; echo started; while :; do sleep 1; done"
            .into();
    task.steps[0].timeout_secs = 1;
    task.steps[0].continue_on_error = true;
    task.steps.push(sandfleet_proto::Step {
        name: "after".into(),
        run: "echo after".into(),
        timeout_secs: 5,
        env: Default::default(),
        continue_on_error: false,
    });
    task.sandbox.deadline_secs = 60;
    let dir = tempfile::tempdir().unwrap();
    let exec = LocalExecutor::new(LocalSettings {
        work_dir: Some(dir.path().display().to_string()),
        ..LocalSettings::default()
    })
    .unwrap();
    let started = Instant::now();
    let ctx = ctx();
    let (result, gc) = tokio::join!(
        exec.run(&task, 1, &ctx),
        workspace_pid(dir.path(), "gc.pid")
    );
    let r = result.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "timeout 1 s and grace 2 s, took {took:?}"
    );
    assert!(r.steps[0].timed_out, "{r:#?}");
    assert_eq!(r.steps[0].exit_code, Some(137), "{r:#?}");
    assert_eq!(r.steps[0].output_tail, "started\n");
    assert!(!r.steps[1].timed_out);
    assert_eq!(r.steps[1].output_tail, "after\n", "{r:#?}");
    wait_until(
        "the step's background child dies with its group",
        Duration::from_secs(5),
        || dead(gc),
    )
    .await;
}

#[tokio::test]
async fn dropping_the_run_leaves_nothing_running() {
    let mut task = example("python-fix-attempt.json");
    task.files.clear();
    task.steps.truncate(1);
    task.steps[0].run = "sleep 300 & echo $! > gc.pid; sleep 300".into();
    task.steps[0].timeout_secs = 600;
    let dir = tempfile::tempdir().unwrap();
    let exec = LocalExecutor::new(LocalSettings {
        work_dir: Some(dir.path().display().to_string()),
        ..LocalSettings::default()
    })
    .unwrap();
    let handle = tokio::spawn(async move { exec.run(&task, 1, &ctx()).await });
    let gc = workspace_pid(dir.path(), "gc.pid").await;
    handle.abort();
    assert!(handle.await.unwrap_err().is_cancelled());
    for _ in 0..100 {
        if dead(gc) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(dead(gc), "grandchild {gc} outlived the dropped run");
    // A dropped run's directory is removed on the blocking pool (not on the
    // async thread that drops it), so it goes shortly after the abort.
    let entries = || std::fs::read_dir(dir.path()).unwrap().count();
    for _ in 0..200 {
        if entries() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(entries(), 0, "workspace left behind");
}

#[tokio::test]
async fn cancel_stops_a_running_attempt() {
    let mut task = example("python-fix-attempt.json");
    task.files.clear();
    task.steps.truncate(1);
    task.steps[0].run = "echo started > started; sleep 300".into();
    let dir = tempfile::tempdir().unwrap();
    let exec = std::sync::Arc::new(
        LocalExecutor::new(LocalSettings {
            work_dir: Some(dir.path().display().to_string()),
            ..LocalSettings::default()
        })
        .unwrap(),
    );
    let id = task.id;
    let runner = exec.clone();
    let handle = tokio::spawn(async move { runner.run(&task, 1, &ctx()).await });
    let ws = loop {
        if let Some(ws) = run_dir(dir.path()) {
            break ws.join("workspace");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    wait_for_file(&ws.join("started")).await;
    exec.cancel(id, 1).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(result.outcome, Outcome::Cancelled);
    // Cancelling something that is not running is fine.
    exec.cancel(id, 1).await.unwrap();
}

#[tokio::test]
async fn bubblewrap_makes_the_host_read_only() {
    require("bwrap", "bubblewrap");
    let exec = LocalExecutor::new(LocalSettings {
        bubblewrap: true,
        ..LocalSettings::default()
    })
    .unwrap();
    assert!(exec.isolated());
    let mut task = example("python-fix-attempt.json");
    task.files.clear();
    task.steps.truncate(1);
    task.steps[0].run = "echo ok > in-workspace && touch /usr/sandfleet-bwrap-probe".into();
    let result = exec.run(&task, 1, &ctx()).await.unwrap();
    assert_eq!(result.outcome, Outcome::Failed, "{result:#?}");
    assert!(
        result.steps[0]
            .output_tail
            .contains("Read-only file system"),
        "{:?}",
        result.steps[0]
    );
    assert!(!Path::new("/usr/sandfleet-bwrap-probe").exists());
    // And the real example still passes inside it.
    let ok = exec
        .run(&example("python-fix-attempt.json"), 1, &ctx())
        .await
        .unwrap();
    assert_eq!(ok.outcome, Outcome::Succeeded, "{ok:#?}");
}

#[tokio::test]
async fn node_fix_attempt_succeeds_with_a_junit_artifact() {
    require("node", "nodejs");
    let task = example("node-fix-attempt.json");
    let exec = executor().run(&task, 1, &ctx()).await.unwrap();
    assert_eq!(exec.outcome, Outcome::Succeeded, "{exec:#?}");
    assert!(
        exec.steps[0].output_tail.starts_with('v'),
        "node --version: {:?}",
        exec.steps[0]
    );
    assert_eq!(
        exec.steps.iter().filter(|s| s.exit_code == Some(0)).count(),
        3
    );
    let junit = exec
        .artifacts
        .iter()
        .find(|a| a.path.ends_with(".xml"))
        .expect("junit artifact");
    assert!(
        junit
            .content
            .as_deref()
            .unwrap_or_default()
            .contains("<testsuites"),
        "{junit:?}"
    );
}

/// Environment variable that turns [`helper_runs_one_sandbox_until_killed`]
/// into a worker stand-in: it runs one sandbox under the base dir named here.
const HELPER_BASE: &str = "SANDFLEET_TEST_HELPER_BASE";
/// Set: the helper runs its sandbox under bubblewrap.
const HELPER_BWRAP: &str = "SANDFLEET_TEST_HELPER_BWRAP";
/// Set: the id of the task the helper runs.
const HELPER_TASK: &str = "SANDFLEET_TEST_HELPER_TASK";
/// Set: the helper runs a second sandbox beside the first, of another task.
const HELPER_TWO: &str = "SANDFLEET_TEST_HELPER_TWO";

/// Not a test on its own: the worker stand-in the tests below start as a
/// separate process (this test binary, re-executed) and SIGKILL.
#[tokio::test]
#[ignore = "helper process for the tests that kill a worker; started by them"]
async fn helper_runs_one_sandbox_until_killed() {
    let base = std::env::var(HELPER_BASE).expect("started by a test");
    let mut task = example("python-fix-attempt.json");
    if let Ok(id) = std::env::var(HELPER_TASK) {
        task.id = id.parse().unwrap();
    }
    task.files.clear();
    task.steps.truncate(1);
    // A grandchild in the background, the step itself in the foreground.
    task.steps[0].run = "sleep 300 & echo $! > gc.pid; echo $$ > step.pid; sleep 300".into();
    task.steps[0].timeout_secs = 600;
    task.sandbox.deadline_secs = 600;
    let exec = LocalExecutor::new(LocalSettings {
        work_dir: Some(base),
        bubblewrap: std::env::var_os(HELPER_BWRAP).is_some(),
        ..LocalSettings::default()
    })
    .unwrap();
    let mut other = task.clone();
    other.id = uuid::Uuid::now_v7();
    let ctx = ctx();
    if std::env::var_os(HELPER_TWO).is_some() {
        let _ = tokio::join!(exec.run(&task, 1, &ctx), exec.run(&other, 1, &ctx));
    } else {
        let _ = exec.run(&task, 1, &ctx).await;
    }
    unreachable!("the sandbox sleeps until the test kills this process");
}

/// Starts the helper on `base` and waits until its sandbox's step and
/// grandchild run: (helper, run dir, step pid, grandchild pid).
async fn start_helper(base: &Path) -> (std::process::Child, std::path::PathBuf, u32, u32) {
    start_helper_with(base, false, None).await
}

async fn start_helper_with(
    base: &Path,
    bwrap: bool,
    task: Option<uuid::Uuid>,
) -> (std::process::Child, std::path::PathBuf, u32, u32) {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    if bwrap {
        cmd.env(HELPER_BWRAP, "1");
    }
    if let Some(id) = task {
        cmd.env(HELPER_TASK, id.to_string());
    }
    let helper = cmd
        .args([
            "--ignored",
            "--exact",
            "helper_runs_one_sandbox_until_killed",
        ])
        .env(HELPER_BASE, base)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let run = loop {
        if let Some(run) = run_dir(base) {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let ws = run.join("workspace");
    let step = wait_for_file(&ws.join("step.pid"))
        .await
        .trim()
        .parse()
        .unwrap();
    let gc = wait_for_file(&ws.join("gc.pid"))
        .await
        .trim()
        .parse()
        .unwrap();
    (helper, run, step, gc)
}

/// The parent watcher of the executor on `base`: the process whose
/// environment names that base.
fn watcher_of(base: &Path) -> Option<i32> {
    let mut tag = format!("SANDFLEET_LOCAL_BASE={}", base.display()).into_bytes();
    tag.push(0);
    std::fs::read_dir("/proc").unwrap().flatten().find_map(|p| {
        let pid: i32 = p.file_name().to_str()?.parse().ok()?;
        let env = std::fs::read(p.path().join("environ")).ok()?;
        env.split_inclusive(|&b| b == 0)
            .any(|v| v == tag.as_slice())
            .then_some(pid)
    })
}

async fn wait_until(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_sigkilled_worker_takes_its_sandbox_and_run_dir_with_it() {
    let base = tempfile::tempdir().unwrap();
    let (mut helper, run, step, gc) = start_helper(base.path()).await;
    assert!(!dead(step) && !dead(gc));
    helper.kill().unwrap(); // SIGKILL: no destructor, no kill_on_drop
    helper.wait().unwrap();
    // The step runs in a session of its own and the grandchild in the
    // background: both die with the worker, and the run directory and its
    // lock go with them.
    wait_until(
        "the step and its grandchild die",
        Duration::from_secs(10),
        || dead(step) && dead(gc),
    )
    .await;
    wait_until(
        "the run directory is removed",
        Duration::from_secs(10),
        || std::fs::read_dir(base.path()).unwrap().count() == 0,
    )
    .await;
    assert!(!run.exists());
}

#[tokio::test]
async fn a_sigkilled_worker_takes_every_sandbox_it_runs_with_it() {
    let base = tempfile::tempdir().unwrap();
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "helper_runs_one_sandbox_until_killed",
        ])
        .env(HELPER_BASE, base.path())
        .env(HELPER_TWO, "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Both runs' steps and background grandchildren.
    let runs = loop {
        let runs: Vec<_> = std::fs::read_dir(base.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_dir())
            .map(|e| e.path())
            .collect();
        if runs.len() == 2 {
            break runs;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut pids = Vec::new();
    for run in &runs {
        for f in ["step.pid", "gc.pid"] {
            let pid: u32 = wait_for_file(&run.join("workspace").join(f))
                .await
                .trim()
                .parse()
                .unwrap();
            assert!(!dead(pid));
            pids.push(pid);
        }
    }
    helper.kill().unwrap(); // SIGKILL
    helper.wait().unwrap();
    wait_until(
        "both steps and their grandchildren die",
        Duration::from_secs(10),
        || pids.iter().all(|&p| dead(p)),
    )
    .await;
    wait_until(
        "both run directories and locks are removed",
        Duration::from_secs(10),
        || std::fs::read_dir(base.path()).unwrap().count() == 0,
    )
    .await;
}

#[tokio::test]
async fn a_starting_executor_removes_runs_whose_worker_is_gone() {
    let base = tempfile::tempdir().unwrap();
    let (mut helper, run, step, gc) = start_helper(base.path()).await;
    // The worker, its parent watcher and its whole sandbox die at once, so
    // the watcher cannot clean up (as when the whole tree is killed, or a
    // reboot with a persistent work dir): freeze the worker so it cannot
    // clean up either, kill the watcher, the sandbox's group, then the worker.
    // The script leads the sandbox's group, which the lock file names.
    let script: i32 = std::fs::read_to_string(run.with_extension("lock"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = |p: i32| rustix::process::Pid::from_raw(p).unwrap();
    assert!(helper.try_wait().unwrap().is_none(), "the helper runs");
    assert!(run.join("workspace").exists(), "before the stop");
    rustix::process::kill_process(pid(helper.id() as i32), rustix::process::Signal::STOP).unwrap();
    let watcher = watcher_of(base.path()).expect("the executor's parent watcher runs");
    rustix::process::kill_process(pid(watcher), rustix::process::Signal::KILL).unwrap();
    rustix::process::kill_process_group(pid(script), rustix::process::Signal::KILL).unwrap();
    helper.kill().unwrap();
    helper.wait().unwrap();
    assert!(
        run.join("workspace").exists(),
        "left behind: {:?}",
        std::fs::read_dir(base.path())
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    wait_until("the sandbox is dead", Duration::from_secs(10), || {
        dead(step) && dead(gc) && dead(script as u32)
    })
    .await;
    assert!(run.exists(), "nothing cleaned up yet");

    // The sweep of a starting executor removes it (once the killed
    // sandbox's last process is gone; until then the run counts as dying).
    wait_until(
        "a start-up sweep removes it",
        Duration::from_secs(10),
        || {
            LocalExecutor::new(LocalSettings {
                work_dir: Some(base.path().display().to_string()),
                ..LocalSettings::default()
            })
            .unwrap();
            !run.exists()
        },
    )
    .await;
    let other = std::sync::Arc::new(
        LocalExecutor::new(LocalSettings {
            work_dir: Some(base.path().display().to_string()),
            ..LocalSettings::default()
        })
        .unwrap(),
    );
    // A live run of another executor on the same base dir is not touched.
    let mut live = example("python-fix-attempt.json");
    live.files.clear();
    live.steps.truncate(1);
    live.steps[0].run = "echo started > started; sleep 300".into();
    let (id, runner) = (live.id, other.clone());
    let handle = tokio::spawn(async move { runner.run(&live, 1, &ctx()).await });
    let live_dir = loop {
        if let Some(d) = run_dir(base.path()) {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    wait_for_file(&live_dir.join("workspace/started")).await;
    let _restarted = LocalExecutor::new(LocalSettings {
        work_dir: Some(base.path().display().to_string()),
        ..LocalSettings::default()
    })
    .unwrap();
    assert!(
        live_dir.join("workspace/started").exists(),
        "a live run is kept"
    );
    other.cancel(id, 1).await.unwrap();
    let r = handle.await.unwrap().unwrap();
    assert_eq!(r.outcome, Outcome::Cancelled);
    assert_eq!(std::fs::read_dir(base.path()).unwrap().count(), 0);
}

fn limited(max_file_bytes: u64, max_workspace_bytes: u64) -> (tempfile::TempDir, LocalExecutor) {
    let dir = tempfile::tempdir().unwrap();
    let exec = LocalExecutor::new(LocalSettings {
        work_dir: Some(dir.path().display().to_string()),
        max_file_bytes,
        max_workspace_bytes,
        ..LocalSettings::default()
    })
    .unwrap();
    (dir, exec)
}

#[tokio::test]
async fn a_step_writing_output_forever_is_stopped_at_the_file_limit() {
    let (_dir, exec) = limited(2 << 20, 1 << 30);
    let mut task = example("python-fix-attempt.json");
    task.files.clear();
    task.steps.truncate(1);
    task.steps[0].run = "echo begin; yes sandfleet-writes-forever".into();
    task.steps[0].continue_on_error = true; // a limit stops the task anyway
    task.steps.push(sandfleet_proto::Step {
        name: "never".into(),
        run: "echo never".into(),
        timeout_secs: 5,
        env: Default::default(),
        continue_on_error: false,
    });
    task.sandbox.deadline_secs = 60;
    let started = Instant::now();
    let r = exec.run(&task, 1, &ctx()).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.outcome, Outcome::Failed, "{r:#?}");
    let error = r.error.as_deref().unwrap();
    assert!(error.contains("size limit"), "{error}");
    assert!(
        error.contains(&format!("{} bytes (sandbox.local.max_file_bytes)", 2 << 20)),
        "{error}"
    );
    assert!(r.steps[0].output_truncated);
    assert!(r.steps[0].output_tail.contains("sandfleet-writes-forever"));
    assert!(r.steps[1].skipped, "{:?}", r.steps[1]);
    assert!(!r.outcome.is_retryable());
    eprintln!(
        "file limit: `yes` stopped after {:?}: {error}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_step_filling_the_workspace_with_files_is_stopped_at_the_disk_limit() {
    require("du", "coreutils");
    let (dir, exec) = limited(1 << 30, 8 << 20);
    let mut task = example("python-fix-attempt.json");
    task.files.clear();
    task.steps.truncate(1);
    // Many small files: no single one reaches the file limit.
    task.steps[0].run =
        "i=0; while :; do head -c 262144 /dev/zero > f$i || exit 1; i=$((i+1)); done".into();
    task.sandbox.deadline_secs = 60;
    let started = Instant::now();
    let ctx = ctx();
    let run = exec.run(&task, 1, &ctx);
    let (r, peak) = tokio::join!(run, async {
        // What the run directory reached, measured from outside.
        let mut peak = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Some(d) = run_dir(dir.path()) {
                let out = std::process::Command::new("du")
                    .args(["-sk"])
                    .arg(&d)
                    .output()
                    .unwrap();
                let kb: u64 = String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .next()
                    .and_then(|k| k.parse().ok())
                    .unwrap_or(0);
                peak = peak.max(kb * 1024);
            } else if start.elapsed() > Duration::from_secs(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        peak
    });
    let r = r.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.outcome, Outcome::Failed, "{r:#?}");
    let error = r.error.as_deref().unwrap();
    assert!(
        error.contains("sandbox.local.max_workspace_bytes"),
        "{error}"
    );
    assert!(error.contains("during step \"apply-patch\""), "{error}");
    eprintln!(
        "disk limit: stopped after {:?} at a measured peak of {peak} bytes (limit {})",
        started.elapsed(),
        8 << 20
    );
    // Checked every second: the overshoot is what a step writes in one.
    assert!(peak < 2 << 30, "peak {peak}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn a_sigkilled_worker_takes_its_bubblewrapped_sandbox_with_it() {
    require("bwrap", "bubblewrap");
    let base = tempfile::tempdir().unwrap();
    let (mut helper, run, step, gc) = start_helper_with(base.path(), true, None).await;
    helper.kill().unwrap();
    helper.wait().unwrap();
    wait_until(
        "the step and its grandchild die",
        Duration::from_secs(10),
        || dead(step) && dead(gc),
    )
    .await;
    // Inside bubblewrap the run directory is a mount point and its lock lies
    // outside the sandbox: the watcher empties the directory, and the next
    // executor's sweep removes what is left.
    wait_until("the workspace is emptied", Duration::from_secs(10), || {
        !run.join("workspace").exists()
    })
    .await;
    // Once the sandbox's last process is gone (until then the run is dying
    // and a sweep leaves it), a starting executor removes the rest.
    wait_until(
        "a start-up sweep removes the rest",
        Duration::from_secs(10),
        || {
            LocalExecutor::new(LocalSettings {
                work_dir: Some(base.path().display().to_string()),
                ..LocalSettings::default()
            })
            .unwrap();
            std::fs::read_dir(base.path()).unwrap().count() == 0
        },
    )
    .await;
}

#[tokio::test]
async fn a_redelivery_waits_until_the_dead_workers_sandbox_is_gone() {
    use std::os::unix::process::CommandExt as _;
    let base = tempfile::tempdir().unwrap();
    let id = uuid::Uuid::now_v7();
    // What a worker killed a moment ago leaves while its sandbox's watcher is
    // still at work: the run directory, a lock nobody holds, and the
    // sandbox's process group, still alive.
    let mut orphan = std::process::Command::new("sleep")
        .arg("300")
        .process_group(0)
        .spawn()
        .unwrap();
    let name = format!("sf-{}-a1-0a1b2c3d", id.simple());
    std::fs::create_dir_all(base.path().join(&name).join("workspace")).unwrap();
    std::fs::write(
        base.path().join(format!("{name}.lock")),
        orphan.id().to_string(),
    )
    .unwrap();

    // The redelivery, on another worker sharing the work dir.
    let mut task = example("python-fix-attempt.json");
    task.id = id;
    task.files.clear();
    task.steps.truncate(1);
    task.steps[0].run = "if [ -e /proc/$OLD ] && [ \"$(cut -d' ' -f3 /proc/$OLD/stat)\" != Z ]; then echo beside-the-orphan; else echo alone; fi".into();
    task.sandbox
        .env
        .insert("OLD".into(), orphan.id().to_string());
    let exec = LocalExecutor::new(LocalSettings {
        work_dir: Some(base.path().display().to_string()),
        ..LocalSettings::default()
    })
    .unwrap();
    assert!(base.path().join(&name).exists(), "a dying run is not swept");
    let handle = tokio::spawn(async move { exec.run(&task, 1, &ctx()).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runs = std::fs::read_dir(base.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_dir())
        .count();
    assert_eq!(runs, 1, "the redelivery waits while the orphan lives");
    assert!(!handle.is_finished());
    // The orphan dies: the redelivery runs, alone.
    orphan.kill().unwrap();
    orphan.wait().unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
    assert_eq!(r.steps[0].output_tail, "alone\n");
    // The leftover goes with the next start-up.
    let _next = LocalExecutor::new(LocalSettings {
        work_dir: Some(base.path().display().to_string()),
        ..LocalSettings::default()
    })
    .unwrap();
    assert_eq!(std::fs::read_dir(base.path()).unwrap().count(), 0);
}

/// A task that writes a file and whose step leaves a mark, on an executor
/// of its own in a fresh base directory.
fn marking_task_and_executor() -> (Task, tempfile::TempDir, LocalExecutor) {
    let mut task = example("python-fix-attempt.json");
    task.files.truncate(1);
    task.files[0].path = "note.txt".into();
    task.files[0].content = "written".into();
    task.steps.truncate(1);
    task.steps[0].run = "touch ran".into();
    let dir = tempfile::tempdir().unwrap();
    let exec = LocalExecutor::new(LocalSettings {
        work_dir: Some(dir.path().display().to_string()),
        ..LocalSettings::default()
    })
    .unwrap();
    (task, dir, exec)
}

/// Waits until the one run under `base` has its script readied (its
/// summary begun), checks that nothing of the task happened for a while, and
/// returns the run directory and the script's pid (its process group's, in
/// the lock file beside the run directory).
async fn readied_and_held(base: &Path) -> (std::path::PathBuf, u32) {
    let start = Instant::now();
    let run = loop {
        if let Some(run) = run_dir(base) {
            break run;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no sandbox was readied while the clearance was pending"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    wait_for_file(&run.join("summary")).await;
    let pid: u32 = wait_for_file(&run.with_extension("lock"))
        .await
        .trim()
        .parse()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!dead(pid), "the held script ended on its own");
    assert!(
        !run.join("workspace/note.txt").exists(),
        "a file was written before the clearance"
    );
    assert!(
        !run.join("workspace/ran").exists(),
        "the step ran before the clearance"
    );
    (run, pid)
}

#[tokio::test]
async fn a_sandbox_readied_before_its_clearance_starts_the_task_only_once_it_comes() {
    let (task, base, exec) = marking_task_and_executor();
    let (clear, cleared) = tokio::sync::oneshot::channel::<Option<RunContext>>();
    let handle = tokio::spawn(async move {
        let clearance = Box::pin(async move { cleared.await.unwrap() });
        exec.run_when_cleared(&task, 1, clearance).await
    });
    let (run, _) = readied_and_held(base.path()).await;
    clear.send(Some(ctx())).unwrap();
    let exec = handle.await.unwrap().expect("cleared").unwrap();
    assert_eq!(exec.outcome, Outcome::Succeeded, "{exec:#?}");
    assert_eq!(exec.steps[0].exit_code, Some(0));
    assert_eq!(exec.sandbox, run.display().to_string());
    assert!(!run.exists(), "the run directory is gone afterwards");
}

#[tokio::test]
async fn a_refused_or_dropped_clearance_kills_the_readied_sandbox_before_anything_ran() {
    for refuse in [true, false] {
        let (task, base, exec) = marking_task_and_executor();
        let (clear, cleared) = tokio::sync::oneshot::channel::<Option<RunContext>>();
        let handle = tokio::spawn(async move {
            let clearance = Box::pin(async move { cleared.await.unwrap_or(None) });
            exec.run_when_cleared(&task, 1, clearance).await
        });
        let (run, pid) = readied_and_held(base.path()).await;
        if refuse {
            clear.send(None).unwrap();
            assert!(handle.await.unwrap().is_none(), "a refusal runs nothing");
        } else {
            // The delivery was lost while the barrier was in flight.
            handle.abort();
            assert!(handle.await.unwrap_err().is_cancelled());
            drop(clear);
        }
        wait_until("the held script is killed", Duration::from_secs(5), || {
            dead(pid)
        })
        .await;
        wait_until(
            "the run directory is removed",
            Duration::from_secs(5),
            || std::fs::read_dir(base.path()).unwrap().count() == 0,
        )
        .await;
        assert!(!run.exists());
    }
}
