//! `sandfleet replay` against the real RabbitMQ: from the dead-letter queue,
//! from the results stream (time window + repository filter), from a file;
//! dry runs send nothing and a repeated replay sends nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::Utc;
use common::{Env, result, task};
use sandfleet_proto::Outcome;

#[tokio::test(flavor = "multi_thread")]
async fn replay_from_file_is_idempotent_per_batch() {
    let env = Env::new().await;
    let a = task("octo-org/octo-repo");
    let b = task("someone/else");
    let failed = result(&a, Outcome::Failed, true, Utc::now());
    let file = env.dir.path().join("failed.jsonl");
    std::fs::write(
        &file,
        format!(
            "{}\n{}\n",
            serde_json::to_string(&failed).unwrap(),
            serde_json::to_string(&b).unwrap()
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap();

    let dry = env.sandfleet(&[
        "replay",
        "--from-file",
        file,
        "--repo",
        "octo-org/*",
        "--dry-run",
    ]);
    assert_eq!(dry.code, 0, "{dry:?}");
    assert_eq!(dry.summary()["would_send"], 1, "{dry:?}");
    assert_eq!(
        env.settled_depth(&env.topology.tasks_queue, 0).await,
        0,
        "a dry run sends nothing"
    );

    let first = env.sandfleet(&["replay", "--from-file", file, "--repo", "octo-org/*"]);
    assert_eq!(first.code, 0, "{first:?}");
    assert_eq!(first.summary()["sent"], 1, "{first:?}");
    let sent = first.with_status("sent");
    let tasks = env.take_tasks().await;
    assert_eq!(tasks.len(), 1);
    let replayed = &tasks[0];
    assert_eq!(replayed.replay_of, Some(a.id));
    assert_ne!(replayed.id, a.id);
    assert_eq!(replayed.id.get_version_num(), 7);
    assert_eq!(replayed.idempotency_key, format!("replay:{}:default", a.id));
    assert_eq!(sent[0]["task_id"], replayed.id.to_string());

    let again = env.sandfleet(&["replay", "--from-file", file, "--repo", "octo-org/*"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(
        again.summary()["sent"],
        0,
        "the same replay twice sends nothing: {again:?}"
    );
    assert_eq!(again.summary()["already_replayed"], 1);
    assert_eq!(env.settled_depth(&env.topology.tasks_queue, 0).await, 0);

    let new_batch = env.sandfleet(&[
        "replay",
        "--from-file",
        file,
        "--repo",
        "octo-org/*",
        "--batch",
        "second",
    ]);
    assert_eq!(new_batch.summary()["sent"], 1, "{new_batch:?}");
    let forced = env.sandfleet(&[
        "replay",
        "--from-file",
        file,
        "--repo",
        "octo-org/*",
        "--force",
    ]);
    assert_eq!(forced.summary()["sent"], 1, "{forced:?}");
    let keys: Vec<String> = env
        .take_tasks()
        .await
        .into_iter()
        .map(|t| t.idempotency_key)
        .collect();
    assert_eq!(
        keys,
        [
            format!("replay:{}:second", a.id),
            format!("replay:{}:default", a.id)
        ]
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_from_the_dlq_takes_the_dead_letters_out() {
    let env = Env::new().await;
    let a = task("octo-org/one");
    let b = task("octo-org/two");
    env.dead_letter(&a, "retries_exhausted", "3 attempts failed: node lost")
        .await;
    env.dead_letter(&b, "invalid", "steps[0].timeout_secs: too large")
        .await;

    let list = env.sandfleet(&["dlq", "list"]);
    assert_eq!(list.code, 0, "{list:?}");
    assert_eq!(list.lines.len(), 2, "{list:?}");
    assert_eq!(list.lines[0]["task_id"], a.id.to_string());
    assert_eq!(list.lines[0]["reason"], "3 attempts failed: node lost");
    assert_eq!(list.lines[1]["code"], "invalid");
    assert_eq!(
        env.settled_depth(&env.topology.dead_queue, 2).await,
        2,
        "listing leaves them in place"
    );

    let dry = env.sandfleet(&["replay", "--from-dlq", "--dry-run"]);
    assert_eq!(dry.summary()["would_send"], 2, "{dry:?}");
    assert_eq!(env.settled_depth(&env.topology.tasks_queue, 0).await, 0);
    assert_eq!(env.settled_depth(&env.topology.dead_queue, 2).await, 2);

    let only_one = env.sandfleet(&["replay", "--from-dlq", "--task", &a.id.to_string()]);
    assert_eq!(only_one.summary()["sent"], 1, "{only_one:?}");
    assert_eq!(
        env.settled_depth(&env.topology.dead_queue, 1).await,
        1,
        "the replayed dead letter is removed"
    );
    let tasks = env.take_tasks().await;
    assert_eq!(tasks[0].replay_of, Some(a.id));

    let again = env.sandfleet(&["replay", "--from-dlq", "--task", &a.id.to_string()]);
    assert_eq!(again.summary()["sent"], 0, "{again:?}");
    assert_eq!(env.settled_depth(&env.topology.tasks_queue, 0).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_from_results_honours_the_time_window_repository_and_outcome() {
    let env = Env::new().await;
    let now = Utc::now();
    let hour = chrono::Duration::hours(1);
    let in_window = task("octo-org/octo-repo");
    let too_old = task("octo-org/octo-repo");
    let other_repo = task("someone/else");
    let passed = task("octo-org/octo-repo");
    let retrying = task("octo-org/octo-repo");
    env.publish_result(&result(&too_old, Outcome::Failed, true, now - hour * 5))
        .await;
    env.publish_result(&result(&retrying, Outcome::InfraError, false, now - hour))
        .await;
    env.publish_result(&result(&in_window, Outcome::TimedOut, true, now - hour))
        .await;
    env.publish_result(&result(&other_repo, Outcome::Failed, true, now - hour))
        .await;
    env.publish_result(&result(&passed, Outcome::Succeeded, true, now - hour))
        .await;
    // At-least-once delivery: the same final result twice replays once.
    env.publish_result(&result(&in_window, Outcome::TimedOut, true, now - hour))
        .await;

    let args = [
        "replay",
        "--from-results",
        "--since",
        "3h",
        "--until",
        "10m",
        "--repo",
        "octo-org/*",
        "--idle-timeout",
        "1s",
    ];
    let dry = env.sandfleet(&[&args[..], &["--dry-run"]].concat());
    assert_eq!(dry.code, 0, "{dry:?}");
    assert_eq!(dry.summary()["would_send"], 1, "{dry:?}");
    assert_eq!(env.settled_depth(&env.topology.tasks_queue, 0).await, 0);

    let run = env.sandfleet(&args);
    assert_eq!(run.summary()["sent"], 1, "{run:?}");
    let tasks = env.take_tasks().await;
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].replay_of, Some(in_window.id));

    let again = env.sandfleet(&args);
    assert_eq!(again.summary()["sent"], 0, "{again:?}");
    assert_eq!(again.summary()["already_replayed"], 1);

    let only_failed = env.sandfleet(&[
        "replay",
        "--from-results",
        "--since",
        "3h",
        "--outcome",
        "failed",
        "--dry-run",
        "--idle-timeout",
        "1s",
    ]);
    assert_eq!(
        only_failed.summary()["would_send"],
        1,
        "only someone/else failed in the window: {only_failed:?}"
    );
    assert_eq!(
        only_failed.with_status("would_send")[0]["replay_of"],
        other_repo.id.to_string()
    );

    let tail = env.sandfleet(&[
        "results",
        "tail",
        "--from",
        "first",
        "--repo",
        "octo-org/*",
        "--final-only",
        "--idle-timeout",
        "1s",
    ]);
    assert_eq!(tail.code, 0, "{tail:?}");
    let outcomes: Vec<&str> = tail
        .lines
        .iter()
        .map(|l| l["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["failed", "timed_out", "succeeded", "timed_out"]);
    env.cleanup().await;
}
