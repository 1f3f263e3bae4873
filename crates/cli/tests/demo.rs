//! `sandfleet demo` on a machine with nothing but the binary and /bin/sh.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn demo_prints_three_results_with_the_expected_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args(["demo", "--json"])
        // No config file, no SANDFLEET__ settings from the developer's shell.
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let got: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["sample"].as_str().unwrap(),
                l["result"]["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("passes", "succeeded"),
            ("tests-fail", "failed"),
            ("times-out", "timed_out")
        ]
    );
    for l in &lines {
        assert_eq!(l["ok"], true);
        assert_eq!(
            l["result"]["final"], true,
            "every sample ends with a final result"
        );
        assert_eq!(
            l["result"]["attempt"], 1,
            "none of these outcomes is retried"
        );
    }
    let failing = &lines[1]["result"]["steps"][1];
    assert_eq!(failing["exit_code"], 1);
    assert!(
        failing["output_tail"]
            .as_str()
            .unwrap()
            .contains("expected 4, got 0"),
        "{failing}"
    );
    assert!(
        started.elapsed().as_secs() < 30,
        "the demo finishes in seconds"
    );
}

#[test]
fn demo_human_output_is_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .arg("demo")
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for needle in [
        "SAMPLE",
        "passes      succeeded",
        "tests-fail  failed",
        "times-out   timed_out",
        "all three outcomes as expected",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in\n{stdout}");
    }
}

#[test]
fn usage_errors_exit_2_and_help_teaches() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sandfleet"))
            .args(args)
            .env_clear()
            .output()
            .unwrap()
    };
    let out = run(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["--config", "/nonexistent/sandfleet.toml", "dlq", "list"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("sandfleet demo") && help.contains("Exit codes"),
        "{help}"
    );
    let out = run(&["replay", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Examples:"));
}

#[test]
fn demo_runs_the_same_samples_through_rabbitmq() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args([
            "demo",
            "--json",
            "--amqp-url",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        ])
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "RabbitMQ must be running on 127.0.0.1:5672: exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let outcomes: Vec<String> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["result"]["outcome"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(outcomes, ["succeeded", "failed", "timed_out"]);
}
