//! The commands operators reach for besides the pipeline: `status`,
//! `task validate`, `config check`, `completions`, `man`. Run as the binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Env, free_addr, http_status, task};

fn sandfleet(dir: &std::path::Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn task_validate_lists_every_problem_and_exits_2_without_a_broker() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(&good, serde_json::to_vec(&task("acme/ok")).unwrap()).unwrap();
    let mut bad = serde_json::to_value(task("acme/bad")).unwrap();
    bad["source"]["commit"] = "not-a-sha".into();
    bad["steps"][0]["timeout_secs"] = 0.into();
    bad["sandbox"]["deadline_secs"] = 86_400.into(); // past any consumer-timeout budget
    let bad_path = dir.path().join("bad.json");
    std::fs::write(&bad_path, serde_json::to_vec(&bad).unwrap()).unwrap();
    let v2 = dir.path().join("v2.json");
    let mut future = serde_json::to_value(task("acme/v2")).unwrap();
    future["schema_version"] = 2.into();
    std::fs::write(&v2, serde_json::to_vec(&future).unwrap()).unwrap();

    // No broker needed: point at a port nothing listens on.
    let nowhere = [("SANDFLEET__AMQP__URL", "amqp://guest:guest@127.0.0.1:1/%2f")];
    let out = sandfleet(dir.path(), &["task", "validate", "good.json"], &nowhere);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("good.json: valid"), "{stdout}");

    let out = sandfleet(
        dir.path(),
        &[
            "--json",
            "task",
            "validate",
            "good.json",
            "bad.json",
            "v2.json",
        ],
        &nowhere,
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l.get("file").is_some())
        .collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert_eq!(lines[0]["valid"], true);
    let paths: Vec<&str> = lines[1]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    for p in [
        "source.commit",
        "steps[0].timeout_secs",
        "sandbox.deadline_secs",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
    assert_eq!(lines[2]["errors"][0]["rule"], "unknown_schema_version");
    assert!(stderr.contains("2 of 3 task files are invalid"), "{stderr}");
}

#[test]
fn config_check_prints_the_effective_settings_with_secrets_hidden() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sandfleet.toml"),
        "[worker]\nconcurrency = 7\n[gateway]\napi_tokens = [\"tok-abcdefghijklmnop\"]\n",
    )
    .unwrap();
    let vars = [
        (
            "SANDFLEET__AMQP__URL",
            "amqp://fleet:hunter2@rabbit.example:5672/%2f",
        ),
        ("SANDFLEET__GATEWAY__GITHUB_SECRET", "gh-s3cret"),
    ];
    let out = sandfleet(dir.path(), &["config", "check"], &vars);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("concurrency = 7"),
        "the file is applied: {stdout}"
    );
    assert!(
        stdout.contains("amqp://fleet:***@rabbit.example:5672"),
        "{stdout}"
    );
    assert!(
        stdout.contains("SANDFLEET__GATEWAY__GITHUB_SECRET"),
        "{stdout}"
    );
    for secret in ["hunter2", "gh-s3cret", "tok-abcdefghijklmnop"] {
        assert!(!stdout.contains(secret), "{secret} shown: {stdout}");
    }
    // The output is the settings file format: it parses back.
    let body: String = stdout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(body.parse::<toml::Table>().is_ok(), "{body}");

    let out = sandfleet(
        dir.path(),
        &["config", "check"],
        &[("SANDFLEET__WORKER__CONCURRENCY", "0")],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("worker.concurrency"), "{stderr}");
}

