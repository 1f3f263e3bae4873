//! `pods/exec` at the wire level: subprotocol negotiation, the channels, the
//! status object, stdin end in v5, and refusal of older subprotocols. The
//! production client (kube's `ws` feature) is covered by the session tests in
//! crates/sandbox; this speaks the protocol by hand, also as a v4-only client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{NS, running_pod_with, start};
use futures::{SinkExt as _, StreamExt as _};
use sandfleet_kube_sim::KubeSim;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// Starts a long-running pod with env `GREETING` and returns its name.
async fn running_pod(sim: &KubeSim, name: &str) -> String {
    let container = json!({
        "name": "main", "image": "busybox:1.36",
        "command": ["sh", "-c", "sleep 60"],
        "env": [{"name": "GREETING", "value": "hello"}],
    });
    running_pod_with(sim, name, container).await
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(
    sim: &KubeSim,
    pod: &str,
    query: &str,
    protocols: &str,
) -> Result<(Ws, String), String> {
    let url = format!(
        "ws://{}/api/v1/namespaces/{NS}/pods/{pod}/exec?{query}",
        sim.addr()
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    match tokio_tungstenite::client_async(req, tcp).await {
        Ok((ws, resp)) => {
            let proto = resp
                .headers()
                .get("Sec-WebSocket-Protocol")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            Ok((ws, proto))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Reads frames until the status; returns (stdout, stderr, status).
async fn collect(ws: &mut Ws) -> (Vec<u8>, Vec<u8>, Value) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(msg) = ws.next().await {
        if let Message::Binary(b) = msg.unwrap() {
            match b.first() {
                Some(1) => out.extend_from_slice(&b[1..]),
                Some(2) => err.extend_from_slice(&b[1..]),
                Some(3) => return (out, err, serde_json::from_slice(&b[1..]).unwrap()),
                _ => {}
            }
        }
    }
    panic!("the stream ended without a status");
}

fn cmd(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            format!(
                "command={}",
                form_urlencoded::byte_serialize(a.as_bytes()).collect::<String>()
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[tokio::test]
async fn a_v4_client_gets_channels_and_the_exit_code_in_the_status() {
    let sim = start().await;
    let pod = running_pod(&sim, "exec-v4").await;
    let query = format!(
        "{}&stdin=true&stdout=true&stderr=true",
        cmd(&[
            "sh",
            "-c",
            "read l; echo \"$GREETING $l\"; echo err >&2; exit 3"
        ])
    );
    let (mut ws, proto) = connect(&sim, &pod, &query, "v4.channel.k8s.io")
        .await
        .unwrap();
    assert_eq!(proto, "v4.channel.k8s.io");
    ws.send(Message::binary(b"\x00world\n".to_vec()))
        .await
        .unwrap();
    let (out, err, status) = collect(&mut ws).await;
    assert_eq!(out, b"hello world\n", "the container's env");
    assert_eq!(err, b"err\n");
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "NonZeroExitCode");
    assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "3");
}

#[tokio::test]
async fn v5_is_preferred_and_its_close_channel_ends_stdin() {
    let sim = start().await;
    let pod = running_pod(&sim, "exec-v5").await;
    let query = format!("{}&stdin=true&stdout=true", cmd(&["cat"]));
    let (mut ws, proto) = connect(&sim, &pod, &query, "v4.channel.k8s.io, v5.channel.k8s.io")
        .await
        .unwrap();
    assert_eq!(proto, "v5.channel.k8s.io");
    ws.send(Message::binary(b"\x00all of it".to_vec()))
        .await
        .unwrap();
    ws.send(Message::binary(vec![255, 0])).await.unwrap();
    let (out, _, status) = collect(&mut ws).await;
    assert_eq!(out, b"all of it");
    assert_eq!(status["status"], "Success");
}

#[tokio::test]
async fn older_subprotocols_and_missing_pods_are_refused() {
    let sim = start().await;
    let pod = running_pod(&sim, "exec-old").await;
    let query = format!("{}&stdout=true", cmd(&["true"]));
    let e = connect(&sim, &pod, &query, "channel.k8s.io")
        .await
        .unwrap_err();
    assert!(e.contains("400"), "{e}");
    let e = connect(&sim, "no-such-pod", &query, "v5.channel.k8s.io")
        .await
        .unwrap_err();
    assert!(e.contains("404"), "{e}");
}
