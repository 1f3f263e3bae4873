//! `sandfleet console` as a process: it serves the pages from its settings
//! and stops on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;

#[tokio::test]
async fn the_console_serves_its_pages_and_stops_on_sigterm() {
    let env = Env::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args([
            "--prefix",
            &env.prefix,
            "console",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--worker",
            "http://127.0.0.1:1",
        ])
        .current_dir(env.dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let page = loop {
        if let Ok(r) = reqwest::get(format!("{base}/")).await
            && r.status().is_success()
        {
            let text = r.text().await.unwrap();
            // The first overview is gathered within a refresh.
            if text.contains(&format!("{}.tasks", env.prefix)) {
                break text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the console never served its overview"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The worker given with --worker is shown, and it cannot be reached.
    assert!(page.contains("http://127.0.0.1:1"), "{page}");
    assert!(page.contains("unreachable"), "{page}");
    let css = reqwest::get(format!("{base}/assets/console.css"))
        .await
        .unwrap();
    assert_eq!(css.status(), 200);
    assert!(css.text().await.unwrap().contains(":focus-visible"));

    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the console did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
    env.topology.delete(&env.amqp).await.unwrap();
}
