//! enqueue, dlq requeue/purge, topology and exit codes against the real RabbitMQ.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Env, task};

#[tokio::test(flavor = "multi_thread")]
async fn enqueue_prints_the_id_once_confirmed() {
    let env = Env::new().await;
    let t = task("octo-org/octo-repo");
    let file = env.dir.path().join("task.json");
    std::fs::write(&file, serde_json::to_vec(&t).unwrap()).unwrap();
    let run = env.sandfleet(&["enqueue", file.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.lines[0]["task_id"], t.id.to_string());
    let tasks = env.take_tasks().await;
    assert_eq!(tasks, [t]);

    let bad = env.dir.path().join("bad.json");
    std::fs::write(&bad, b"{\"schema_version\": 1}").unwrap();
    let run = env.sandfleet(&["enqueue", bad.to_str().unwrap()]);
    assert_eq!(run.code, 2, "an invalid task is a usage error: {run:?}");

    let down = env.sandfleet(&[
        "--amqp-url",
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "enqueue",
        file.to_str().unwrap(),
    ]);
    assert_eq!(down.code, 3, "broker unavailable: {down:?}");
    let bad_and_down = env.sandfleet(&[
        "--amqp-url",
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "enqueue",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(
        bad_and_down.code, 2,
        "a bad task is reported before connecting: {bad_and_down:?}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_requeue_moves_the_selection_and_purge_needs_confirmation() {
    let env = Env::new().await;
    let a = task("octo-org/one");
    let b = task("octo-org/two");
    let c = task("octo-org/three");
    for t in [&a, &b, &c] {
        env.dead_letter(t, "retries_exhausted", "node lost three times")
            .await;
    }
    let run = env.sandfleet(&["dlq", "requeue", "--task", &a.id.to_string()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(env.settled_depth(&env.topology.dead_queue, 2).await, 2);
    let tasks = env.take_tasks().await;
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].id, a.id, "requeue keeps the task id");

    let run = env.sandfleet(&["dlq", "purge"]);
    assert_eq!(run.code, 2, "no --yes and no terminal: refused: {run:?}");
    assert_eq!(env.settled_depth(&env.topology.dead_queue, 2).await, 2);
    let run = env.sandfleet(&["dlq", "purge", "--yes"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.lines[0]["purged"], 2);
    assert_eq!(env.settled_depth(&env.topology.dead_queue, 0).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn topology_check_reports_a_missing_topology() {
    let env = Env::new().await;
    let run = env.sandfleet(&["topology", "check"]);
    assert_eq!(run.code, 0, "{run:?}");
    let missing = env.sandfleet_prefixed("sf-clitest-never-applied", &["topology", "check"]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(
        missing
            .lines
            .iter()
            .any(|l| l["finding"].as_str().is_some_and(|f| f.contains("missing"))),
        "{missing:?}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_list_reads_the_brokers_x_death_header() {
    let env = Env::new().await;
    let t = task("octo-org/octo-repo");
    let producer = sandfleet_producer::Producer::with_amqp(
        &env.amqp,
        env.topology.clone(),
        sandfleet_proto::Limits::default(),
        false,
    )
    .await
    .unwrap();
    producer.enqueue(&t).await.unwrap();
    // A consumer rejects it: the task queue dead-letters it through the broker.
    let mut c = sandfleet_amqp::Consumer::start(
        &env.amqp,
        sandfleet_amqp::ConsumerOptions::new(&env.topology.tasks_queue, 1),
    )
    .await
    .unwrap();
    let d = tokio::time::timeout(std::time::Duration::from_secs(5), c.next_delivery())
        .await
        .unwrap()
        .unwrap();
    d.reject().await.unwrap();
    c.cancel();
    assert_eq!(env.settled_depth(&env.topology.dead_queue, 1).await, 1);
    let list = env.sandfleet(&["dlq", "list"]);
    assert_eq!(list.code, 0, "{list:?}");
    let row = &list.lines[0];
    assert_eq!(row["task_id"], t.id.to_string());
    assert_eq!(row["death_count"], 1, "{row}");
    assert_eq!(
        row["code"], "rejected",
        "the x-death reason when no sandfleet code: {row}"
    );
    assert_eq!(row["from_queue"], env.topology.tasks_queue, "{row}");
    env.cleanup().await;
}

/// Runs `sandfleet <args>` on a pseudo-terminal (util-linux `script`), typing `input`.
fn on_a_terminal(env: &Env, args: &str, input: &str) -> (i32, String) {
    use std::io::Write;
    let cmd = format!(
        "{} --prefix {} {args}",
        env!("CARGO_BIN_EXE_sandfleet"),
        env.prefix
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(env.dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("util-linux `script` runs the CLI on a pseudo-terminal");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_purge_asks_on_a_terminal() {
    let env = Env::new().await;
    env.dead_letter(&task("octo-org/one"), "invalid", "bad")
        .await;
    let (code, screen) = on_a_terminal(&env, "dlq purge", "no\n");
    assert_eq!(code, 1, "{screen}");
    assert!(
        screen.contains("Type 'purge' to confirm") && screen.contains("not purged"),
        "{screen}"
    );
    assert_eq!(env.settled_depth(&env.topology.dead_queue, 1).await, 1);
    let (code, screen) = on_a_terminal(&env, "dlq purge", "purge\n");
    assert_eq!(code, 0, "{screen}");
    assert!(screen.contains("purged 1 messages"), "{screen}");
    assert_eq!(env.settled_depth(&env.topology.dead_queue, 0).await, 0);
    env.cleanup().await;
}

/// Before `topology apply`, enqueue says what is missing and what creates it,
/// with its own exit code, and no Rust debug text.
#[tokio::test(flavor = "multi_thread")]
async fn enqueue_before_the_topology_exists_says_to_apply_it() {
    let env = Env::new().await;
    let t = task("octo-org/octo-repo");
    let file = env.dir.path().join("task.json");
    std::fs::write(&file, serde_json::to_vec(&t).unwrap()).unwrap();
    let prefix = format!("{}-never-applied", env.prefix);
    let run = env.sandfleet_prefixed(&prefix, &["enqueue", file.to_str().unwrap()]);
    assert_eq!(run.code, 5, "topology missing: {run:?}");
    let error = run.lines[0]["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("exchange '{prefix}.tasks' does not exist"))
            && error.contains("sandfleet topology apply"),
        "{error}"
    );
    assert!(
        !run.stderr.contains("Some(") && !run.stderr.contains("unconfirmed"),
        "no debug text: {}",
        run.stderr
    );
    env.cleanup().await;
}

/// A task no default worker would run (deadline + pending timeout over the
/// consumer-timeout budget) is refused before connecting, with the worker's
/// reason; raising the shared budget setting lets it through.
#[tokio::test(flavor = "multi_thread")]
async fn enqueue_refuses_a_deadline_no_worker_would_run() {
    let env = Env::new().await;
    let args = [
        "enqueue",
        "--repo",
        "octo-org/octo-repo",
        "--commit",
        "3484a3fb",
        "--step",
        "test=make test",
        "--deadline",
        "3600",
    ];
    let run = env.sandfleet(&args);
    assert_eq!(run.code, 2, "{run:?}");
    let error = run.lines[0]["error"].as_str().unwrap();
    assert!(
        error.contains(
            "deadline_secs 3600 + pending_timeout_secs 300 exceed the broker consumer timeout (1800 s, minus a 60 s margin)"
        ) && error.contains("deadline_exceeds_consumer_timeout"),
        "{error}"
    );
    assert_eq!(env.settled_depth(&env.topology.tasks_queue, 0).await, 0);

    let config = env.dir.path().join("sandfleet.toml");
    std::fs::write(&config, "[limits]\nbroker_consumer_timeout_secs = 7200\n").unwrap();
    let run = env.sandfleet(&[&["--config", config.to_str().unwrap()][..], &args].concat());
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(env.take_tasks().await.len(), 1);
    env.cleanup().await;
}

/// `--since 100000000d` was a panic (exit 101); now it is a usage error.
#[tokio::test(flavor = "multi_thread")]
async fn absurd_durations_are_usage_errors() {
    let env = Env::new().await;
    for args in [
        &[
            "replay",
            "--from-results",
            "--since",
            "100000000d",
            "--dry-run",
        ][..],
        &["results", "tail", "--since", "99999999999999999999s"][..],
    ] {
        let run = env.sandfleet(args);
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(
            run.stderr.contains("invalid time") && !run.stderr.contains("panicked"),
            "{}",
            run.stderr
        );
    }
    env.cleanup().await;
}

/// A dead letter without a task id is listed under a `raw-` handle that
/// stays the same between listings and that `dlq requeue --task` takes; the
/// table's columns fit their content.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_dead_letters_are_addressable_and_the_table_fits() {
    let env = Env::new().await;
    let long_code = "deadline_exceeds_consumer_timeout";
    let t = task("octo-org/octo-repo");
    env.dead_letter(&t, long_code, "does not fit").await;
    let garbage = sandfleet_amqp::OutgoingMessage::new(
        "",
        env.topology.dead_queue.as_str(),
        b"not json at all".to_vec(),
    )
    .header("x-sandfleet-reject-code", "malformed_json");
    env.publisher.publish(&garbage).await.unwrap();

    // Rows are found by content: a returned message's place in a quorum
    // queue is not part of the contract.
    let raw_handle = |run: &common::Run| -> String {
        let raw: Vec<&serde_json::Value> = run
            .lines
            .iter()
            .filter(|l| l["task_id"].is_null())
            .collect();
        assert_eq!(raw.len(), 1, "{run:?}");
        raw[0]["handle"].as_str().unwrap().to_owned()
    };
    let list = env.sandfleet(&["dlq", "list"]);
    assert_eq!(list.code, 0, "{list:?}");
    assert_eq!(list.lines.len(), 2, "{list:?}");
    let handle = raw_handle(&list);
    assert!(handle.starts_with("raw-") && handle.len() == 16, "{handle}");
    assert!(
        list.lines.iter().any(|l| l["handle"] == t.id.to_string()),
        "{list:?}"
    );
    let again = env.sandfleet(&["dlq", "list"]);
    assert_eq!(raw_handle(&again), handle, "stable");

    // The human table: every row's columns start where the header's do.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args(["--prefix", &env.prefix, "dlq", "list"])
        .current_dir(env.dir.path())
        .env_clear()
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let col = |l: &str, word: &str| l.find(word).unwrap_or_else(|| panic!("{word} in {l}"));
    let attempt_end = col(lines[0], "ATTEMPT") + "ATTEMPT".len();
    let task_row = lines.iter().find(|l| l.contains(long_code)).unwrap();
    let raw_row = lines.iter().find(|l| l.contains(&handle)).unwrap();
    assert!(task_row.contains(&format!("{long_code}  ")), "{text}");
    assert_eq!(col(task_row, long_code), col(lines[0], "CODE"), "{text}");
    assert_eq!(
        col(task_row, " 3 ") + 2,
        attempt_end,
        "right-aligned: {text}"
    );
    assert_eq!(col(raw_row, &handle), 0, "{text}");
    assert_eq!(
        col(raw_row, "malformed_json"),
        col(lines[0], "CODE"),
        "{text}"
    );

    let run = env.sandfleet(&["dlq", "requeue", "--task", &handle]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.lines[0]["requeued"], handle.as_str());
    assert_eq!(env.settled_depth(&env.topology.dead_queue, 1).await, 1);
    let missing = env.sandfleet(&["dlq", "requeue", "--task", "raw-000000000000"]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(
        missing.stderr.contains("raw-000000000000 is not in"),
        "{missing:?}"
    );
    env.cleanup().await;
}

/// `dlq requeue --help` says what requeue does to the attempt number, and
/// requeue does it.
#[tokio::test(flavor = "multi_thread")]
async fn dlq_requeue_raises_the_attempt_as_its_help_says() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args(["dlq", "requeue", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(!help.contains("attempt reset"), "{help}");
    assert!(help.contains("raised by one, not reset"), "{help}");

    let env = Env::new().await;
    let t = task("octo-org/octo-repo");
    env.dead_letter(&t, "max_attempts", "3 attempts failed")
        .await; // attempt 3
    let run = env.sandfleet(&["dlq", "requeue", "--task", &t.id.to_string()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.lines[0]["attempt"], 4, "{run:?}");
    let mut c = sandfleet_amqp::Consumer::start(
        &env.amqp,
        sandfleet_amqp::ConsumerOptions::new(&env.topology.tasks_queue, 1),
    )
    .await
    .unwrap();
    let d = tokio::time::timeout(std::time::Duration::from_secs(5), c.next_delivery())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.attempt(), Some(4));
    d.ack().await.unwrap();
    c.cancel();
    env.cleanup().await;
}

/// `topology delete` refuses without confirmation off a terminal, refuses
/// (deleting nothing) while a queue holds messages, and with --force removes
/// every queue and exchange of the prefix; a second delete finds nothing.
#[tokio::test(flavor = "multi_thread")]
async fn topology_delete_needs_confirmation_and_refuses_non_empty_queues_unless_forced() {
    let env = Env::new().await;
    let unconfirmed = env.sandfleet(&["topology", "delete"]);
    assert_eq!(unconfirmed.code, 2, "{unconfirmed:?}");
    assert!(unconfirmed.stderr.contains("--yes"), "{unconfirmed:?}");

    env.dead_letter(&task("octo-org/one"), "invalid", "bad")
        .await;
    let refused = env.sandfleet(&["topology", "delete", "--yes"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains(&format!("{} (1 message)", env.topology.dead_queue))
            && refused.stderr.contains("Nothing was deleted"),
        "{refused:?}"
    );
    let check = env.sandfleet(&["topology", "check"]);
    assert_eq!(check.code, 0, "still all there: {check:?}");

    let forced = env.sandfleet(&["topology", "delete", "--yes", "--force"]);
    assert_eq!(forced.code, 0, "{forced:?}");
    let deleted: Vec<&str> = forced
        .lines
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    for name in [
        &env.topology.tasks_queue,
        &env.topology.dead_queue,
        &env.topology.results_stream,
        &env.topology.tasks_exchange,
    ] {
        assert!(deleted.contains(&name.as_str()), "{name}: {forced:?}");
    }
    assert_eq!(
        env.amqp.queue_depth(&env.topology.tasks_queue).await.ok(),
        None,
        "gone"
    );
    let check = env.sandfleet(&["topology", "check"]);
    assert_eq!(check.code, 1, "{check:?}");

    let again = env.sandfleet(&["topology", "delete", "--yes"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(again.lines.last().unwrap()["deleted_total"], 0, "{again:?}");
    env.cleanup().await;
}

/// On an empty topology, `topology delete --yes` needs no --force.
#[tokio::test(flavor = "multi_thread")]
async fn topology_delete_of_an_unused_prefix_needs_no_force() {
    let env = Env::new().await;
    let run = env.sandfleet(&["topology", "delete", "--yes"]);
    assert_eq!(run.code, 0, "{run:?}");
    let total = run.lines.last().unwrap()["deleted_total"].as_u64().unwrap();
    assert!(total >= 6, "queues and exchanges: {run:?}");
    env.cleanup().await;
}
