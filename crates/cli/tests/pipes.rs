//! The binary under real use at the end of a pipe: a reader that goes away
//! (`| head -1`, `| grep -q`) ends the command promptly and quietly, with
//! its usual status, never a panic (101) or a hang; signals still work with a
//! closed stderr; log lines are plain text when stderr is not a terminal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{Env, result, task};
use sandfleet_amqp::OutgoingMessage;
use sandfleet_proto::Outcome;

/// `sandfleet --prefix <prefix> <args>` with stdout and stderr both on one
/// pipe (`2>&1 |`); returns the child and the pipe's read end.
fn spawn_into_pipe(env: &Env, prefix: &str, args: &[&str]) -> (Child, std::io::PipeReader) {
    let (reader, writer) = std::io::pipe().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args(["--prefix", prefix])
        .args(args)
        .current_dir(env.dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .unwrap();
    // The Command held the write ends; it is gone, so only the child writes.
    (child, reader)
}

/// The exit code within `within`, or None (the child is killed then).
fn exit_within(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn first_line(reader: std::io::PipeReader) -> String {
    let mut line = String::new();
    BufReader::new(reader).read_line(&mut line).unwrap();
    line
}

#[tokio::test(flavor = "multi_thread")]
async fn topology_check_into_head_1_exits_promptly_with_its_status() {
    let env = Env::new().await;
    let missing = format!("{}-missing", env.prefix);
    // `sandfleet topology check 2>&1 | head -1`
    let (mut child, reader) = spawn_into_pipe(&env, &missing, &["topology", "check"]);
    let line = first_line(reader); // ... and the reader is gone.
    assert!(
        line.contains("missing"),
        "the first line is the command's own answer, not a library's log line: {line:?}"
    );
    let code = exit_within(&mut child, Duration::from_secs(10));
    assert_eq!(
        code,
        Some(1),
        "topology check on a missing topology exits 1 (differs), also when its reader left early"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_that_leaves_at_once_neither_hangs_nor_panics_the_command() {
    let env = Env::new().await;
    let missing = format!("{}-missing", env.prefix);
    // `sandfleet topology check 2>&1 | true`: nothing is read at all.
    for args in [&["topology", "check"][..], &["results", "tail"][..]] {
        let prefix = if args[0] == "topology" {
            &missing
        } else {
            &env.prefix
        };
        let (mut child, reader) = spawn_into_pipe(&env, prefix, args);
        drop(reader);
        let code = exit_within(&mut child, Duration::from_secs(10));
        let expected = if args[0] == "topology" { 1 } else { 0 };
        assert_eq!(code, Some(expected), "sandfleet {args:?} | true");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn results_tail_follow_into_head_1_exits_without_waiting_for_another_result() {
    let env = Env::new().await;
    let t = task("acme/pipes");
    env.publish_result(&result(&t, Outcome::Failed, true, Utc::now()))
        .await;
    // `sandfleet results tail --follow --from first | head -1`
    let (mut child, reader) = spawn_into_pipe(
        &env,
        &env.prefix,
        &["results", "tail", "--follow", "--from", "first"],
    );
    let line = first_line(reader);
    assert!(
        line.starts_with("FINISHED"),
        "the header comes first: {line:?}"
    );
    // No further result arrives: the command notices its reader left by
    // itself, not at a next write.
    let started = Instant::now();
    let code = exit_within(&mut child, Duration::from_secs(5));
    assert_eq!(
        code,
        Some(0),
        "a follow ended by its reader is a normal end"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_still_stops_a_follow_whose_stderr_is_closed() {
    let env = Env::new().await;
    let (reader, writer) = std::io::pipe().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args(["--prefix", &env.prefix, "results", "tail", "--follow"])
        .current_dir(env.dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdout(Stdio::null())
        .stderr(writer)
        .spawn()
        .unwrap();
    drop(reader);
    // Let it subscribe: a stream consumer shows up in the management API.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mgmt = env.amqp.management();
    loop {
        let q = mgmt.queue(&env.topology.results_stream).await.unwrap();
        if q.and_then(|q| q.consumers).unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the follow never subscribed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    // Its "received SIGTERM" message goes to the closed stderr, quietly.
    assert_eq!(exit_within(&mut child, Duration::from_secs(10)), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn log_lines_are_plain_text_when_stderr_is_not_a_terminal() {
    let env = Env::new().await;
    let junk = OutgoingMessage::new(
        env.topology.results_exchange.as_str(),
        "failed.final",
        b"not a result".to_vec(),
    );
    env.publisher.publish(&junk).await.unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args([
            "--prefix",
            &env.prefix,
            "results",
            "tail",
            "--from",
            "first",
        ])
        .args(["--idle-timeout", "1s"])
        .current_dir(env.dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let mut stderr = String::new();
    out.stderr.as_slice().read_to_string(&mut stderr).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("skipping a message"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "no ANSI escapes in a pipe: {stderr:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn topology_check_says_what_is_missing_without_library_errors() {
    let env = Env::new().await;
    let missing = format!("{}-missing", env.prefix);
    let out = Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args(["--prefix", &missing, "topology", "check"])
        .current_dir(env.dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout.contains(&format!("missing queue '{missing}.tasks'")),
        "{stdout}"
    );
    assert!(stdout.contains("sandfleet topology apply"), "{stdout}");
    // The expected 404s are the answer, not errors: no lapin "Channel closed" lines.
    assert!(
        !stderr.contains("ERROR") && !stderr.contains("lapin"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn library_log_lines_into_a_closed_pipe_neither_panic_nor_hang() {
    let env = Env::new().await;
    let missing = format!("{}-missing", env.prefix);
    // With lapin's own lines on (an ERROR for each expected 404), logging
    // goes on after the reader left: from lapin's I/O thread too.
    let (mut child, reader) = spawn_into_pipe(
        &env,
        &missing,
        &["--log", "warn,lapin=error", "topology", "check"],
    );
    let _ = first_line(reader);
    assert_eq!(
        exit_within(&mut child, Duration::from_secs(10)),
        Some(1),
        "exit 1 (differs): not 101 (a panic), not a hang"
    );
}
