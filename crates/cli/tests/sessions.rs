//! `sandfleet shell` and `sandfleet session ...` as a user runs them: the
//! binary against the local backend, and against a sessions service on kube-sim.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use sandfleet_kube_sim::{KubeSim, SimOptions};
use sandfleet_sandbox::session::KubeSessions;
use sandfleet_sessions::auth::Tokens;
use sandfleet_sessions::{Limits, Service};
use sandfleet_settings::KubernetesSettings;
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn sandfleet(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Out {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("sandfleet finished")
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn shell_runs_typed_commands_and_tears_down_at_eof() {
    let out = sandfleet(
        &[
            "shell",
            "--local",
            "--image",
            "any",
            "--env",
            "WHO=agent",
            "--workdir",
            "src",
        ],
        &[],
        b"echo \"hi $WHO\"; echo oops >&2\nbasename \"$PWD\"\nfalse\n",
    )
    .await;
    assert_eq!(out.stdout, "hi agent\nsrc\n", "{}", out.stderr);
    assert!(out.stderr.contains("oops"), "{}", out.stderr);
    assert!(out.stderr.contains("[exit 1]"), "{}", out.stderr);
    assert!(out.stderr.contains("torn down"), "{}", out.stderr);
    assert_eq!(out.code, 1, "the last command failed");
}

#[tokio::test]
async fn session_commands_drive_the_service() {
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let settings = KubernetesSettings {
        namespace: "sessions-cli".into(),
        ..KubernetesSettings::default()
    };
    let backend =
        KubeSessions::from_kubeconfig_yaml(&sim.kubeconfig_yaml("sessions-cli"), settings)
            .await
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let service = Service::new(
        backend,
        Tokens::from_tokens(["cli-token"]),
        Limits::default(),
    );
    tokio::spawn(service.run(listener, Duration::from_secs(1), stop.clone()));
    let env = [
        ("SANDFLEET_SESSIONS_URL", url.as_str()),
        ("SANDFLEET_SESSIONS_TOKEN", "cli-token"),
    ];

    let created = sandfleet(
        &["--json", "session", "create", "--image", "img"],
        &env,
        b"",
    )
    .await;
    assert_eq!(created.code, 0, "{}", created.stderr);
    let info: serde_json::Value = serde_json::from_str(created.stdout.trim()).unwrap();
    let id = info["id"].as_str().unwrap().to_owned();

    let up = sandfleet(
        &["session", "cp", "-", &format!("{id}:notes/a.txt")],
        &env,
        b"from stdin\n",
    )
    .await;
    assert_eq!(up.code, 0, "{}", up.stderr);
    let run = sandfleet(
        &["session", "exec", &id, "--", "cat", "notes/a.txt"],
        &env,
        b"",
    )
    .await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "from stdin\n"),
        "{}",
        run.stderr
    );
    let fail = sandfleet(&["session", "exec", &id, "--", "exit 3"], &env, b"").await;
    assert_eq!(fail.code, 1);
    assert!(fail.stderr.contains("exit code 3"), "{}", fail.stderr);
    let json = sandfleet(
        &["--json", "session", "exec", &id, "--", "echo out; exit 4"],
        &env,
        b"",
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(json.stdout.trim()).unwrap();
    assert_eq!(
        (v["exit_code"].as_i64(), v["stdout"].as_str()),
        (Some(4), Some("out\n"))
    );
    let down = sandfleet(
        &["session", "cp", &format!("{id}:notes/a.txt"), "-"],
        &env,
        b"",
    )
    .await;
    assert_eq!(down.stdout, "from stdin\n");
    let ls = sandfleet(&["session", "ls"], &env, b"").await;
    assert!(ls.stdout.contains(&id), "{}", ls.stdout);
    let rm = sandfleet(&["session", "rm", &id], &env, b"").await;
    assert_eq!(rm.code, 0, "{}", rm.stderr);
    let wrong = sandfleet(
        &["session", "ls"],
        &[
            ("SANDFLEET_SESSIONS_URL", url.as_str()),
            ("SANDFLEET_SESSIONS_TOKEN", "nope"),
        ],
        b"",
    )
    .await;
    assert_eq!(wrong.code, 1, "an unknown token is refused");
    assert!(wrong.stderr.contains("401"), "{}", wrong.stderr);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !sim.jobs("sessions-cli").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session job is left"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.cancel();
}

#[tokio::test]
async fn ctrl_c_tears_the_shell_session_down() {
    use tokio::io::AsyncBufReadExt as _;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandfleet"))
        .args(["shell", "--local", "--image", "any"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Keep stdin open: only the signal ends the shell.
    let _stdin = child.stdin.take().unwrap();
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.contains("ready") {
                return line;
            }
        }
        panic!("the shell ended before it was ready");
    })
    .await
    .unwrap();
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let rest = tokio::time::timeout(Duration::from_secs(30), async {
        let mut rest = String::new();
        while let Some(line) = stderr.next_line().await.unwrap() {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    })
    .await
    .unwrap();
    let code = child.wait().await.unwrap().code();
    assert!(rest.contains("torn down"), "{ready}\n{rest}");
    assert_eq!(code, Some(0), "{rest}");
}
