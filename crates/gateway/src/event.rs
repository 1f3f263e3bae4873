//! CI events: which webhook deliveries describe a failed build, and the values
//! a fix attempt needs from them.
//!
//! Parsing is pure (bytes in, [`Intake`] out) so every rule here is unit-tested
//! against the real payloads in `tests/fixtures/`. Only the fields we use are
//! declared; the providers add fields over time and that must not break intake.

use sandfleet_proto::Provider;
use serde::Deserialize;

/// What the gateway does with one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// A failed build: becomes a fix-attempt task.
    Failure(CiFailure),
    /// GitHub's `ping` on hook creation: answered 200.
    Ping,
    /// Acknowledged and ignored, with the reason (shown in the response).
    Ignored(String),
}

/// The values of a failed build that reach the sandbox (as env vars only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CiFailure {
    /// Which CI provider sent it.
    pub provider: Provider,
    /// The provider's event name (`workflow_run`, `check_suite`, `pipeline`).
    pub event: String,
    /// `owner/name` (GitHub) or `group/subgroup/name` (GitLab).
    pub repository: String,
    /// Full commit SHA of the failed build.
    pub commit: String,
    /// Branch or tag.
    pub git_ref: Option<String>,
    /// URL to clone the repository from.
    pub clone_url: Option<String>,
    /// Workflow run, check suite or pipeline id.
    pub ci_run_id: Option<String>,
    /// Pull or merge request number, when the build ran for one.
    pub pull_request: Option<u64>,
    /// Link to the failed build, for humans.
    pub url: Option<String>,
    /// The provider's conclusion (`failure`, `timed_out`, `failed`).
    pub conclusion: String,
}

/// Why a delivery's body could not be understood (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The body is not JSON of the expected shape.
    #[error("malformed {event} payload: {reason}")]
    Malformed {
        /// The event name.
        event: String,
        /// serde's message, with the path that failed.
        reason: String,
    },
    /// A value the fix attempt needs is absent or unusable.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The payload field.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
}

/// GitHub conclusions that count as a failed build.
const GITHUB_FAILURES: [&str; 2] = ["failure", "timed_out"];

#[derive(Deserialize)]
struct GhRepository {
    full_name: String,
    #[serde(default)]
    clone_url: Option<String>,
    #[serde(default)]
    html_url: Option<String>,
}

#[derive(Deserialize)]
struct GhPullRequest {
    number: u64,
}

#[derive(Deserialize)]
struct GhRun {
    id: u64,
    head_sha: String,
    #[serde(default)]
    head_branch: Option<String>,
    #[serde(default)]
    conclusion: Option<String>,
    #[serde(default)]
    html_url: Option<String>,
    #[serde(default)]
    run_attempt: Option<u64>,
    #[serde(default)]
    pull_requests: Vec<GhPullRequest>,
}

#[derive(Deserialize)]
struct GhWorkflowRunEvent {
    action: String,
    workflow_run: GhRun,
    repository: GhRepository,
}

#[derive(Deserialize)]
struct GhCheckSuiteEvent {
    action: String,
    check_suite: GhRun,
    repository: GhRepository,
}

fn malformed(event: &str, e: serde_json::Error) -> EventError {
    EventError::Malformed {
        event: event.to_owned(),
        reason: e.to_string(),
    }
}

/// Reads a GitHub delivery (`X-GitHub-Event` name and raw body).
pub fn parse_github(event: &str, body: &[u8]) -> Result<Intake, EventError> {
    match event {
        "ping" => {
            // Still require JSON, so a garbage ping is visible as an error.
            serde_json::from_slice::<serde_json::Value>(body).map_err(|e| malformed(event, e))?;
            Ok(Intake::Ping)
        }
        "workflow_run" => {
            let ev: GhWorkflowRunEvent =
                serde_json::from_slice(body).map_err(|e| malformed(event, e))?;
            github_run(event, &ev.action, ev.workflow_run, ev.repository)
        }
        "check_suite" => {
            let ev: GhCheckSuiteEvent =
                serde_json::from_slice(body).map_err(|e| malformed(event, e))?;
            github_run(event, &ev.action, ev.check_suite, ev.repository)
        }
        other => Ok(Intake::Ignored(format!(
            "event {other:?} is not handled (only workflow_run and check_suite)"
        ))),
    }
}

