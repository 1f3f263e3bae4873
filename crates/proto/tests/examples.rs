//! The example messages under `examples/tasks/` are part of the contract:
//! the valid ones decode and validate (and really run under `/bin/sh`), and
//! each invalid one reports exactly the field paths its `.expect` file lists.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use sandfleet_proto::{Limits, Task, decode_task};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tasks")
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

fn load(name: &str) -> Task {
    let bytes = std::fs::read(examples_dir().join(name)).unwrap();
    decode_task(&bytes, &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn valid_examples_decode_and_validate() {
    let files = json_files(&examples_dir());
    assert!(
        files.len() >= 2,
        "expected the node and python examples, found {files:?}"
    );
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        if let Err(e) = decode_task(&bytes, &Limits::default()) {
            panic!("{}: {e}", path.display());
        }
    }
}

#[test]
fn invalid_examples_report_every_expected_path() {
    let files = json_files(&examples_dir().join("invalid"));
    assert!(files.len() >= 5, "found only {files:?}");
    for path in files {
        let expect_path = path.with_extension("expect");
        let expect = std::fs::read_to_string(&expect_path)
            .unwrap_or_else(|e| panic!("{}: needs a sidecar .expect file: {e}", path.display()));
        let mut lines = expect
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'));
        let code = lines
            .next()
            .and_then(|l| l.strip_prefix("code: "))
            .unwrap_or_else(|| {
                panic!(
                    "{}: first line must be `code: <code>`",
                    expect_path.display()
                )
            });
        let want: BTreeSet<&str> = lines.collect();

        let bytes = std::fs::read(&path).unwrap();
        let err = decode_task(&bytes, &Limits::default())
            .expect_err(&format!("{} should be rejected", path.display()));
        assert_eq!(err.code(), code, "{}: {err}", path.display());
        let got: BTreeSet<&str> = err
            .validation_errors()
            .map(|e| e.paths().into_iter().collect())
            .unwrap_or_default();
        assert_eq!(got, want, "{}: {err}", path.display());
    }
}

/// Runs `task`'s steps the way the sandbox does: files written into a fresh
/// workspace, each step by `/bin/sh -c` there with the task's env and
/// `SANDFLEET_WORKSPACE`. Returns each step's exit code; stops at a failure.
fn run_locally(task: &Task, skip: &[&str]) -> (tempfile::TempDir, Vec<(String, i32)>) {
    let ws = tempfile::tempdir().unwrap();
    for f in &task.files {
        let p = ws.path().join(&f.path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &f.content).unwrap();
    }
    let mut codes = Vec::new();
    for step in task
        .steps
        .iter()
        .filter(|s| !skip.contains(&s.name.as_str()))
    {
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(&step.run)
            .current_dir(ws.path())
            .envs(&task.sandbox.env)
            .envs(&step.env)
            .env("SANDFLEET_WORKSPACE", ws.path())
            .output()
            .unwrap();
        let code = out.status.code().unwrap_or(-1);
        codes.push((step.name.clone(), code));
        if code != 0 && !step.continue_on_error {
            break;
        }
    }
    (ws, codes)
}

#[test]
fn realistic_examples_fix_a_real_bug_under_a_posix_shell() {
    for (name, test_step) in [
        ("node-fix-attempt.json", "test"),
        ("python-fix-attempt.json", "test"),
    ] {
        let task = load(name);
        // Without the patch the project's tests fail: the example is a real fix.
        let (_ws, codes) = run_locally(&task, &["apply-patch"]);
        assert_ne!(
            codes.iter().find(|(n, _)| n == test_step).map(|c| c.1),
            Some(0),
            "{name}: tests pass without the patch: {codes:?}"
        );
        // With it, every step passes and the artifacts exist.
        let (ws, codes) = run_locally(&task, &[]);
        assert!(codes.iter().all(|(_, c)| *c == 0), "{name}: {codes:?}");
        assert_eq!(codes.len(), task.steps.len());
        for a in &task.artifacts {
            assert!(ws.path().join(a).is_file(), "{name}: artifact {a} missing");
        }
    }
}

#[test]
fn result_examples_decode_and_round_trip() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/results");
    let files = json_files(&dir);
    assert!(files.len() >= 2, "found only {files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let result: sandfleet_proto::TaskResult =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Unknown fields are refused on the way in; nothing is lost on the way out.
        let again: sandfleet_proto::TaskResult =
            serde_json::from_value(serde_json::to_value(&result).unwrap()).unwrap();
        assert_eq!(again, result, "{}", path.display());
        if let Some(task) = &result.task {
            task.validate(&Limits::default()).unwrap();
            assert_eq!(task.id, result.task_id);
            // `final` follows from the outcome and the attempt count.
            let again =
                sandfleet_proto::TaskResult::from_task(task, result.attempt, result.outcome, "w");
            assert_eq!(again.is_final, result.is_final, "{}", path.display());
        }
    }
}
