//! Intake and worker agree on the consumer-timeout budget, as real processes:
//! `sandfleet gateway` refuses a task whose deadline no default worker would
//! run, with the reason `sandfleet worker` gives when such a task reaches it
//! anyway (published past the intake), and accepts one that fits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::{Env, free_addr, task};
use sandfleet_amqp::OutgoingMessage;

const TOKEN: &str = "intake-test-token-0123456789";

/// A long-running `sandfleet` process, killed when dropped (also after a
/// failed assertion).
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> Process {
    Process(env.command(args, vars).spawn().unwrap())
}

/// Polls `cond` every 50 ms until it holds or `within` passes.
async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut cond: impl FnMut() -> F,
) {
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_refuses_what_the_worker_would_refuse_with_the_workers_reason() {
    let env = Env::new().await;
    let addr = free_addr();
    let _gateway = spawn(
        &env,
        &["gateway", "--listen", &addr],
        &[("SANDFLEET__GATEWAY__API_TOKENS", TOKEN)],
    );
    let http = reqwest::Client::new();
    let url = format!("http://{addr}");
    until("the gateway to be ready", Duration::from_secs(30), || {
        let req = http.get(format!("{url}/readyz")).send();
        async move { req.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;

    // 3600 s + 300 s pending does not fit a default worker's 1800 s less 60 s.
    let mut long = task("octo-org/octo-repo");
    long.sandbox.deadline_secs = 3600;
    let resp = http
        .post(format!("{url}/v1/tasks"))
        .bearer_auth(TOKEN)
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let refusal: serde_json::Value = resp.json().await.unwrap();
    let refusal = refusal["error"].as_str().unwrap().to_owned();
    assert!(
        refusal.contains("deadline_exceeds_consumer_timeout"),
        "{refusal}"
    );

    // What fits is accepted (and queued).
    let fits = task("octo-org/octo-repo");
    let resp = http
        .post(format!("{url}/v1/tasks"))
        .bearer_auth(TOKEN)
        .json(&fits)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    assert_eq!(env.take_tasks().await, [fits]);

    // The same task published past the intake: a default worker refuses it.
    let msg = OutgoingMessage::new(
        env.topology.tasks_exchange.as_str(),
        sandfleet_amqp::TASK_ROUTING_KEY,
        serde_json::to_vec(&long).unwrap(),
    )
    .message_id(long.id.to_string())
    .attempt(1);
    env.publisher.publish(&msg).await.unwrap();
    let _worker = spawn(&env, &["worker", "--http-addr", &free_addr()], &[]);
    until(
        "the worker to dead-letter it",
        Duration::from_secs(30),
        || {
            let depth = env.amqp.queue_depth(&env.topology.dead_queue);
            async move { depth.await.is_ok_and(|d| d == 1) }
        },
    )
    .await;
    let list = env.sandfleet(&["dlq", "list"]);
    assert_eq!(list.lines.len(), 1, "{list:?}");
    assert_eq!(list.lines[0]["code"], "deadline_exceeds_consumer_timeout");
    let reason = list.lines[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("deadline_secs 3600 + pending_timeout_secs 300 exceed"),
        "{reason}"
    );
    assert!(
        refusal.contains(reason),
        "the gateway gave the worker's reason:\n gateway: {refusal}\n worker: {reason}"
    );
    env.cleanup().await;
}
