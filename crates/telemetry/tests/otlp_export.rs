//! With an endpoint configured, spans reach an OTLP/HTTP collector.
//! (One test per file: `init` installs the process-global subscriber.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sandfleet_settings::{LogFormat, TelemetrySettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A request the fake collector received.
struct Received {
    request_line: String,
    headers: String,
    body: Vec<u8>,
}

/// A minimal HTTP/1.1 server that answers 200 to everything and reports
/// what it got.
async fn fake_collector() -> (String, mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 8192];
                    let n = conn.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < end + 4 + length {
                        let n = conn.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body = buf[end + 4..end + 4 + length].to_vec();
                    buf.drain(..end + 4 + length);
                    let (request_line, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
                    let _ = tx.send(Received {
                        request_line: request_line.to_owned(),
                        headers: headers.to_lowercase(),
                        body,
                    });
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                }
            });
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_http_when_an_endpoint_is_set() {
    let (url, mut received) = fake_collector().await;
    let settings = TelemetrySettings {
        log_format: LogFormat::Json,
        log_filter: "info".to_owned(),
        otlp_endpoint: Some(url),
        service_name: "sandfleet-telemetry-test".to_owned(),
    };
    let guard = sandfleet_telemetry::init(&settings).unwrap();
    assert!(guard.is_exporting());
    assert!(matches!(
        sandfleet_telemetry::init(&settings),
        Err(sandfleet_telemetry::TelemetryError::AlreadyInitialized)
    ));

    let span = tracing::info_span!("dispatch_task_for_export_test");
    let tp = sandfleet_telemetry::inject_traceparent(&span).unwrap();
    span.in_scope(|| tracing::info!("inside"));
    drop(span);
    guard.shutdown().await.unwrap();

    let got = tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await
        .expect("the collector received nothing within 10 s")
        .unwrap();
    assert_eq!(got.request_line, "POST /v1/traces HTTP/1.1");
    assert!(
        got.headers.contains("content-type: application/x-protobuf"),
        "{}",
        got.headers
    );
    let contains = |needle: &[u8]| got.body.windows(needle.len()).any(|w| w == needle);
    assert!(
        contains(b"dispatch_task_for_export_test"),
        "span name missing from the export"
    );
    assert!(
        contains(b"sandfleet-telemetry-test"),
        "service.name missing from the export"
    );
    // The protobuf carries the trace id as 16 raw bytes.
    let hex = sandfleet_telemetry::trace_id(&tp).unwrap();
    let raw: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert!(contains(&raw), "trace id {hex} missing from the export");
}
