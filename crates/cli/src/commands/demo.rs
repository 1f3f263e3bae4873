//! `sandfleet demo`: three sample fix attempts through the whole pipeline in
//! one process.
//!
//! By default everything is embedded: the worker's in-memory broker, the local
//! executor (a child `/bin/sh` per task in a temp dir), the real dispatch loop
//! with its retry policy, and an in-memory result log. Nothing needs to be
//! installed. The three tasks are one that passes, one whose tests fail and
//! one whose test step runs past its timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sandfleet_proto::{Outcome, Provider, SandboxSpec, Source, Task, TaskId, TaskResult};
use sandfleet_sandbox::LocalExecutor;
use sandfleet_settings::Settings;
use sandfleet_worker::health::Health;
use sandfleet_worker::metrics::Metrics;
use sandfleet_worker::retry::RetryConfig;
use sandfleet_worker::{DispatchConfig, Dispatcher, InMemoryBroker, MemoryResults};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::args::DemoArgs;
use crate::exit::{CliError, CliResult, Exit};
use crate::output::Output;

/// One sample task and the outcome it must end with.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Short name shown in the output.
    pub name: &'static str,
    /// The task.
    pub task: Task,
    /// The outcome the pipeline must report.
    pub expected: Outcome,
}

fn source(name: &str) -> Source {
    Source {
        provider: Provider::Api,
        repository: format!("sandfleet-demo/{name}"),
        commit: "0000000000000000000000000000000000000000".to_owned(),
        git_ref: Some("main".to_owned()),
        ci_run_id: None,
        pull_request: None,
        url: None,
    }
}

fn sandbox() -> SandboxSpec {
    SandboxSpec {
        image: "docker.io/library/alpine:3.20".to_owned(),
        resources: Default::default(),
        env: BTreeMap::new(),
        deadline_secs: 120,
        pending_timeout_secs: 60,
    }
}

/// The three sample fix attempts. Each writes a tiny project into its
/// workspace (an input file) and runs build and test steps against it.
pub fn samples(timeout_secs: u64) -> Vec<Sample> {
    let mut passes = Task::fix_attempt(source("passes"), sandbox())
        .with_file("src/add.sh", "add() { echo $(( $1 + $2 )); }\n")
        .with_step("build", "sh -n src/add.sh && echo 'build ok'", 30)
        .with_step(
            "test",
            ". ./src/add.sh && test \"$(add 2 2)\" = 4 && echo '1 test passed'",
            30,
        );
    passes
        .labels
        .insert("sandfleet.dev/demo".to_owned(), "passes".to_owned());
    let mut fails = Task::fix_attempt(source("tests-fail"), sandbox())
        .with_file("src/add.sh", "add() { echo $(( $1 - $2 )); }\n")
        .with_step("build", "sh -n src/add.sh && echo 'build ok'", 30)
        .with_step(
            "test",
            ". ./src/add.sh && got=$(add 2 2) && if [ \"$got\" = 4 ]; then echo '1 test passed'; else echo \"add 2 2: expected 4, got $got\" >&2; exit 1; fi",
            30,
        );
    fails
        .labels
        .insert("sandfleet.dev/demo".to_owned(), "tests-fail".to_owned());
    let mut hangs = Task::fix_attempt(source("times-out"), sandbox())
        .with_step("build", "echo 'build ok'", 30)
        .with_step(
            "test",
            "echo 'waiting for a server that never answers'; sleep 600",
            timeout_secs,
        );
    hangs
        .labels
        .insert("sandfleet.dev/demo".to_owned(), "times-out".to_owned());
    // One attempt each: none of these outcomes is retryable anyway.
    for t in [&mut passes, &mut fails, &mut hangs] {
        t.retry.max_attempts = 1;
    }
    vec![
        Sample {
            name: "passes",
            task: passes,
            expected: Outcome::Succeeded,
        },
        Sample {
            name: "tests-fail",
            task: fails,
            expected: Outcome::Failed,
        },
        Sample {
            name: "times-out",
            task: hangs,
            expected: Outcome::TimedOut,
        },
    ]
}

/// Runs the demo: embedded, or against RabbitMQ when `rabbit` is set.
pub async fn run(a: &DemoArgs, settings: &Settings, rabbit: bool, out: Output) -> CliResult<Exit> {
    let samples = samples(a.timeout_secs.max(1));
    let wait = Duration::from_secs(a.timeout_secs.max(1) + 60);
    let results = if rabbit {
        crate::commands::demo_rabbit::run(&samples, settings, wait, out).await?
    } else {
        embedded(&samples, settings, wait, out).await?
    };
    report(&samples, &results, out)
}

