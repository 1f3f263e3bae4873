//! The configuration the deployment files ship loads and validates with the
//! real loader, with the environment the manifests give each process — so a
//! renamed key, a wrong type or a value the validation refuses fails here,
//! not at a pod's start-up. And the timeouts that must agree across files do.
//!
//! The environment maps mirror `k8s/base/*-deployment.yaml`,
//! `deploy/overlays/dev/patches.yaml` and `docker-compose.yml`;
//! `scripts/validate-deploy.sh` checks the variable names there against the
//! settings structs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sandfleet_settings::{ExecutorKind, LogFormat, Settings};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load(file: &str, env: &[(&str, &str)]) -> Settings {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let settings = sandfleet_settings::load(Some(&repo_root().join(file)), &env)
        .unwrap_or_else(|e| panic!("{file} does not load: {e}"));
    settings
        .validate()
        .unwrap_or_else(|e| panic!("{file} does not validate: {e}"));
    settings
}

/// `consumer_timeout = N` (milliseconds) from a RabbitMQ config text.
fn consumer_timeout_ms(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("consumer_timeout"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().parse().expect("consumer_timeout is a number"))
        .next()
        .expect("consumer_timeout is set")
}

fn read(file: &str) -> String {
    std::fs::read_to_string(repo_root().join(file)).unwrap()
}

const AMQP_URL: &str = "amqp://sandfleet:secret@sandfleet-rabbitmq.sandfleet.svc:5672/%2f";

#[test]
fn the_cluster_worker_config_loads_with_the_deployment_env() {
    let s = load(
        "k8s/base/sandfleet.toml",
        &[
            ("SANDFLEET__WORKER__EXECUTOR", "kubernetes"),
            ("SANDFLEET__WORKER__DRAIN_TIMEOUT_SECS", "60"),
            (
                "SANDFLEET__WORKER__NAME",
                "sandfleet-worker-6d5f7c9b8-x2x4q",
            ),
            ("SANDFLEET__AMQP__URL", AMQP_URL),
        ],
    );
    assert_eq!(s.worker.executor, ExecutorKind::Kubernetes);
    assert_eq!(s.worker.drain_timeout_secs, 60);
    assert_eq!(s.amqp.url, AMQP_URL);
    // The Role, the sandbox ServiceAccount and the NetworkPolicies live here.
    assert_eq!(s.sandbox.kubernetes.namespace, "sandfleet-sandboxes");
    assert_eq!(s.sandbox.kubernetes.service_account, "sandfleet-sandbox");
    assert!(
        s.sandbox.kubernetes.run_as_non_root,
        "the namespace enforces PSA restricted"
    );
    assert_eq!(s.telemetry.log_format, LogFormat::Json);

    // The pod's grace period outlasts the drain.
    let deployment = read("k8s/base/worker-deployment.yaml");
    let grace: u64 = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .expect("terminationGracePeriodSeconds is set")
        .trim()
        .parse()
        .unwrap();
    assert!(
        grace > s.worker.drain_timeout_secs,
        "grace {grace}s <= drain"
    );
}

#[test]
fn the_cluster_gateway_config_loads_with_its_secrets() {
    let s = load(
        "k8s/base/sandfleet.toml",
        &[
            ("SANDFLEET__AMQP__URL", AMQP_URL),
            (
                "SANDFLEET__GATEWAY__GITHUB_SECRET",
                "0123456789abcdef0123456789abcdef",
            ),
            ("SANDFLEET__GATEWAY__GITLAB_TOKEN", "glpat-0123456789abcdef"),
            (
                "SANDFLEET__GATEWAY__API_TOKENS",
                "0123456789abcdef0123456789abcdef,fedcba9876543210fedcba9876543210",
            ),
        ],
    );
    assert_eq!(s.gateway.api_tokens.len(), 2);
    assert_eq!(s.gateway.listen_addr, "0.0.0.0:8080");
}

