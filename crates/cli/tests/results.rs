//! `results tail --last N / --task` and `results get TASK_ID`, run as the
//! binary against the real broker's results stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{Duration as Age, Utc};
use common::{Env, result, task};
use sandfleet_proto::Outcome;

#[tokio::test(flavor = "multi_thread")]
async fn tail_last_n_prints_the_newest_n_not_the_first_n() {
    let env = Env::new().await;
    let tasks: Vec<_> = (0..6).map(|i| task(&format!("acme/last-{i}"))).collect();
    for (i, t) in tasks.iter().enumerate() {
        let at = Utc::now() - Age::minutes(10 - i as i64);
        env.publish_result(&result(t, Outcome::Failed, true, at))
            .await;
    }
    let run = env.sandfleet(&["results", "tail", "-n", "2", "--idle-timeout", "1s"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let ids: Vec<&str> = run
        .lines
        .iter()
        .map(|l| l["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![tasks[4].id.to_string(), tasks[5].id.to_string()],
        "the last two, oldest first"
    );
    // --limit still means "stop after N", from where reading starts.
    let run = env.sandfleet(&["results", "tail", "--from", "first", "--limit", "2"]);
    let ids: Vec<&str> = run
        .lines
        .iter()
        .map(|l| l["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![tasks[0].id.to_string(), tasks[1].id.to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_task_shows_only_that_tasks_attempts() {
    let env = Env::new().await;
    let wanted = task("acme/wanted");
    let other = task("acme/other");
    let mut retry = result(&wanted, Outcome::Evicted, false, Utc::now());
    retry.attempt = 1;
    env.publish_result(&retry).await;
    env.publish_result(&result(&other, Outcome::Failed, true, Utc::now()))
        .await;
    let mut fin = result(&wanted, Outcome::Succeeded, true, Utc::now());
    fin.attempt = 2;
    env.publish_result(&fin).await;
    let id = wanted.id.to_string();
    let run = env.sandfleet(&[
        "results",
        "tail",
        "--from",
        "first",
        "--task",
        &id,
        "--idle-timeout",
        "1s",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let attempts: Vec<(String, u64)> = run
        .lines
        .iter()
        .map(|l| {
            (
                l["task_id"].as_str().unwrap().to_owned(),
                l["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(attempts, vec![(id.clone(), 1), (id, 2)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn get_shows_every_attempt_with_steps_and_the_log_tail() {
    let env = Env::new().await;
    let t = task("acme/get");
    let mut first = result(&t, Outcome::Evicted, false, Utc::now());
    first.error = Some("the node was drained".to_owned());
    env.publish_result(&first).await;
    let mut last = result(&t, Outcome::Failed, true, Utc::now());
    last.attempt = 2;
    last.log_tail = (1..=100).map(|i| format!("log line {i}\n")).collect();
    last.steps = serde_json::from_value(serde_json::json!([
        {"name": "build", "exit_code": 0, "duration_ms": 1200},
        {"name": "test", "exit_code": 1, "duration_ms": 3400, "output_tail": "FAIL add"}
    ]))
    .unwrap();
    env.publish_result(&last).await;
    // A duplicate delivery of the final result (at least once) is shown once.
    env.publish_result(&last).await;
    let id = t.id.to_string();

    let out = Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args([
            "--prefix",
            &env.prefix,
            "results",
            "get",
            &id,
            "--log-lines",
            "3",
        ])
        .current_dir(env.dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("attempt 1: evicted (retrying"), "{text}");
    assert!(text.contains("error: the node was drained"), "{text}");
    assert_eq!(
        text.matches("attempt 2: failed (final, exit 1)").count(),
        1,
        "{text}"
    );
    assert!(
        text.contains("step test") && text.contains("exit 1"),
        "{text}"
    );
    assert!(
        text.contains("log line 100") && text.contains("log line 98"),
        "{text}"
    );
    assert!(
        !text.contains("log line 97\n"),
        "only the last 3 lines: {text}"
    );

    let run = env.sandfleet(&["results", "get", &id]);
    assert_eq!(run.lines.len(), 2, "{:?}", run.lines);

    // A task the stream has never seen: exit 1 and a message.
    let unknown = uuid::Uuid::new_v4().to_string();
    let run = env.sandfleet(&["results", "get", &unknown, "--idle-timeout", "1s"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("no results for task"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn get_follow_waits_for_the_final_result_then_exits() {
    let env = Env::new().await;
    let t = task("acme/follow");
    env.publish_result(&result(&t, Outcome::Evicted, false, Utc::now()))
        .await;
    let id = t.id.to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args([
            "--prefix",
            &env.prefix,
            "results",
            "get",
            &id,
            "--follow",
            "--idle-timeout",
            "1s",
        ])
        .current_dir(env.dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // It prints the attempt it has, and keeps waiting.
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("attempt 1: evicted"), "{first}");
    assert!(
        child.try_wait().unwrap().is_none(),
        "not final yet: still following"
    );
    let mut fin = result(&t, Outcome::Succeeded, true, Utc::now());
    fin.attempt = 2;
    env.publish_result(&fin).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "get --follow did not end at the final result"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(
        rest.iter()
            .any(|l| l.contains("attempt 2: succeeded (final")),
        "{rest:?}"
    );
}
