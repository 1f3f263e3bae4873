//! The local session backend against the shared scenario and its teardown paths.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use sandfleet_sandbox::session::local::workspace_of;
use sandfleet_sandbox::session::{
    LocalSessions, OutputChunk, RunOptions, Session, SessionBackend, SessionError, SessionSpec,
    conformance,
};
use tokio::time::Instant;

/// Waits (bounded) until `cond` holds.
async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn local_backend_passes_the_shared_scenario() {
    let backend = LocalSessions::new();
    let mut session = Session::start(Arc::new(backend.clone()), &conformance::spec("ignored"))
        .await
        .unwrap();
    let transcript = conformance::scenario(&session).await.unwrap();
    assert_eq!(transcript, conformance::expected());
    let ws = workspace_of(&backend, session.id()).unwrap();
    session.teardown().await.unwrap();
    session.teardown().await.unwrap();
    assert_eq!(backend.count(), 0);
    assert!(!ws.exists(), "teardown removes the workspace");
}

#[tokio::test]
async fn an_idle_session_ends_by_itself_but_a_running_command_keeps_it() {
    let backend = LocalSessions::new();
    let mut spec = SessionSpec::new("ignored");
    spec.idle_timeout = Duration::from_secs(1);
    let session = Session::start(Arc::new(backend.clone()), &spec)
        .await
        .unwrap();
    // A command longer than the idle timeout is activity, not idleness.
    let o = session
        .run("sleep 2; echo done", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(o.stdout, b"done\n");
    let ws = workspace_of(&backend, session.id()).unwrap();
    let id = session.detach();
    eventually(
        "the idle session and its workspace are gone",
        Duration::from_secs(5),
        || backend.count() == 0 && !ws.exists(),
    )
    .await;
    let err = backend
        .run(&id, "true", RunOptions::new(Duration::from_secs(1)), None)
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::NotFound(_)), "{err}");
}

#[tokio::test]
async fn max_lifetime_ends_a_busy_session_and_kills_its_command() {
    let backend = LocalSessions::new();
    let mut spec = SessionSpec::new("ignored");
    spec.max_lifetime = Duration::from_secs(1);
    let session = Session::start(Arc::new(backend.clone()), &spec)
        .await
        .unwrap();
    let started = Instant::now();
    let err = session
        .run("sleep 30", Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::NotFound(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn a_panic_in_the_callers_code_tears_the_session_down() {
    let backend = LocalSessions::new();
    let b = backend.clone();
    let joined = tokio::spawn(async move {
        let session = Session::start(Arc::new(b), &SessionSpec::new("ignored"))
            .await
            .unwrap();
        session.run("true", Duration::from_secs(5)).await.unwrap();
        panic!("the caller's code panics while holding the session");
    })
    .await;
    assert!(joined.is_err());
    eventually(
        "the dropped session is torn down",
        Duration::from_secs(5),
        || backend.count() == 0,
    )
    .await;
}

#[tokio::test]
async fn output_streams_while_the_command_runs() {
    let backend = Arc::new(LocalSessions::new());
    let mut session = Session::start(backend, &SessionSpec::new("ignored"))
        .await
        .unwrap();
    session
        .run("mkfifo go.fifo", Duration::from_secs(5))
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let run = session.run_streaming(
        "echo first; echo err >&2; read -r _ < go.fifo; echo second",
        RunOptions::new(Duration::from_secs(10)),
        tx,
    );
    let (out, ()) = tokio::join!(run, async {
        // Both lines arrive while the command still blocks on the fifo.
        let mut seen = Vec::new();
        while seen.len() < 2 {
            seen.push(rx.recv().await.unwrap());
        }
        assert!(seen.contains(&OutputChunk::Stdout("first\n".into())));
        assert!(seen.contains(&OutputChunk::Stderr("err\n".into())));
        session
            .run("echo go > go.fifo", Duration::from_secs(5))
            .await
            .unwrap();
    });
    let out = out.unwrap();
    assert_eq!(out.stdout, b"first\nsecond\n");
    assert_eq!(out.stderr, b"err\n");
    session.teardown().await.unwrap();
}