fn github_run(
    event: &str,
    action: &str,
    run: GhRun,
    repo: GhRepository,
) -> Result<Intake, EventError> {
    if action != "completed" {
        return Ok(Intake::Ignored(format!(
            "{event} action {action:?} is not \"completed\""
        )));
    }
    let conclusion = run.conclusion.unwrap_or_default();
    if !GITHUB_FAILURES.contains(&conclusion.as_str()) {
        return Ok(Intake::Ignored(format!(
            "{event} concluded {conclusion:?}, not failure or timed_out"
        )));
    }
    let url = run.html_url.or_else(|| {
        repo.html_url
            .as_ref()
            .map(|u| format!("{u}/commit/{}", run.head_sha))
    });
    let ci_run_id = match run.run_attempt {
        Some(a) if a > 1 => format!("{}/attempts/{a}", run.id),
        _ => run.id.to_string(),
    };
    checked(CiFailure {
        provider: Provider::Github,
        event: event.to_owned(),
        repository: repo.full_name,
        commit: run.head_sha,
        git_ref: run.head_branch,
        clone_url: repo.clone_url,
        ci_run_id: Some(ci_run_id),
        pull_request: run.pull_requests.first().map(|p| p.number),
        url,
        conclusion,
    })
}

#[derive(Deserialize)]
struct GlPipelineAttrs {
    id: u64,
    #[serde(rename = "ref", default)]
    git_ref: Option<String>,
    sha: String,
    status: String,
    #[serde(default)]
    url: Option<String>,
}

#[derive(Deserialize)]
struct GlProject {
    path_with_namespace: String,
    #[serde(default)]
    git_http_url: Option<String>,
    #[serde(default)]
    web_url: Option<String>,
}

#[derive(Deserialize)]
struct GlMergeRequest {
    iid: u64,
}

#[derive(Deserialize)]
struct GlPipelineEvent {
    object_attributes: GlPipelineAttrs,
    project: GlProject,
    #[serde(default)]
    merge_request: Option<GlMergeRequest>,
}

#[derive(Deserialize)]
struct GlKind {
    #[serde(default)]
    object_kind: Option<String>,
}

/// Reads a GitLab delivery (`X-Gitlab-Event` name, when sent, and raw body).
pub fn parse_gitlab(event: Option<&str>, body: &[u8]) -> Result<Intake, EventError> {
    let name = event.unwrap_or("unknown");
    let kind: GlKind = serde_json::from_slice(body).map_err(|e| malformed(name, e))?;
    let is_pipeline = kind.object_kind.as_deref() == Some("pipeline");
    if !is_pipeline || event.is_some_and(|e| e != "Pipeline Hook") {
        return Ok(Intake::Ignored(format!(
            "event {name:?} (object_kind {:?}) is not handled (only Pipeline Hook)",
            kind.object_kind.unwrap_or_default()
        )));
    }
    let ev: GlPipelineEvent =
        serde_json::from_slice(body).map_err(|e| malformed("Pipeline Hook", e))?;
    let attrs = ev.object_attributes;
    if attrs.status != "failed" {
        return Ok(Intake::Ignored(format!(
            "pipeline status {:?} is not \"failed\"",
            attrs.status
        )));
    }
    let url = attrs.url.or_else(|| {
        ev.project
            .web_url
            .as_ref()
            .map(|w| format!("{w}/-/pipelines/{}", attrs.id))
    });
    checked(CiFailure {
        provider: Provider::Gitlab,
        event: "pipeline".to_owned(),
        repository: ev.project.path_with_namespace,
        commit: attrs.sha,
        git_ref: attrs.git_ref,
        clone_url: ev.project.git_http_url,
        ci_run_id: Some(attrs.id.to_string()),
        pull_request: ev.merge_request.map(|m| m.iid),
        url,
        conclusion: attrs.status,
    })
}

