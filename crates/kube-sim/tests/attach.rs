//! `pods/attach` through kube's client (`Api::<Pod>::attach`), as the sessions
//! service calls it: the container's stdin stays open across attaches, output
//! from the attach on reaches the client, the container's end ends the attach
//! with a status, and faults, the cut switch and the request log see attaches
//! as attaches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{NS, client, client_with, eventually, running_pod_with, start};
use futures::SinkExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams, AttachedProcess};
use sandfleet_kube_sim::{FaultAction, FaultRule, KubeSim};
use serde_json::json;
use tokio::io::{
    AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, ReadHalf,
    SimplexStream, WriteHalf,
};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// Echoes each line it reads as `got <line>`; exits 0 at `exit` (or EOF).
const ECHO: &str =
    r#"echo started; while IFS= read -r l; do [ "$l" = exit ] && exit 0; echo "got $l"; done"#;

/// Starts a Job whose container runs `script` with `sh -c` (`stdin: true`
/// when `stdin`), waits until its pod runs and returns the pod's name.
async fn running_pod(sim: &KubeSim, name: &str, script: &str, stdin: bool) -> String {
    let container = json!({
        "name": "main", "image": "busybox:1.36",
        "command": ["sh", "-c", script],
        "stdin": stdin,
    });
    running_pod_with(sim, name, container).await
}

/// What the sessions service asks for.
fn params() -> AttachParams {
    AttachParams::default()
        .container("main")
        .stdin(true)
        .stdout(true)
        .stderr(false)
}

/// An attach with its stdin and stdout taken out; dropping it detaches.
struct Attached {
    process: AttachedProcess,
    stdin: WriteHalf<SimplexStream>,
    stdout: BufReader<ReadHalf<SimplexStream>>,
}

impl Attached {
    /// Writes `input` to stdin and reads one line of stdout.
    async fn round_trip(&mut self, input: &str) -> String {
        self.stdin.write_all(input.as_bytes()).await.unwrap();
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(5), self.stdout.read_line(&mut line))
            .await
            .expect("a line of output within 5 s")
            .unwrap();
        line
    }
}

async fn attach(sim: &KubeSim, pod: &str) -> Attached {
    let mut process = Api::<Pod>::namespaced(client(sim).await, NS)
        .attach(pod, &params())
        .await
        .unwrap();
    Attached {
        stdin: process.stdin().unwrap(),
        stdout: BufReader::new(process.stdout().unwrap()),
        process,
    }
}

async fn log_has(sim: &KubeSim, pod: &str, needle: &str) {
    eventually(5, needle, || async {
        sim.pod_log(NS, pod)
            .is_some_and(|l| l.contains(needle))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn stdin_stays_open_across_attaches() {
    let sim = start().await;
    let pod = running_pod(&sim, "att-reuse", ECHO, true).await;
    let mut first = attach(&sim, &pod).await;
    assert_eq!(first.round_trip("hello\n").await, "got hello\n");
    drop(first);
    eventually(5, "the first attach to end", || async {
        (sim.open_attach_streams() == 0).then_some(())
    })
    .await;
    let mut second = attach(&sim, &pod).await;
    assert_eq!(second.round_trip("again\n").await, "got again\n");
    log_has(&sim, &pod, "got hello\ngot again\n").await;
}

#[tokio::test]
async fn stdin_needs_stdin_true_in_the_spec() {
    let sim = start().await;
    let pod = running_pod(&sim, "att-nostdin", "sleep 60", false).await;
    let pods = Api::<Pod>::namespaced(client(&sim).await, NS);
    match pods.attach(&pod, &params()).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 400);
            assert!(s.message.contains("stdin is not enabled"), "{}", s.message);
        }
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("attached with stdin to a container without stdin"),
    }
    // Output only is fine.
    let out_only = AttachParams::default().container("main").stderr(false);
    pods.attach(&pod, &out_only).await.unwrap();
}

