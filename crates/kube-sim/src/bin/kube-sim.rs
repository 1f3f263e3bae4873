//! Runs kube-sim as a standalone process, for poking at it with `kubectl get --raw` or
//! pointing a separately started worker at it.
//!
//! `kube-sim [--addr 127.0.0.1:6443] [--namespace default] [--kubeconfig FILE] [--pod-start-ms MS] [--kueue-quota N]`
//! writes a kubeconfig for the server (to FILE, or to stderr) and serves until Ctrl-C.
//! `--pod-start-ms` is the simulated create → Running delay of a pod (default 20;
//! 2000 models a node with the image present). `--kueue-quota N` simulates Kueue:
//! suspended Jobs labelled `kueue.x-k8s.io/queue-name` are admitted in FIFO order,
//! at most N admitted and unfinished per queue.

use std::net::SocketAddr;
use std::process::ExitCode;

use sandfleet_kube_sim::{KubeSim, SimOptions};

const USAGE: &str = "usage: kube-sim [--addr HOST:PORT] [--namespace NS] [--kubeconfig FILE] [--pod-start-ms MS] [--kueue-quota N]";

#[tokio::main]
async fn main() -> ExitCode {
    let mut addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut namespace = "default".to_owned();
    let mut kubeconfig = None;
    let mut options = SimOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "--addr" | "--namespace" | "--kubeconfig" | "--pod-start-ms" | "--kueue-quota" => {
                args.next()
            }
            "-h" | "--help" => {
                eprintln!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        };
        let Some(value) = value else {
            eprintln!("{arg} needs a value\n{USAGE}");
            return ExitCode::from(2);
        };
        match arg.as_str() {
            "--addr" => match value.parse() {
                Ok(a) => addr = a,
                Err(e) => {
                    eprintln!("--addr {value:?}: {e}");
                    return ExitCode::from(2);
                }
            },
            "--namespace" => namespace = value,
            "--pod-start-ms" => match value.parse() {
                Ok(ms) => options.pod_start_delay = std::time::Duration::from_millis(ms),
                Err(e) => {
                    eprintln!("--pod-start-ms {value:?}: {e}");
                    return ExitCode::from(2);
                }
            },
            "--kueue-quota" => match value.parse::<usize>() {
                Ok(n) if n > 0 => options.kueue_quota = Some(n),
                Ok(_) => {
                    eprintln!("--kueue-quota must be at least 1");
                    return ExitCode::from(2);
                }
                Err(e) => {
                    eprintln!("--kueue-quota {value:?}: {e}");
                    return ExitCode::from(2);
                }
            },
            _ => kubeconfig = Some(value),
        }
    }
    let sim = match KubeSim::start(SimOptions { addr, ..options }).await {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let yaml = sim.kubeconfig_yaml(&namespace);
    match &kubeconfig {
        Some(path) => {
            if let Err(e) = std::fs::write(path, &yaml) {
                eprintln!("writing {path}: {e}");
                return ExitCode::FAILURE;
            }
            eprintln!("kube-sim serving {} (kubeconfig: {path})", sim.url());
        }
        None => eprintln!("kube-sim serving {}\n---\n{yaml}", sim.url()),
    }
    let _ = tokio::signal::ctrl_c().await;
    sim.stop().await;
    ExitCode::SUCCESS
}
