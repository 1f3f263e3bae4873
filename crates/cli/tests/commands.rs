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