#[tokio::test]
async fn other_refusals_follow_the_api() {
    let sim = start().await;
    let pod = running_pod(&sim, "att-refuse", "sleep 60", true).await;
    let pods = Api::<Pod>::namespaced(client(&sim).await, NS);
    let code = |r: Result<AttachedProcess, kube::Error>| match r {
        Err(kube::Error::Api(s)) => s.code,
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("attached"),
    };
    assert_eq!(code(pods.attach("no-such-pod", &params()).await), 404);
    let wrong = params().container("sidecar");
    assert_eq!(code(pods.attach(&pod, &wrong).await), 400);
    // kube's client refuses these before sending them.
    let nothing = "container=main&stdin=false&stdout=false&stderr=false";
    let e = raw_attach_with(&sim, &pod, nothing, "v5.channel.k8s.io")
        .await
        .unwrap_err();
    assert!(e.contains("400"), "{e}");
    let e = raw_attach_with(&sim, &pod, "stdout=true", "channel.k8s.io")
        .await
        .unwrap_err();
    assert!(e.contains("400"), "{e}");
}

#[tokio::test]
async fn only_output_after_the_attach_reaches_it() {
    let sim = start().await;
    let pod = running_pod(&sim, "att-replay", ECHO, true).await;
    log_has(&sim, &pod, "started\n").await;
    let mut p = attach(&sim, &pod).await;
    assert_eq!(
        p.round_trip("x\n").await,
        "got x\n",
        "the line written before the attach is not replayed"
    );
    assert_eq!(sim.pod_log(NS, &pod).unwrap(), "started\ngot x\n");
}

