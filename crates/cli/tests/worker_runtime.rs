//! `sandfleet worker` runs its async runtime on `worker.runtime_threads`
//! threads (one by default), or on tokio's default with 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;

/// The worker's runtime threads once it is ready (`/readyz` 200), as its
/// `/metrics` say (`sandfleet_runtime_threads`); the worker is killed
/// afterwards.
fn runtime_threads_of_a_ready_worker(env: &Env, vars: &[(&str, &str)]) -> i64 {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args(["--prefix", &env.prefix, "worker", "--http-addr", &addr])
        .current_dir(env.dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(vars.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&addr, "/readyz").map(|(status, _)| status) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the worker was not ready in 30 s"
        );
        assert!(child.try_wait().unwrap().is_none(), "the worker exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, metrics) = get(&addr, "/metrics").expect("/metrics answers");
    child.kill().unwrap();
    child.wait().unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("sandfleet_runtime_threads "))
        .expect("sandfleet_runtime_threads in /metrics")
        .trim()
        .parse()
        .unwrap()
}

/// GET `path` from `addr`: the status code and the whole response.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    stream.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, buf))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_runs_on_one_runtime_thread_unless_configured_otherwise() {
    let env = Env::new().await;
    assert_eq!(runtime_threads_of_a_ready_worker(&env, &[]), 1, "default");
    assert_eq!(
        runtime_threads_of_a_ready_worker(&env, &[("SANDFLEET__WORKER__RUNTIME_THREADS", "3")]),
        3
    );
    // 0: tokio's default, which TOKIO_WORKER_THREADS sets.
    assert_eq!(
        runtime_threads_of_a_ready_worker(
            &env,
            &[
                ("SANDFLEET__WORKER__RUNTIME_THREADS", "0"),
                ("TOKIO_WORKER_THREADS", "2")
            ]
        ),
        2
    );
    env.cleanup().await;
}