#[test]
fn the_dev_overlay_env_is_accepted() {
    let s = load(
        "k8s/base/sandfleet.toml",
        &[
            ("SANDFLEET__WORKER__EXECUTOR", "kubernetes"),
            ("SANDFLEET__WORKER__CONCURRENCY", "2"),
            ("SANDFLEET__TELEMETRY__LOG_FORMAT", "human"),
            ("SANDFLEET__AMQP__URL", AMQP_URL),
        ],
    );
    assert_eq!(s.worker.concurrency, 2);
    assert_eq!(s.telemetry.log_format, LogFormat::Human);
}

#[test]
fn the_compose_config_loads_with_the_compose_env() {
    let s = load(
        "deploy/compose/sandfleet.toml",
        &[
            (
                "SANDFLEET__AMQP__URL",
                "amqp://sandfleet:sandfleet@rabbitmq:5672/%2f",
            ),
            ("SANDFLEET__WORKER__EXECUTOR", "local"),
            ("SANDFLEET__WORKER__NAME", "compose-worker"),
            (
                "SANDFLEET__SANDBOX__LOCAL__WORK_DIR",
                "/var/lib/sandfleet/work",
            ),
        ],
    );
    assert_eq!(s.worker.executor, ExecutorKind::Local);
    assert_eq!(
        s.telemetry.otlp_endpoint.as_deref(),
        Some("http://otel-collector:4318")
    );
    assert!(!s.gateway.api_tokens.is_empty(), "the try-out API token");
}

#[test]
fn every_broker_consumer_timeout_matches_the_worker_and_outlasts_every_deadline() {
    for (config, brokers) in [
        (
            "k8s/base/sandfleet.toml",
            &[
                "k8s/rabbitmq/rabbitmqcluster.yaml",
                "deploy/overlays/dev/rabbitmq.conf",
            ][..],
        ),
        (
            "deploy/compose/sandfleet.toml",
            &["deploy/rabbitmq/rabbitmq.conf"][..],
        ),
    ] {
        let s = load(config, &[]);
        let broker_secs = s.limits.broker_consumer_timeout_secs;
        for broker in brokers {
            assert_eq!(
                consumer_timeout_ms(&read(broker)),
                broker_secs * 1000,
                "{broker}: consumer_timeout must equal limits.broker_consumer_timeout_secs of {config}"
            );
        }
        assert!(
            s.limits.max_deadline_secs < broker_secs,
            "{config}: limits.max_deadline_secs {} must be below the broker timeout {broker_secs}",
            s.limits.max_deadline_secs
        );
        assert!(
            s.gateway.template.deadline_secs <= s.limits.max_deadline_secs,
            "{config}: the gateway's template deadline exceeds limits.max_deadline_secs"
        );
    }
}

/// With every default, the fix attempt the gateway builds fits a default
/// worker's consumer-timeout budget: a fleet left at its defaults never
/// refuses the tasks its own gateway sends.
#[test]
fn default_gateway_tasks_fit_a_default_workers_consumer_timeout() {
    use sandfleet_gateway::event::CiFailure;
    use sandfleet_worker::dispatch::CONSUMER_TIMEOUT_MARGIN;

    let settings = Settings::default();
    let failure = CiFailure {
        provider: sandfleet_proto::Provider::Github,
        event: "workflow_run".into(),
        repository: "octo-org/octo-repo".into(),
        commit: "3484a3fb3484a3fb3484a3fb3484a3fb3484a3fb".into(),
        git_ref: Some("main".into()),
        clone_url: Some("https://github.com/octo-org/octo-repo.git".into()),
        ci_run_id: Some("1".into()),
        pull_request: None,
        url: None,
        conclusion: "failure".into(),
    };
    let task =
        sandfleet_gateway::template::build_task(&settings.gateway.template, &failure, "k".into());
    let needed = task.sandbox.deadline_secs + task.sandbox.pending_timeout_secs;
    let budget = settings.limits.broker_consumer_timeout_secs - CONSUMER_TIMEOUT_MARGIN.as_secs();
    assert!(
        needed <= budget,
        "default template: deadline {} s + pending {} s exceeds the default worker's budget of {budget} s",
        task.sandbox.deadline_secs,
        task.sandbox.pending_timeout_secs
    );
}