#[tokio::test]
async fn the_containers_end_ends_the_attach_with_a_status() {
    let sim = start().await;
    let pod = running_pod(&sim, "att-exit", ECHO, true).await;
    let mut p = attach(&sim, &pod).await;
    let status = p.process.take_status().unwrap();
    p.stdin.write_all(b"last\nexit\n").await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), status)
        .await
        .expect("the status within 10 s")
        .expect("a status object");
    assert_eq!(status.status.as_deref(), Some("Success"));
    let mut out = String::new();
    p.stdout.read_to_string(&mut out).await.unwrap();
    assert_eq!(
        out, "got last\n",
        "output up to the end, then the stream ends"
    );
    eventually(5, "the attach to close", || async {
        (sim.open_attach_streams() == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_fault_rule_can_refuse_attaches_only() {
    let sim = start().await;
    let pod = running_pod(&sim, "att-fault", ECHO, true).await;
    sim.faults().inject(FaultRule::new(
        "*",
        "/attach",
        FaultAction::Status {
            code: 500,
            retry_after_secs: None,
        },
    ));
    let pods = Api::<Pod>::namespaced(client_with(&sim, false).await, NS);
    match pods.attach(&pod, &params()).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (500, "InternalError")),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("the fault rule let an attach through"),
    }
    let mut exec = pods
        .exec(
            &pod,
            ["echo", "exec works"],
            &AttachParams::default().stderr(false),
        )
        .await
        .unwrap();
    let mut out = String::new();
    exec.stdout()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    assert_eq!(out, "exec works\n");
}

#[tokio::test]
async fn the_request_log_tells_attach_from_exec() {
    let sim = start().await;
    let pod = running_pod(&sim, "att-log", ECHO, true).await;
    let mut p = attach(&sim, &pod).await;
    assert_eq!(p.round_trip("one\n").await, "got one\n");
    let log = sim.request_log();
    let count = |resource: &str| {
        log.iter()
            .filter(|r| r.resource() == resource && r.name() == Some(pod.as_str()))
            .count()
    };
    assert_eq!((count("pods/attach"), count("pods/exec")), (1, 0));
    let a = log.iter().find(|r| r.resource() == "pods/attach").unwrap();
    assert_eq!((a.verb(), a.status), ("get", 101));
    assert_eq!(a.query_param("container").as_deref(), Some("main"));
    assert_eq!(a.query_param("stdin").as_deref(), Some("true"));
}

#[tokio::test]
async fn the_cut_switch_drops_attaches_and_the_container_runs_on() {
    let sim = start().await;
    let pod = running_pod(&sim, "att-cut", ECHO, true).await;
    let mut p = attach(&sim, &pod).await;
    assert_eq!(p.round_trip("before\n").await, "got before\n");
    assert_eq!(sim.open_attach_streams(), 1);
    assert_eq!(sim.open_exec_streams(), 0, "counted apart from execs");
    let status = p.process.take_status().unwrap();
    sim.drop_exec_connections();
    let status = tokio::time::timeout(Duration::from_secs(5), status)
        .await
        .expect("the client sees the stream end");
    assert!(status.is_none(), "cut without a status: {status:?}");
    let mut again = attach(&sim, &pod).await;
    assert_eq!(again.round_trip("after\n").await, "got after\n");
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// An attach by hand, with `query` and `protocol` as given; `Err` holds the
/// refusal.
async fn raw_attach_with(
    sim: &KubeSim,
    pod: &str,
    query: &str,
    protocol: &str,
) -> Result<Ws, String> {
    let url = format!(
        "ws://{}/api/v1/namespaces/{NS}/pods/{pod}/attach?{query}",
        sim.addr()
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    match tokio_tungstenite::client_async(req, tcp).await {
        Ok((ws, _)) => Ok(ws),
        Err(e) => Err(e.to_string()),
    }
}

/// A stdin-only v5 attach by hand: kube's client sends at most 4 KiB per
/// frame, which a pipe writes atomically anyway; frames larger than the
/// pipe's buffer are what the stdin lock keeps whole.
async fn raw_attach(sim: &KubeSim, pod: &str) -> Ws {
    let query = "container=main&stdin=true&stdout=false&stderr=false";
    raw_attach_with(sim, pod, query, "v5.channel.k8s.io")
        .await
        .unwrap()
}

#[tokio::test]
async fn concurrent_attaches_write_whole_frames() {
    const LINE: usize = 200_000;
    let sim = start().await;
    let pod = running_pod(&sim, "att-many", "cat", true).await;
    let mut writers = Vec::new();
    for c in ['a', 'b', 'c', 'd'] {
        let mut ws = raw_attach(&sim, &pod).await;
        writers.push(tokio::spawn(async move {
            for _ in 0..3 {
                let mut frame = vec![0u8];
                frame.extend(std::iter::repeat_n(c as u8, LINE));
                frame.push(b'\n');
                ws.send(Message::binary(frame)).await.unwrap();
            }
            ws
        }));
    }
    let mut attached = Vec::new();
    for w in writers {
        attached.push(w.await.unwrap());
    }
    let log = eventually(20, "every line echoed", || async {
        let log = sim.pod_log(NS, &pod)?;
        (log.len() == 12 * (LINE + 1)).then_some(log)
    })
    .await;
    for line in log.lines() {
        let first = line.as_bytes()[0];
        assert!(
            line.len() == LINE && line.bytes().all(|b| b == first),
            "a torn line: {} bytes starting with {:?}",
            line.len(),
            first as char
        );
    }
    // A v5 close of stdin ends that attach's stdin, not the container's.
    let mut ws = attached.pop().unwrap();
    ws.send(Message::binary(vec![255, 0])).await.unwrap();
    drop(attached);
    let mut out = raw_attach(&sim, &pod).await;
    out.send(Message::binary(b"\x00still open\n".to_vec()))
        .await
        .unwrap();
    log_has(&sim, &pod, "still open\n").await;
    drop(ws);
}

#[tokio::test]
async fn stdin_once_closes_the_containers_stdin_when_the_first_attach_ends_it() {
    let sim = start().await;
    let container = json!({
        "name": "main", "image": "busybox:1.36",
        "command": ["sh", "-c", "cat; echo eof"],
        "stdin": true, "stdinOnce": true,
    });
    let pod = running_pod_with(&sim, "att-once", container).await;
    let mut ws = raw_attach(&sim, &pod).await;
    ws.send(Message::binary(b"\x00only\n".to_vec()))
        .await
        .unwrap();
    ws.send(Message::binary(vec![255, 0])).await.unwrap();
    log_has(&sim, &pod, "only\neof\n").await;
}