#[test]
fn completions_and_man_come_from_the_cli_definition_even_with_a_broken_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sandfleet.toml"), "this is not toml [").unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = sandfleet(dir.path(), &["completions", shell], &[]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{shell}: {stderr}");
        for word in ["status", "validate", "completions", "--follow"] {
            assert!(stdout.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = sandfleet(dir.path(), &["man"], &[]);
    let (stdout, _) = text(&out);
    assert!(
        stdout.starts_with(".ie") || stdout.contains(".TH sandfleet 1"),
        "{stdout}"
    );
    assert!(stdout.contains("status"), "{stdout}");

    let pages = dir.path().join("man1");
    let out = sandfleet(
        dir.path(),
        &["man", "--out-dir", pages.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    for page in [
        "sandfleet.1",
        "sandfleet-status.1",
        "sandfleet-results-get.1",
        "sandfleet-task-validate.1",
    ] {
        assert!(pages.join(page).is_file(), "{page} not written");
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_queue_depths_the_consuming_worker_and_its_readiness() {
    let env = Env::new().await;
    // A depth to see: two dead letters (the worker would run queued tasks).
    env.dead_letter(&task("acme/a"), "invalid", "test").await;
    env.dead_letter(&task("acme/b"), "invalid", "test").await;
    let addr = free_addr();
    let worker = env
        .command(&["worker", "--http-addr", &addr], &[])
        .spawn()
        .unwrap();
    let _worker = Killed(worker);
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_status(&addr, "/readyz") != Some(200) {
        assert!(Instant::now() < deadline, "the worker never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = format!("http://{addr}");
    // The management API's figures refresh every few seconds: wait for them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let out = sandfleet(
            env.dir.path(),
            &[
                "--prefix",
                &env.prefix,
                "--json",
                "status",
                "--worker",
                &url,
            ],
            &[],
        );
        let (stdout, stderr) = text(&out);
        let v: serde_json::Value =
            serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}"));
        // The management API lists a new queue, and its figures, a moment late.
        let dead_ready = v["queues"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|q| q["name"] == env.topology.dead_queue.as_str())
            .map(|q| q["ready"].clone());
        let consumers = v["consumers"].as_array().map_or(0, Vec::len);
        if dead_ready == Some(serde_json::json!(2)) && consumers >= 1 {
            assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
            break v;
        }
        assert!(Instant::now() < deadline, "status never showed them: {v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(status["missing_queues"].as_array().unwrap().is_empty());
    let consumer = &status["consumers"][0];
    assert!(
        consumer["connection"]
            .as_str()
            .unwrap()
            .starts_with("sandfleet-worker@"),
        "{consumer}"
    );
    let w = &status["workers"][0];
    assert_eq!(w["ready"], true, "{w}");
    assert_eq!(w["breaker"], "closed", "{w}");
    assert_eq!(w["in_flight"], 0, "{w}");

    // Human output: the same facts as a table.
    let out = sandfleet(
        env.dir.path(),
        &["--prefix", &env.prefix, "status", "--worker", &url],
        &[],
    );
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("CONSUMERS OF THE TASK QUEUE (1)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&url) && stdout.contains("closed"),
        "{stdout}"
    );

    // A task that runs a while: the broker sees the worker hold it, the
    // worker counts it in flight and lists it.
    let mut slow = task("acme/slow");
    slow.steps[0].run = "sleep 20".to_owned();
    let file = env.dir.path().join("slow.json");
    std::fs::write(&file, serde_json::to_vec(&slow).unwrap()).unwrap();
    let out = sandfleet(
        env.dir.path(),
        &["--prefix", &env.prefix, "enqueue", "slow.json"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let id = slow.id.to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let busy = loop {
        let out = sandfleet(
            env.dir.path(),
            &[
                "--prefix",
                &env.prefix,
                "--json",
                "status",
                "--worker",
                &url,
            ],
            &[],
        );
        let v: serde_json::Value = serde_json::from_str(text(&out).0.trim()).unwrap();
        let held = v["consumers"][0]["unacked"].as_u64().unwrap_or(0);
        if held == 1 && v["workers"][0]["in_flight"] == 1 {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the running task: {v}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let running = &busy["workers"][0]["running"];
    assert_eq!(running[0]["task_id"], id.as_str(), "{running}");
    assert_eq!(running[0]["attempt"], 1, "{running}");
    let out = sandfleet(
        env.dir.path(),
        &["--prefix", &env.prefix, "status", "--worker", &url],
        &[],
    );
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains(&format!("runs {id} attempt 1 (acme/slow)")),
        "{stdout}"
    );

    // A worker that does not answer makes the status fail (exit 1) and says so.
    let gone = format!("http://{}", free_addr());
    let out = sandfleet(
        env.dir.path(),
        &["--prefix", &env.prefix, "status", "--worker", &gone],
        &[],
    );
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("unreachable"), "{stdout}");
}
