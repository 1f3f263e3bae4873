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

/// The scenario: a replay from the results stream whose replays fail
/// again. The second run sees the originals' failures and the replays' own
/// failures; every one stands for a build already replayed in this batch, so
/// it sends nothing, and a dry run says so too.
#[tokio::test(flavor = "multi_thread")]
async fn replaying_the_same_failures_twice_sends_nothing_though_the_replays_failed_again() {
    let env = Env::new().await;
    let now = Utc::now();
    let builds: Vec<_> = (0..4).map(|_| task("acme/batch")).collect();
    for b in &builds {
        env.publish_result(&result(
            b,
            Outcome::Failed,
            true,
            now - chrono::Duration::minutes(30),
        ))
        .await;
    }
    let args = [
        "replay",
        "--from-results",
        "--since",
        "1h",
        "--outcome",
        "failed",
        "--repo",
        "acme/batch",
        "--idle-timeout",
        "1s",
    ];
    let first = env.sandfleet(&args);
    assert_eq!(first.code, 0, "{first:?}");
    assert_eq!(first.summary()["sent"], 4, "{first:?}");
    let replays = env.take_tasks().await;
    assert_eq!(replays.len(), 4);

    // The replays ran and failed again: new results, under the replays' ids.
    for r in &replays {
        env.publish_result(&result(r, Outcome::Failed, true, Utc::now()))
            .await;
    }

    let dry = env.sandfleet(&[&args[..], &["--dry-run"]].concat());
    assert_eq!(dry.code, 0, "{dry:?}");
    assert_eq!(dry.summary()["would_send"], 0, "{dry:?}");
    assert_eq!(dry.summary()["matched"], 4, "one per build: {dry:?}");
    assert_eq!(dry.summary()["already_replayed"], 4, "{dry:?}");

    let again = env.sandfleet(&args);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(again.summary()["sent"], 0, "{again:?}");
    assert_eq!(again.summary()["already_replayed"], 4, "{again:?}");
    assert_eq!(env.settled_depth(&env.topology.tasks_queue, 0).await, 0);

    // On purpose, under a new batch: each build once more, and the replay of
    // a replay still points at the build it stands for.
    let new_batch = env.sandfleet(&[&args[..], &["--batch", "second"]].concat());
    assert_eq!(new_batch.summary()["sent"], 4, "{new_batch:?}");
    let mut origins: Vec<_> = env
        .take_tasks()
        .await
        .iter()
        .map(|t| t.replay_of.unwrap())
        .collect();
    let mut expected: Vec<_> = builds.iter().map(|b| b.id).collect();
    origins.sort();
    expected.sort();
    assert_eq!(origins, expected);
    env.cleanup().await;
}

/// A dry run makes the producer's checks: a dead letter the real run would
/// fail to enqueue (an unknown schema version) is reported as failing, the
/// dry run's counts and exit status are the real run's, and the real run
/// leaves that dead letter where it is.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_from_the_dlq_reports_what_the_real_run_does() {
    let env = Env::new().await;
    let good = task("octo-org/one");
    let mut newer = task("octo-org/two");
    newer.schema_version = 2;
    env.dead_letter(&good, "max_attempts", "3 attempts failed")
        .await;
    env.dead_letter(&newer, "unknown_schema_version", "schema_version 2")
        .await;

    let dry = env.sandfleet(&["replay", "--from-dlq", "--dry-run"]);
    assert_eq!(dry.summary()["would_send"], 1, "{dry:?}");
    assert_eq!(dry.summary()["would_fail"], 1, "{dry:?}");
    assert_eq!(dry.code, 4, "a partial failure, as the real run: {dry:?}");
    let failing = dry.with_status("would_fail");
    assert_eq!(failing[0]["replay_of"], newer.id.to_string());
    assert!(
        failing[0]["error"]
            .as_str()
            .unwrap()
            .contains("schema_version"),
        "{dry:?}"
    );
    assert_eq!(env.settled_depth(&env.topology.dead_queue, 2).await, 2);

    let real = env.sandfleet(&["replay", "--from-dlq"]);
    assert_eq!(real.code, dry.code, "{real:?}");
    assert_eq!(real.summary()["sent"], dry.summary()["would_send"]);
    assert_eq!(real.summary()["failed"], dry.summary()["would_fail"]);
    assert_eq!(env.take_tasks().await.len(), 1);
    assert_eq!(
        env.settled_depth(&env.topology.dead_queue, 1).await,
        1,
        "the one that failed stays dead-lettered"
    );
    env.cleanup().await;
}
