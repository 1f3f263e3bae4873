//! `sandfleet worker` runs its async runtime on `worker.runtime_threads`
//! threads (one by default), or on tokio's default with 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::{Env, free_addr, http_get, http_status};

/// The worker's runtime threads once it is ready (`/readyz` 200), as its
/// `/metrics` say (`sandfleet_runtime_threads`); the worker is killed
/// afterwards.
fn runtime_threads_of_a_ready_worker(env: &Env, vars: &[(&str, &str)]) -> i64 {
    let addr = free_addr();
    let mut child: Child = env
        .command(&["worker", "--http-addr", &addr], vars)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_status(&addr, "/readyz") != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the worker was not ready in 30 s"
        );
        assert!(child.try_wait().unwrap().is_none(), "the worker exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, metrics) = http_get(&addr, "/metrics").expect("/metrics answers");
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
