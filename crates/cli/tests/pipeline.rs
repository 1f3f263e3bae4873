//! The whole pipeline with the real processes: a signed GitHub webhook into
//! `sandfleet gateway`, the task through RabbitMQ to `sandfleet worker`
//! (local executor), the result on the results stream. Proves that event
//! values reach the sandbox as env vars and are never run as shell.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;
use sandfleet_gateway::signature::github_signature;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(env: &Env, config: &std::path::Path, args: &[&str]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_sandfleet"))
            .args([
                "--prefix",
                &env.prefix,
                "--config",
                config.to_str().unwrap(),
            ])
            .args(args)
            .current_dir(env.dir.path())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A raw HTTP/1.1 request; the status code and body.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_workflow_run_becomes_a_sandbox_run_with_event_values_as_env_vars() {
    let env = Env::new().await;
    let marker = env.dir.path().join("pwned");
    let config = env.dir.path().join("sandfleet.toml");
    std::fs::write(
        &config,
        r#"
[gateway]
github_secret = "s3cret"
allowed_repositories = ["octo-org/*"]

[gateway.template]
image = "docker.io/library/alpine:3.20"
deadline_secs = 60
max_attempts = 1

[[gateway.template.steps]]
name = "show"
run = 'echo "repo=$SANDFLEET_REPOSITORY commit=$SANDFLEET_COMMIT ref=$SANDFLEET_REF"'
timeout_secs = 10
"#,
    )
    .unwrap();
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let _worker = spawn(&env, &config, &["worker", "--http-addr", "127.0.0.1:0"]);
    let _gateway = spawn(&env, &config, &["gateway", "--listen", &addr]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(&addr, "GET", "/readyz", &[], b"").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "the gateway never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A failed run on a branch whose name is a shell injection attempt.
    let hostile = format!("main$(touch {})", marker.display());
    let path = format!(
        "{}/tests/fixtures/workflow_run.completed.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut event: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    event["workflow_run"]["conclusion"] = "failure".into();
    event["workflow_run"]["head_branch"] = hostile.clone().into();
    let body = serde_json::to_vec(&event).unwrap();
    let sig = github_signature(b"s3cret", &body);
    let headers = [
        ("X-GitHub-Event", "workflow_run"),
        ("X-GitHub-Delivery", "pipeline-1"),
        ("X-Hub-Signature-256", sig.as_str()),
        ("Content-Type", "application/json"),
    ];
    let (status, resp) = http(&addr, "POST", "/webhooks/github", &headers, &body).unwrap();
    assert_eq!(status, 202, "{resp}");
    let task_id = serde_json::from_str::<serde_json::Value>(&resp).unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The final result, from the results stream.
    let deadline = Instant::now() + Duration::from_secs(30);
    let result = loop {
        let tail = env.sandfleet(&[
            "results",
            "tail",
            "--from",
            "first",
            "--final-only",
            "--idle-timeout",
            "1s",
        ]);
        if let Some(r) = tail.lines.iter().find(|l| l["task_id"] == task_id.as_str()) {
            break r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no result for {task_id}: {tail:?}"
        );
    };
    assert_eq!(result["outcome"], "succeeded", "{result}");
    let log = result["log_tail"].as_str().unwrap().to_owned()
        + result["steps"][0]["output_tail"].as_str().unwrap_or("");
    assert!(
        log.contains("repo=octo-org/octo-repo commit=3484a3fb816e0859fd6e1cea078d76385ff50625"),
        "{log}"
    );
    assert!(
        log.contains(&format!("ref={hostile}")),
        "the branch name arrives verbatim: {log}"
    );
    assert!(!marker.exists(), "an event value was executed as shell");

    // The gateway timed the webhook and says which build it runs.
    let (status, metrics) = http(&addr, "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            "sandfleet_gateway_request_duration_seconds_count{route=\"/webhooks/github\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sandfleet_build_info{") && l.contains("component=\"gateway\"")),
        "{metrics}"
    );

    // `results get` tells the task's story from the stream.
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args(["--prefix", &env.prefix, "results", "get", &task_id])
        .current_dir(env.dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let story = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(0), "{story}");
    assert!(
        story.contains("attempt 1: succeeded (final, exit 0)"),
        "{story}"
    );
    assert!(
        story.contains("repo=octo-org/octo-repo"),
        "the log tail: {story}"
    );
    env.cleanup().await;
}