/// The final result of each sample, in order.
async fn embedded(
    samples: &[Sample],
    settings: &Settings,
    wait: Duration,
    out: Output,
) -> CliResult<Vec<TaskResult>> {
    out.human("sandfleet demo: in-memory broker, local executor (/bin/sh), real dispatch loop and retry policy");
    let executor = LocalExecutor::new(settings.sandbox.local.clone())
        .map_err(|e| CliError::Usage(format!("the local executor cannot run here: {e}")))?;
    let broker = Arc::new(InMemoryBroker::new(Some(settings.topology.delivery_limit)));
    let results = MemoryResults::new();
    let mut rx = results.subscribe();
    let config = DispatchConfig {
        concurrency: 3,
        limits: settings.limits.clone(),
        consumer_timeout: Duration::from_secs(settings.limits.broker_consumer_timeout_secs),
        drain_timeout: Duration::from_secs(5),
        worker: "demo".to_owned(),
        retry: RetryConfig::new(&settings.retry, &settings.topology),
    };
    let dispatcher = Dispatcher::new(
        broker.clone(),
        Arc::new(executor),
        results.clone(),
        config,
        Arc::new(Metrics::new()),
        Arc::new(Health::new()),
    );
    let stop = CancellationToken::new();
    let loop_handle = tokio::spawn(dispatcher.run(stop.clone()));
    for s in samples {
        broker
            .publish_task(&s.task)
            .map_err(|e| CliError::Failed(format!("cannot encode sample {}: {e}", s.name)))?;
        out.human(format!("  enqueued {:<11} {}", s.name, s.task.id));
    }
    let ids: Vec<TaskId> = samples.iter().map(|s| s.task.id).collect();
    let mut finals: Vec<Option<TaskResult>> = vec![None; ids.len()];
    let collect = async {
        while finals.iter().any(Option::is_none) {
            match rx.recv().await {
                Ok(p) if p.result.is_final => {
                    if let Some(i) = ids.iter().position(|id| *id == p.result.task_id) {
                        finals[i] = Some(p.result);
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
    };
    let timed_out = tokio::time::timeout(wait, collect).await.is_err();
    stop.cancel();
    let _ = loop_handle.await;
    if timed_out {
        return Err(CliError::Failed(format!(
            "the demo did not finish within {wait:?}"
        )));
    }
    Ok(finals.into_iter().flatten().collect())
}

fn report(samples: &[Sample], results: &[TaskResult], out: Output) -> CliResult<Exit> {
    out.human("");
    out.human(format!(
        "{:<11} {:<10} {:>4}  {:<10} {:>8}  STEPS",
        "SAMPLE", "OUTCOME", "EXIT", "EXPECTED", "TIME"
    ));
    let mut all_ok = true;
    for (s, r) in samples.iter().zip(results) {
        let ok = r.outcome == s.expected;
        all_ok &= ok;
        let ms = r
            .started_at
            .map(|st| (r.finished_at - st).num_milliseconds().max(0))
            .unwrap_or_default();
        let steps: Vec<String> = r
            .steps
            .iter()
            .map(|st| {
                let what = if st.skipped {
                    "skipped".to_owned()
                } else if st.timed_out {
                    "timed out".to_owned()
                } else {
                    format!(
                        "exit {}",
                        st.exit_code
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "-".to_owned())
                    )
                };
                format!("{}: {what}", st.name)
            })
            .collect();
        out.emit(
            format!(
                "{:<11} {:<10} {:>4}  {:<10} {:>7.1}s  {}",
                s.name,
                r.outcome.as_str(),
                r.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".to_owned()),
                format!("{}{}", s.expected.as_str(), if ok { "" } else { " (!)" }),
                ms as f64 / 1000.0,
                steps.join(", ")
            ),
            &json!({ "sample": s.name, "expected": s.expected, "ok": ok, "result": r }),
        );
    }
    // The evidence for the two failures: the tail of the step that decided.
    for (s, r) in samples.iter().zip(results) {
        if let Some(step) = r
            .steps
            .iter()
            .rev()
            .find(|st| st.timed_out || st.exit_code.is_some_and(|c| c != 0))
        {
            let last = step
                .output_tail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            out.human(format!("  {} / {}: {}", s.name, step.name, last.trim()));
        }
    }
    if all_ok {
        out.human("\nall three outcomes as expected: the passing build succeeded, the failing tests are a final `failed` (not retried), the hung step `timed_out`.");
        Ok(Exit::Ok)
    } else {
        Err(CliError::Failed(
            "some demo outcomes differ from the expected ones".to_owned(),
        ))
    }
}
