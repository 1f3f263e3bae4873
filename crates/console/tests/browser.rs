//! The console in a real headless Chromium (driven through chromedriver,
//! Debian's `chromium` and `chromium-driver`), against a running console, a
//! real worker with the local executor and the real RabbitMQ. The same run
//! takes the screenshots: in cargo's temporary dir for integration tests
//! (`target/tmp/console/`), or, with `SANDFLEET_UPDATE_SCREENSHOTS=1`, over
//! the ones `docs/console/` shows. A test run leaves the work tree as it was.
//!
//! Missing chromium or chromedriver fails the test with what to install; it
//! never skips.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{Env, OPERATOR, VIEWER, free_port};
use fantoccini::{Client, ClientBuilder, Locator};

struct Driver {
    _child: tokio::process::Child,
    client: Client,
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(bin))
            .find(|f| f.is_file())
    })
}

async fn driver() -> Driver {
    let chromedriver = which("chromedriver").unwrap_or_else(|| {
        panic!(
            "chromedriver is not installed: the console's browser tests need Debian's \
             `chromium` and `chromium-driver` (sudo apt-get install chromium chromium-driver, \
             or run scripts/setup.sh)"
        )
    });
    let chromium = which("chromium").unwrap_or_else(|| {
        panic!(
            "chromium is not installed: the console's browser tests need Debian's \
             `chromium` and `chromium-driver` (sudo apt-get install chromium chromium-driver, \
             or run scripts/setup.sh)"
        )
    });
    let port = free_port();
    let child = tokio::process::Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let status = format!("http://127.0.0.1:{port}/status");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while reqwest::get(&status).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_owned(),
        serde_json::json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,900", "--hide-scrollbars"],
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .unwrap_or_else(|e| panic!("chromedriver could not start chromium: {e}"));
    Driver {
        _child: child,
        client,
    }
}

fn shots() -> PathBuf {
    let dir = if std::env::var_os("SANDFLEET_UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/console")
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console")
    };
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(shots().join(name), png).unwrap();
}

async fn wait_for(c: &Client, css: &str, secs: u64) -> fantoccini::elements::Element {
    c.wait()
        .at_most(Duration::from_secs(secs))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} did not appear within {secs}s: {e}"))
}

