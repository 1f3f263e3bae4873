//! The scenario every session backend must pass with identical results (the
//! local backend, the Kubernetes backend on kube-sim, and the HTTP service
//! through its client), in the spirit of vector's component compliance
//! tests. [`scenario`] returns a [`Transcript`] of what a user would see;
//! each backend's test asserts it equals [`expected`].

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Session, SessionError, SessionSpec};

/// What the scenario observed, step by step, without timings.
pub type Transcript = Vec<String>;

/// The spec the scenario starts its session with.
pub fn spec(image: &str) -> SessionSpec {
    let mut spec = SessionSpec::new(image);
    // Shell metacharacters in a value must arrive byte for byte.
    spec.env = BTreeMap::from([
        (
            "GREETING".to_owned(),
            "hello $USER `id` ; $(x) 'q' \"dq\"".to_owned(),
        ),
        ("EMPTY".to_owned(), String::new()),
    ]);
    spec.working_dir = "src/app".into();
    spec.idle_timeout = Duration::from_secs(120);
    spec.max_lifetime = Duration::from_secs(600);
    spec
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the scenario on a started session.
pub async fn scenario(session: &Session) -> Result<Transcript, SessionError> {
    let mut t = Transcript::new();
    let ten = Duration::from_secs(10);

    session
        .write_file("input.txt", b"line one\n", 0o644)
        .await?;
    let o = session
        .run(
            "cat input.txt; printf '%s\\n' \"$GREETING\" \"[$EMPTY]\"; basename \"$PWD\"; echo oops >&2",
            ten,
        )
        .await?;
    t.push(format!(
        "read: exit={} timed_out={} stdout={:?} stderr={:?}",
        o.exit_code,
        o.timed_out,
        show(&o.stdout),
        show(&o.stderr)
    ));

    let all: Vec<u8> = (0..=255u8).collect();
    session.write_file("bin/all.bin", &all, 0o600).await?;
    let o = session
        .run(
            "wc -c < bin/all.bin | tr -d ' '; ls -l bin/all.bin | cut -c1-10",
            ten,
        )
        .await?;
    t.push(format!("binary on disk: {:?}", show(&o.stdout)));
    let back = session.read_file("bin/all.bin", 4096).await?;
    t.push(format!(
        "binary back: len={} same={} truncated={}",
        back.bytes.len(),
        back.bytes == all,
        back.truncated
    ));
    let head = session.read_file("bin/all.bin", 10).await?;
    t.push(format!(
        "binary head: {:?} truncated={}",
        head.bytes, head.truncated
    ));

    session
        .write_file("tool.sh", b"#!/bin/sh\necho \"tool $1\"\nexit 7\n", 0o755)
        .await?;
    let o = session.run("./tool.sh arg", ten).await?;
    t.push(format!(
        "failing: exit={} stdout={:?}",
        o.exit_code,
        show(&o.stdout)
    ));

    let o = session
        .run(
            "sleep 30 & echo $! > child.pid; echo started; sleep 30",
            Duration::from_secs(1),
        )
        .await?;
    t.push(format!(
        "timeout: timed_out={} stdout={:?}",
        o.timed_out,
        show(&o.stdout)
    ));
    let o = session
        .run(
            // A killed child may linger as a zombie where PID 1 does not reap: look at its state.
            "s=$(sed 's/.*) //' /proc/\"$(cat child.pid)\"/stat 2>/dev/null | cut -c1); \
             case \"$s\" in ''|Z|X) echo child gone ;; *) echo child alive ;; esac",
            ten,
        )
        .await?;
    t.push(format!(
        "after timeout: exit={} stdout={:?}",
        o.exit_code,
        show(&o.stdout)
    ));

    let big = session.run("yes x | head -c 3000000", ten).await?;
    t.push(format!(
        "bounded: kept={} truncated={}",
        big.stdout.len(),
        big.stdout_truncated
    ));

    match session.read_file("no/such/file", 10).await {
        Err(SessionError::File { message, .. }) => t.push(format!("missing: {message}")),
        other => t.push(format!("missing: unexpected {other:?}")),
    }
    Ok(t)
}

/// What every backend must report.
pub fn expected() -> Transcript {
    vec![
        "read: exit=0 timed_out=false stdout=\"line one\\nhello $USER `id` ; $(x) 'q' \\\"dq\\\"\\n[]\\napp\\n\" stderr=\"oops\\n\"".to_owned(),
        "binary on disk: \"256\\n-rw-------\\n\"".to_owned(),
        "binary back: len=256 same=true truncated=false".to_owned(),
        "binary head: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] truncated=true".to_owned(),
        "failing: exit=7 stdout=\"tool arg\\n\"".to_owned(),
        "timeout: timed_out=true stdout=\"started\\n\"".to_owned(),
        "after timeout: exit=0 stdout=\"child gone\\n\"".to_owned(),
        format!("bounded: kept={} truncated=true", 1 << 20),
        "missing: no such file".to_owned(),
    ]
}
