//! The console keeps working when the broker closes its connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Env;

async fn page_contains(env: &Env, path: &str, needle: &str, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(r) = reqwest::get(env.url(path)).await
            && r.status().is_success()
            && r.text().await.unwrap_or_default().contains(needle)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never showed {needle} within {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn results_keep_arriving_after_the_broker_closes_the_consoles_connections() {
    let env = Env::start(false, false).await;
    let before = common::task("acme/before", &[("test", "exit 1")]);
    env.publish_result(&common::failed_result(&before)).await;
    page_contains(&env, "/results", &before.id.to_string(), 20).await;
    let dead = common::task("acme/dead", &[("test", "true")]);
    env.dead_letter(&dead, "max_attempts", "gave up").await;
    page_contains(&env, "/dlq", &dead.id.to_string(), 20).await;

    // The fault: the broker drops every connection the console holds,
    // among them the one its results-stream consumer reads on. The
    // management API lists connections and consumers a few seconds late:
    // wait until it shows the console's consumer on the stream.
    let mgmt = env.amqp.management();
    // The console's results-stream consumer: its tag (unique per
    // subscription) when the broker lists it.
    let reader = || async {
        mgmt.queue_consumers(&env.topology.results_stream)
            .await
            .unwrap()
            .into_iter()
            .find(|c| {
                c.tag.starts_with("sandfleet-console-results")
                    && c.connection.starts_with(&env.console_connections)
            })
            .map(|c| c.tag)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let cut = loop {
        if let Some(c) = reader().await {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the management API never showed the console's stream consumer"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let closed = mgmt
        .close_connections_named(&env.console_connections)
        .await
        .unwrap();
    assert!(closed >= 1, "the console had no connection to close");

    // A result published after the cut reaches the console, the one read
    // before is shown once, and the dead letters are read again.
    let after = common::task("acme/after", &[("test", "exit 1")]);
    env.publish_result(&common::failed_result(&after)).await;
    page_contains(&env, "/results", &after.id.to_string(), 30).await;
    let page = reqwest::get(env.url("/results?repo=acme%2Fbefore"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        page.matches(&format!("id=\"result-{}-1\"", before.id))
            .count(),
        1,
        "a result read again after the reconnect is shown once"
    );
    page_contains(&env, "/dlq", &dead.id.to_string(), 30).await;
    // The stream is read by a new subscription.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match reader().await {
            Some(c) if c != cut => break,
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the console's stream consumer never came back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The overview's queue depths come back too (no "?" for an unknown depth).
    page_contains(&env, "/", "data-queue=\"dead letters\"><span class=\"label\">dead letters</span><span class=\"value\">1<", 30).await;
    env.cleanup().await;
}
