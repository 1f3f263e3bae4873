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

fn executor() -> LocalExecutor {
    LocalExecutor::new(LocalSettings::default()).unwrap()
}

fn ctx() -> RunContext {
    RunContext {
        traceparent: None,
        worker: "test".into(),
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
    let (result, gc) = tokio::join!(run, async {
        let ws = loop {
            if let Some(e) = std::fs::read_dir(dir.path()).unwrap().flatten().next() {
                break e.path().join("workspace");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        wait_for_file(&ws.join("gc.pid"))
            .await
            .trim()
            .parse::<u32>()
            .unwrap()
    });
    let exec = result.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(exec.outcome, Outcome::TimedOut, "{exec:#?}");
    assert!(exec.error.as_deref().unwrap().contains("deadline of 1s"));
    assert_eq!(exec.steps[0].output_tail, "started\n");
    assert!(dead(gc), "grandchild {gc} outlived the deadline");
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
    let ws = loop {
        if let Some(e) = std::fs::read_dir(dir.path()).unwrap().flatten().next() {
            break e.path().join("workspace");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let gc: u32 = wait_for_file(&ws.join("gc.pid"))
        .await
        .trim()
        .parse()
        .unwrap();
    handle.abort();
    assert!(handle.await.unwrap_err().is_cancelled());
    for _ in 0..100 {
        if dead(gc) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(dead(gc), "grandchild {gc} outlived the dropped run");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "workspace left behind"
    );
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
        if let Some(e) = std::fs::read_dir(dir.path()).unwrap().flatten().next() {
            break e.path().join("workspace");
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
    assert!(
        Path::new("/usr/bin/bwrap").is_file(),
        "bubblewrap is not installed (apt-get install -y bubblewrap)"
    );
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
