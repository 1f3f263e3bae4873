//! Helpers shared by the sessions service's test files (each file is its own
//! crate and uses only some of them).
#![allow(dead_code)]

use std::time::Duration;

use sandfleet_sandbox::session::{OutputChunk, RunOptions, Session};
use tokio::time::Instant;

/// Waits until `cond` holds, polling every 25 ms; panics naming `what`
/// after `limit`.
pub(crate) async fn eventually<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A streamed command keeps stdout and stderr apart, in the result and in
/// the chunks sent while it runs.
pub(crate) async fn streams_stdout_and_stderr_apart(session: &Session) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let out = session
        .run_streaming(
            "echo one; echo two >&2",
            RunOptions::new(Duration::from_secs(10)),
            tx,
        )
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice()),
        (&b"one\n"[..], &b"two\n"[..])
    );
    let mut chunks = Vec::new();
    while let Ok(c) = rx.try_recv() {
        chunks.push(c);
    }
    assert!(
        chunks.contains(&OutputChunk::Stdout("one\n".into())),
        "{chunks:?}"
    );
}