/// Refuses values that cannot be passed on safely. They travel as env vars,
/// never through a shell, but a NUL byte cannot be in an env var at all, and a
/// commit must look like one.
fn checked(f: CiFailure) -> Result<Intake, EventError> {
    let bad_chars = |s: &str| s.chars().any(|c| c.is_control());
    if f.repository.is_empty() || bad_chars(&f.repository) || f.repository.len() > 255 {
        return Err(EventError::Invalid {
            field: "repository",
            reason: "empty, too long or contains control characters".to_owned(),
        });
    }
    if !(7..=64).contains(&f.commit.len()) || !f.commit.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(EventError::Invalid {
            field: "commit",
            reason: format!("{:?} is not a hex commit SHA", f.commit),
        });
    }
    for (field, v) in [
        ("ref", &f.git_ref),
        ("clone_url", &f.clone_url),
        ("url", &f.url),
    ] {
        if v.as_deref().is_some_and(|v| bad_chars(v) || v.len() > 2048) {
            return Err(EventError::Invalid {
                field,
                reason: "too long or contains control characters".to_owned(),
            });
        }
    }
    Ok(Intake::Failure(f))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The fixture with one JSON field replaced (pointer syntax).
    fn with(name: &str, pointer: &str, value: &str) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(&fixture(name)).unwrap();
        *v.pointer_mut(pointer).unwrap() = serde_json::Value::String(value.to_owned());
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn failed_workflow_run_becomes_a_failure_with_its_values() {
        for conclusion in ["failure", "timed_out"] {
            let body = with(
                "github/workflow_run.completed.json",
                "/workflow_run/conclusion",
                conclusion,
            );
            let Intake::Failure(f) = parse_github("workflow_run", &body).unwrap() else {
                panic!()
            };
            assert_eq!(f.repository, "octo-org/octo-repo");
            assert_eq!(f.commit, "3484a3fb816e0859fd6e1cea078d76385ff50625");
            assert_eq!(f.git_ref.as_deref(), Some("master"));
            assert_eq!(
                f.clone_url.as_deref(),
                Some("https://github.com/octo-org/octo-repo.git")
            );
            assert_eq!(f.ci_run_id.as_deref(), Some("289782451"));
            assert_eq!(f.conclusion, conclusion);
            assert_eq!(
                f.url.as_deref(),
                Some("https://github.com/octo-org/octo-repo/actions/runs/289782451")
            );
        }
    }

    #[test]
    fn workflow_run_with_pull_request_carries_its_number() {
        let body = with(
            "github/workflow_run.completed.with-pull-requests.json",
            "/workflow_run/conclusion",
            "failure",
        );
        let Intake::Failure(f) = parse_github("workflow_run", &body).unwrap() else {
            panic!()
        };
        assert!(f.pull_request.is_some());
    }

    #[test]
    fn successful_or_unfinished_runs_are_ignored_with_a_reason() {
        let ok = fixture("github/workflow_run.completed.json");
        let Intake::Ignored(why) = parse_github("workflow_run", &ok).unwrap() else {
            panic!()
        };
        assert!(why.contains("success"), "{why}");
        let requested = fixture("github/workflow_run.requested.json");
        let Intake::Ignored(why) = parse_github("workflow_run", &requested).unwrap() else {
            panic!()
        };
        assert!(why.contains("requested"), "{why}");
        let Intake::Ignored(why) = parse_github("push", b"{}").unwrap() else {
            panic!()
        };
        assert!(why.contains("push"), "{why}");
    }

    #[test]
    fn failed_check_suite_becomes_a_failure() {
        let body = with(
            "github/check_suite.completed.json",
            "/check_suite/conclusion",
            "failure",
        );
        let Intake::Failure(f) = parse_github("check_suite", &body).unwrap() else {
            panic!()
        };
        assert_eq!(f.repository, "Codertocat/Hello-World");
        assert_eq!(f.commit, "ec26c3e57ca3a959ca5aad62de7213c562f8c821");
        assert_eq!(f.git_ref.as_deref(), Some("changes"));
        assert_eq!(f.event, "check_suite");
    }

    #[test]
    fn ping_is_recognised() {
        assert_eq!(
            parse_github("ping", &fixture("github/ping.json")).unwrap(),
            Intake::Ping
        );
    }

    #[test]
    fn failed_gitlab_pipeline_becomes_a_failure() {
        let body = with(
            "gitlab/pipeline.json",
            "/object_attributes/status",
            "failed",
        );
        let Intake::Failure(f) = parse_gitlab(Some("Pipeline Hook"), &body).unwrap() else {
            panic!()
        };
        assert_eq!(f.provider, Provider::Gitlab);
        assert_eq!(f.repository, "gitlab-org/gitlab-test");
        assert_eq!(f.commit, "bcbb5ec396a2c0f828686f14fac9b80b780504f2");
        assert_eq!(f.pull_request, Some(1));
        assert_eq!(f.ci_run_id.as_deref(), Some("31"));
        let ok = fixture("gitlab/pipeline.json");
        assert!(matches!(
            parse_gitlab(Some("Pipeline Hook"), &ok).unwrap(),
            Intake::Ignored(_)
        ));
        assert!(matches!(
            parse_gitlab(Some("Push Hook"), &body).unwrap(),
            Intake::Ignored(_)
        ));
    }

    #[test]
    fn malformed_and_hostile_values_are_refused() {
        assert!(matches!(
            parse_github("workflow_run", b"{not json"),
            Err(EventError::Malformed { .. })
        ));
        assert!(matches!(
            parse_github("workflow_run", b"{}"),
            Err(EventError::Malformed { .. })
        ));
        let mut body = with(
            "github/workflow_run.completed.json",
            "/workflow_run/conclusion",
            "failure",
        );
        let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["workflow_run"]["head_sha"] = "$(rm -rf /)".into();
        body = serde_json::to_vec(&v).unwrap();
        let err = parse_github("workflow_run", &body).unwrap_err();
        assert!(
            matches!(
                err,
                EventError::Invalid {
                    field: "commit",
                    ..
                }
            ),
            "{err}"
        );
    }
}
