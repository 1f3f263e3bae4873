//! `sandfleet enqueue`: one task from a file, stdin, or flags.

use std::collections::BTreeMap;
use std::io::Read;

use sandfleet_gateway::template::{ENV_COMMIT, ENV_REF, ENV_REPOSITORY};
use sandfleet_gateway::{SinkError, TaskSink};
use sandfleet_proto::{Provider, SandboxSpec, Source, Step, Task};
use sandfleet_settings::Settings;
use serde_json::json;

use crate::args::EnqueueArgs;
use crate::exit::{CliError, CliResult, Exit};
use crate::output::Output;

/// Parses `KEY=VALUE`.
fn pair(s: &str, what: &str) -> CliResult<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(CliError::Usage(format!(
            "{what} {s:?}: expected NAME=VALUE"
        ))),
    }
}

/// The task the flags describe (or the file/stdin holds), with the
/// `--tenant` / `--fairness-key` given (`docs/fairness.md`).
pub fn build(a: &EnqueueArgs, settings: &Settings) -> CliResult<Task> {
    let mut task = build_task(a, settings)?;
    if a.tenant.is_some() || a.fairness_key.is_some() {
        let current = task.fairness.take().unwrap_or_default();
        task.fairness = Some(sandfleet_proto::Fairness {
            tenant: a.tenant.clone().or(current.tenant),
            key: a.fairness_key.clone().or(current.key),
        });
    }
    Ok(task)
}

fn build_task(a: &EnqueueArgs, settings: &Settings) -> CliResult<Task> {
    if let Some(path) = &a.file {
        let text = if path.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| CliError::Usage(format!("stdin: {e}")))?;
            s
        } else {
            std::fs::read_to_string(path)
                .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?
        };
        return serde_json::from_str(&text)
            .map_err(|e| CliError::Usage(format!("{}: not a task: {e}", path.display())));
    }
    let (Some(repo), Some(commit)) = (&a.repo, &a.commit) else {
        return Err(CliError::Usage(
            "give a task file (or - for stdin), or --repo, --commit and at least one --step"
                .to_owned(),
        ));
    };
    if a.steps.is_empty() {
        return Err(CliError::Usage(
            "at least one --step NAME=COMMAND is needed".to_owned(),
        ));
    }
    let mut env = BTreeMap::new();
    for e in &a.env {
        let (k, v) = pair(e, "--env")?;
        env.insert(k, v);
    }
    // The same names the gateway uses, so one template serves both.
    env.insert(ENV_REPOSITORY.to_owned(), repo.clone());
    env.insert(ENV_COMMIT.to_owned(), commit.clone());
    if let Some(r) = &a.git_ref {
        env.insert(ENV_REF.to_owned(), r.clone());
    }
    let source = Source {
        provider: Provider::Api,
        repository: repo.clone(),
        commit: commit.clone(),
        git_ref: a.git_ref.clone(),
        ci_run_id: None,
        pull_request: None,
        url: None,
    };
    let sandbox = SandboxSpec {
        image: a
            .image
            .clone()
            .unwrap_or_else(|| settings.gateway.template.image.clone()),
        resources: Default::default(),
        env,
        deadline_secs: a.deadline,
        pending_timeout_secs: 300,
    };
    let mut task = Task::fix_attempt(source, sandbox);
    for s in &a.steps {
        let (name, run) = pair(s, "--step")?;
        task.steps.push(Step {
            name,
            run,
            timeout_secs: a.step_timeout,
            env: BTreeMap::new(),
            continue_on_error: false,
        });
    }
    if let Some(k) = &a.idempotency_key {
        task.idempotency_key.clone_from(k);
    }
    Ok(task)
}

/// Builds and validates the task, then enqueues it and prints its id once the
/// broker confirmed it. A bad task is reported (exit 2) before connecting; a
/// missing tasks exchange (topology not applied) exits 5 with what to run.
pub async fn run(a: &EnqueueArgs, settings: &Settings, out: Output) -> CliResult<Exit> {
    let task = build(a, settings)?;
    // The producer's own checks, consumer-timeout budget included, before
    // connecting: a task no worker would run is a usage error (exit 2).
    sandfleet_proto::validate_intake(&task, &settings.limits)
        .map_err(|e| CliError::Usage(format!("invalid task: {e}")))?;
    let sink = crate::broker::connect_sink(settings).await?;
    match sink.enqueue(&task).await {
        Ok(()) => {
            out.emit(
                task.id,
                &json!({ "task_id": task.id, "idempotency_key": task.idempotency_key }),
            );
            Ok(Exit::Ok)
        }
        Err(SinkError::Invalid(e)) => Err(CliError::Usage(format!("invalid task: {e}"))),
        Err(SinkError::Unavailable(e)) => Err(CliError::Broker(e)),
    }
}