async fn sign_in(c: &Client, env: &Env, token: &str) {
    c.goto(&env.url("/login")).await.unwrap();
    let field = c.find(Locator::Css("input[name=token]")).await.unwrap();
    field.send_keys(token).await.unwrap();
    c.find(Locator::Css("form.login button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(c, "form[action='/logout']", 10).await;
}

async fn body_text(c: &Client) -> String {
    c.find(Locator::Css("body"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The fair-share panel's rows of `tenant` and `key` (their cells' text),
/// once the key's queued / running / served read `counts`. The figures are
/// gathered every second, each worker's `/tasks` and `/metrics` separately,
/// so the panel may lag the in-flight list by a refresh.
async fn fair_row(
    c: &Client,
    tenant: &str,
    key: &str,
    counts: [u64; 3],
) -> (Vec<String>, Vec<String>) {
    let want: Vec<String> = counts.iter().map(u64::to_string).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        // One call inside the page: the live section is re-rendered as
        // events arrive.
        let rows = c
            .execute(
                "const cells = sel => { const r = document.querySelector(sel);
                   return r ? Array.from(r.querySelectorAll('th, td'), d => d.innerText.trim()) : null; };
                 return [cells(arguments[0]), cells(arguments[1])];",
                vec![
                    serde_json::json!(format!("#live tr[data-fair-tenant='{tenant}']")),
                    serde_json::json!(format!("#live tr[data-fair-key='{key}']")),
                ],
            )
            .await
            .unwrap();
        let (t, k): (Option<Vec<String>>, Option<Vec<String>>) =
            serde_json::from_value(rows).unwrap();
        if let (Some(t), Some(k)) = (t, k)
            && k[2..] == want[..]
        {
            return (t, k);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fair-share panel never showed {key} with queued/running/served {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_a_task_run_and_requeues_a_dead_letter() {
    // The worker shares fairly (task queue shards), so the overview has its
    // fair-share panel.
    let env = Env::start_with(true, false, |s| s.topology.task_shards = 4).await;
    env.worker_ready().await;
    let d = driver().await;
    let c = &d.client;

    // The overview, live: mark the page, so a reload would be noticed.
    c.goto(&env.url("/")).await.unwrap();
    wait_for(c, "#live .card[data-queue='tasks']", 10).await;
    c.execute("window.__sameDocument = 'yes'; return true;", vec![])
        .await
        .unwrap();
    let task = common::task(
        "acme/widgets",
        &[
            ("build", "echo compiling widgets; sleep 6"),
            ("test", "echo 12 tests passed"),
        ],
    );
    let id = task.id;
    env.enqueue(&task).await;
    // It shows as in flight, with its sandbox and attempt...
    wait_for(c, &format!("#inflight-{id}"), 30).await;
    // Read in one call inside the page: the live section is re-rendered as
    // events arrive, so an element found by one WebDriver call can be
    // replaced before the next one reads it.
    let row = c
        .execute(
            "const r = document.querySelector(arguments[0]);
             return r ? [r.innerText, ...Array.from(r.querySelectorAll('td'), d => d.innerText)] : null;",
            vec![serde_json::json!(format!("#inflight-{id}"))],
        )
        .await
        .unwrap();
    let row: Vec<String> = serde_json::from_value(row).expect("the task is still in flight");
    assert!(row[0].contains("acme/widgets"), "{row:?}");
    assert_eq!(row[2].trim(), "1", "attempt");
    assert!(!row[3].trim().is_empty(), "sandbox");
    // The fair-share panel counts it under its tenant and key: running, and
    // served once.
    let fair = fair_row(c, "acme", "acme/widgets", [0, 1, 1]).await;
    assert_eq!(fair.0[0], "acme", "{fair:?}");
    assert_eq!(fair.1[1], "acme/widgets", "{fair:?}");
    screenshot(c, "overview.png").await;
    // ...then moves to the results, still without a reload.
    wait_for(c, &format!("#result-{id}-1"), 60).await;
    assert!(
        c.find_all(Locator::Css(&format!("#inflight-{id}")))
            .await
            .unwrap()
            .is_empty(),
        "a finished task is no longer in flight"
    );
    // Done: no longer running, still served once.
    fair_row(c, "acme", "acme/widgets", [0, 0, 1]).await;
    let same = c
        .execute("return window.__sameDocument || null;", vec![])
        .await
        .unwrap();
    assert_eq!(same, serde_json::json!("yes"), "the overview was reloaded");

    // Its page: every step with its exit code, the log tail. The link is
    // clicked inside the page: the live overview re-renders its lists as
    // events arrive, so an element found by one WebDriver call can be
    // replaced before the next one clicks it.
    let clicked = c
        .execute(
            "const a = document.querySelector(arguments[0]); if (a) { a.click(); } return !!a;",
            vec![serde_json::json!(format!("#result-{id}-1 a"))],
        )
        .await
        .unwrap();
    assert_eq!(
        clicked,
        serde_json::json!(true),
        "the result links to its task"
    );
    let build = wait_for(c, "tr.step[data-step='build'] td.exit", 10).await;
    assert_eq!(build.text().await.unwrap(), "0");
    let test = c
        .find(Locator::Css("tr.step[data-step='test'] td.exit"))
        .await
        .unwrap();
    assert_eq!(test.text().await.unwrap(), "0");
    let log = c.find(Locator::Css("pre.log")).await.unwrap();
    assert!(log.text().await.unwrap().contains("12 tests passed"));
    screenshot(c, "task.png").await;

    // The results page, filtered by repository.
    c.goto(&env.url("/results?repo=acme%2F*&window=1h"))
        .await
        .unwrap();
    wait_for(c, &format!("#result-{id}-1"), 10).await;
    screenshot(c, "results.png").await;

    // A dead letter, as the worker leaves one.
    let dead = common::task("acme/gadgets", &[("test", "echo requeued and passing")]);
    let dead_id = dead.id;
    env.dead_letter(
        &dead,
        "max_attempts",
        "gave up after 3 attempts: the node was lost",
    )
    .await;
    c.goto(&env.url("/dlq")).await.unwrap();
    let row = wait_for(c, &format!("#dlq-{dead_id}"), 10).await;
    assert!(row.text().await.unwrap().contains("the node was lost"));
    screenshot(c, "dlq.png").await;

    // Without a sign-in, the requeue button is refused.
    c.find(Locator::Css(&format!(
        "#dlq-{dead_id} input[type=checkbox]"
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    c.find(Locator::Css("button[value=selected]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(c, "p.error", 10).await;
    assert!(
        body_text(c)
            .await
            .contains("sign in with an operator token")
    );
    // A viewer is refused too.
    sign_in(c, &env, VIEWER).await;
    c.goto(&env.url("/dlq")).await.unwrap();
    wait_for(c, &format!("#dlq-{dead_id} input[type=checkbox]"), 10)
        .await
        .click()
        .await
        .unwrap();
    c.find(Locator::Css("button[value=selected]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(c, "p.error", 10).await;
    assert!(body_text(c).await.contains("viewer role"));
    c.goto(&env.url("/dlq")).await.unwrap();
    wait_for(c, &format!("#dlq-{dead_id}"), 10).await;

    // An operator requeues it with the button; it leaves the list and runs.
    c.find(Locator::Css("form[action='/logout'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(c, "a[href='/login']", 10).await;
    sign_in(c, &env, OPERATOR).await;
    c.goto(&env.url("/dlq")).await.unwrap();
    wait_for(c, &format!("#dlq-{dead_id} input[type=checkbox]"), 10)
        .await
        .click()
        .await
        .unwrap();
    c.find(Locator::Css("button[value=selected]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let notice = wait_for(c, "p.notice", 10).await;
    assert!(
        notice
            .text()
            .await
            .unwrap()
            .contains("1 requeued, 0 failed"),
        "{}",
        notice.text().await.unwrap()
    );
    assert!(
        c.find_all(Locator::Css(&format!("#dlq-{dead_id}")))
            .await
            .unwrap()
            .is_empty(),
        "the requeued letter left the list"
    );
    // It runs again as attempt 4 and its result reaches the console.
    c.goto(&env.url("/")).await.unwrap();
    wait_for(c, &format!("#result-{dead_id}-4"), 60).await;

    // A phone-sized overview.
    c.set_window_size(390, 844).await.unwrap();
    c.goto(&env.url("/")).await.unwrap();
    wait_for(c, "#live .card", 10).await;
    screenshot(c, "overview-phone.png").await;

    d.client.close().await.unwrap();
    env.cleanup().await;
}
