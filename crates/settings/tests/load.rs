//! Loading settings from defaults, a file and an environment map.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::Write;

use sandfleet_settings::{ExecutorKind, LogFormat, Settings, SettingsError, load};

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn toml(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

/// The `key: reason` lines of an invalid-settings error.
fn messages(err: SettingsError) -> Vec<String> {
    match err {
        SettingsError::Invalid(errors) => errors.iter().map(ToString::to_string).collect(),
        other => panic!("expected Invalid, got {other}"),
    }
}

#[test]
fn no_file_and_no_env_gives_the_defaults() {
    let s = load(
        None,
        &env(&[("PATH", "/usr/bin"), ("SANDFLEET_UNRELATED", "x")]),
    )
    .unwrap();
    assert_eq!(s, Settings::default());
    assert_eq!(s.worker.executor, ExecutorKind::Local);
    assert_eq!(s.limits, sandfleet_proto::Limits::default());
}

#[test]
fn env_overrides_the_file_which_overrides_defaults() {
    let file = toml(
        r#"
        [worker]
        concurrency = 8
        drain_timeout_secs = 120

        [sandbox.kubernetes]
        namespace = "from-file"

        [telemetry]
        log_format = "json"
        "#,
    );
    let s = load(
        Some(file.path()),
        &env(&[
            ("SANDFLEET__WORKER__CONCURRENCY", "16"),
            ("SANDFLEET__WORKER__EXECUTOR", "kubernetes"),
            ("SANDFLEET__SANDBOX__KUBERNETES__NAMESPACE", "ci-sandboxes"),
            ("SANDFLEET__SANDBOX__KUBERNETES__RUN_AS_NON_ROOT", "false"),
            ("SANDFLEET__LIMITS__MAX_STEPS", "5"),
            ("SANDFLEET__BREAKER__FAILURE_RATE", "0.25"),
        ]),
    )
    .unwrap();
    assert_eq!(s.worker.concurrency, 16, "env wins over the file");
    assert_eq!(s.worker.drain_timeout_secs, 120, "file wins over defaults");
    assert_eq!(s.worker.executor, ExecutorKind::Kubernetes);
    assert_eq!(s.sandbox.kubernetes.namespace, "ci-sandboxes");
    assert!(!s.sandbox.kubernetes.run_as_non_root);
    assert_eq!(s.telemetry.log_format, LogFormat::Json);
    assert_eq!(s.limits.max_steps, 5);
    assert_eq!(s.breaker.failure_rate, 0.25);
    assert_eq!(
        s.amqp,
        Settings::default().amqp,
        "untouched sections keep defaults"
    );
}

#[test]
fn an_invalid_value_names_the_key_and_the_reason() {
    let err = load(None, &env(&[("SANDFLEET__WORKER__CONCURRENCY", "0")])).unwrap_err();
    assert_eq!(messages(err), ["worker.concurrency: must be at least 1"]);
}

#[test]
fn every_invalid_key_is_reported() {
    let file = toml(
        r#"
        [amqp]
        url = "http://rabbit:5672"
        [retry]
        jitter = 1.5
        [topology]
        results_max_age = "a week"
        "#,
    );
    let err = load(
        Some(file.path()),
        &env(&[
            ("SANDFLEET__WORKER__HTTP_ADDR", "localhost"),
            ("SANDFLEET__SANDBOX__KUBERNETES__NAMESPACE", "Bad_Namespace"),
            ("SANDFLEET__GATEWAY__TEMPLATE__DEADLINE_SECS", "0"),
        ]),
    )
    .unwrap_err();
    let text = err.to_string();
    let keys: Vec<String> = err.errors().iter().map(|e| e.key.clone()).collect();
    assert_eq!(
        keys,
        [
            "amqp.url",
            "topology.results_max_age",
            "worker.http_addr",
            "retry.jitter",
            "sandbox.kubernetes.namespace",
            "gateway.template.deadline_secs",
        ],
        "{text}"
    );
    assert!(
        text.starts_with("invalid settings:\n  - amqp.url: must start with amqp://"),
        "{text}"
    );
    assert!(
        !text.contains("rabbit:5672"),
        "the URL may carry credentials: {text}"
    );
}

#[test]
fn type_errors_name_the_key() {
    let err = load(None, &env(&[("SANDFLEET__WORKER__CONCURRENCY", "many")])).unwrap_err();
    let errors = err.errors();
    assert_eq!(errors.len(), 1, "{err}");
    assert_eq!(errors[0].key, "worker.concurrency");
    assert!(errors[0].reason.contains("many"), "{err}");

    let file = toml("[sandbox.kubernetes]\nrun_as_user = \"nobody\"\n");
    let err = load(Some(file.path()), &env(&[])).unwrap_err();
    assert_eq!(
        err.errors()[0].key,
        "sandbox.kubernetes.run_as_user",
        "{err}"
    );

    let err = load(None, &env(&[("SANDFLEET__WORKER__EXECUTOR", "docker")])).unwrap_err();
    assert_eq!(err.errors()[0].key, "worker.executor", "{err}");
    assert!(
        err.to_string().contains("kubernetes"),
        "lists the choices: {err}"
    );
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let err = load(None, &env(&[("SANDFLEET__WORKER__CONCURENCY", "3")])).unwrap_err();
    assert_eq!(messages(err), ["worker.concurency: unknown key"]);

    let file = toml("[sandbox.kubernetes]\nnamespce = \"x\"\n");
    let err = load(Some(file.path()), &env(&[])).unwrap_err();
    assert_eq!(messages(err), ["sandbox.kubernetes.namespce: unknown key"]);

    let err = load(None, &env(&[("SANDFLEET__WORKERS__CONCURRENCY", "3")])).unwrap_err();
    assert_eq!(messages(err), ["workers: unknown key"]);
}

#[test]
fn the_moved_consumer_timeout_key_names_its_new_place() {
    let file = toml("[worker]\nbroker_consumer_timeout_secs = 7200\n");
    let err = load(Some(file.path()), &env(&[])).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.errors()[0].key, "worker.broker_consumer_timeout_secs");
    assert!(
        text.contains("moved to limits.broker_consumer_timeout_secs")
            && text.contains("SANDFLEET__LIMITS__BROKER_CONSUMER_TIMEOUT_SECS"),
        "{text}"
    );
    let err = load(
        None,
        &env(&[("SANDFLEET__WORKER__BROKER_CONSUMER_TIMEOUT_SECS", "7200")]),
    )
    .unwrap_err();
    assert!(err.to_string().contains("moved to limits."), "{err}");

    let s = load(
        None,
        &env(&[("SANDFLEET__LIMITS__BROKER_CONSUMER_TIMEOUT_SECS", "7200")]),
    )
    .unwrap();
    assert_eq!(s.limits.broker_consumer_timeout_secs, 7200);
}

#[test]
fn a_gateway_template_no_worker_would_run_is_a_configuration_error() {
    // 1500 + 300 s does not fit the default 1800 s less the 60 s margin.
    let err = load(
        None,
        &env(&[("SANDFLEET__GATEWAY__TEMPLATE__DEADLINE_SECS", "1500")]),
    )
    .unwrap_err();
    assert_eq!(
        err.errors()[0].key,
        "gateway.template.deadline_secs",
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("deadline_secs 1500 + pending_timeout_secs 300 exceed the broker consumer timeout (1800 s"),
        "{err}"
    );
    // Raising the broker's timeout makes it fit.
    load(
        None,
        &env(&[
            ("SANDFLEET__GATEWAY__TEMPLATE__DEADLINE_SECS", "1500"),
            ("SANDFLEET__LIMITS__BROKER_CONSUMER_TIMEOUT_SECS", "3600"),
        ]),
    )
    .unwrap();
}

#[test]
fn list_valued_env_vars_split_on_commas() {
    let s = load(
        None,
        &env(&[
            ("SANDFLEET__TOPOLOGY__RETRY_DELAYS_SECS", "5,30"),
            (
                "SANDFLEET__GATEWAY__ALLOWED_REPOSITORIES",
                "acme/*,other/app",
            ),
            (
                "SANDFLEET__SANDBOX__KUBERNETES__IMAGE_PULL_SECRETS",
                "regcred",
            ),
        ]),
    )
    .unwrap();
    assert_eq!(s.topology.retry_delays_secs, [5, 30]);
    assert_eq!(s.gateway.allowed_repositories, ["acme/*", "other/app"]);
    assert_eq!(s.sandbox.kubernetes.image_pull_secrets, ["regcred"]);

    // A single number is a one-item list, not an integer.
    let s = load(
        None,
        &env(&[("SANDFLEET__TOPOLOGY__RETRY_DELAYS_SECS", "30")]),
    )
    .unwrap();
    assert_eq!(s.topology.retry_delays_secs, [30]);

    let err = load(
        None,
        &env(&[("SANDFLEET__TOPOLOGY__RETRY_DELAYS_SECS", "30,10")]),
    )
    .unwrap_err();
    assert_eq!(
        messages(err),
        ["topology.retry_delays_secs: delays must be strictly increasing"]
    );
}

#[test]
fn string_values_are_not_reinterpreted() {
    // A secret that looks like a number or a boolean stays exactly as given.
    let s = load(
        None,
        &env(&[
            ("SANDFLEET__GATEWAY__GITHUB_SECRET", "1e5"),
            ("SANDFLEET__GATEWAY__GITLAB_TOKEN", "true"),
            ("SANDFLEET__AMQP__CONNECTION_NAME", "007"),
        ]),
    )
    .unwrap();
    assert_eq!(s.gateway.github_secret.as_deref(), Some("1e5"));
    assert_eq!(s.gateway.gitlab_token.as_deref(), Some("true"));
    assert_eq!(s.amqp.connection_name.as_deref(), Some("007"));
}

#[test]
fn a_missing_or_broken_file_is_a_source_error() {
    let err = load(
        Some(std::path::Path::new("/nonexistent/sandfleet.toml")),
        &env(&[]),
    )
    .unwrap_err();
    assert!(matches!(err, SettingsError::Source(_)), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/sandfleet.toml"),
        "{err}"
    );

    let file = toml("[worker\nconcurrency = 1\n");
    let err = load(Some(file.path()), &env(&[])).unwrap_err();
    assert!(matches!(err, SettingsError::Source(_)), "{err}");
}

#[test]
fn the_gateway_template_is_checked_with_the_task_rules() {
    let file = toml(
        r#"
        [gateway.template]
        image = "Alpine"
        max_attempts = 50
        steps = [
          { name = "build", run = "make", timeout_secs = 0 },
          { name = "build", run = "make test", timeout_secs = 60, env = { SANDFLEET_STEP_X = "1" } },
        ]
        "#,
    );
    let err = load(Some(file.path()), &env(&[])).unwrap_err();
    let keys: Vec<&str> = err.errors().iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "gateway.template.image",
            "gateway.template.steps[0].timeout_secs",
            "gateway.template.steps[1].name",
            "gateway.template.steps[1].env.SANDFLEET_STEP_X",
            "gateway.template.max_attempts",
        ],
        "{err}"
    );
}

#[test]
fn the_example_file_loads() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/sandfleet.toml");
    let s = load(Some(&path), &env(&[])).unwrap();
    assert_eq!(s.worker.executor, ExecutorKind::Kubernetes);
    assert_eq!(
        s.sandbox
            .kubernetes
            .node_selector
            .get("sandfleet.dev/pool")
            .map(String::as_str),
        Some("sandbox")
    );
    assert_eq!(s.sandbox.kubernetes.tolerations[0]["operator"], "Exists");
    assert_eq!(s.gateway.template.steps.len(), 2);
    assert_eq!(s.limits.max_deadline_secs, 7200);
}

#[test]
fn sandbox_resource_defaults_and_bounds_are_checked() {
    let file = toml(
        r#"
        [sandbox.kubernetes.default_resources]
        cpu_request = "4"
        cpu_limit = "2"
        memory_limit = "32Gi"
        ephemeral_storage_limit = "lots"

        [sandbox.kubernetes.max_resources]
        memory = "16Gi"

        [sandbox.local]
        max_file_bytes = 1000
        "#,
    );
    let err = load(Some(file.path()), &env(&[])).unwrap_err();
    let m = messages(err);
    for expected in [
        "sandbox.kubernetes.default_resources.cpu_request: is above sandbox.kubernetes.default_resources.cpu_limit",
        "sandbox.kubernetes.default_resources.memory_limit: is above sandbox.kubernetes.max_resources.memory",
        "sandbox.local.max_file_bytes: must be at least 1048576",
    ] {
        assert!(
            m.iter().any(|l| l == expected),
            "{expected:?} not in {m:#?}"
        );
    }
    assert!(
        m.iter().any(
            |l| l.starts_with("sandbox.kubernetes.default_resources.ephemeral_storage_limit: ")
        ),
        "{m:#?}"
    );
    // Unset defaults and bounds are allowed.
    let s = load(
        None,
        &env(&[("SANDFLEET__SANDBOX__KUBERNETES__MAX_RESOURCES__CPU", "16")]),
    )
    .unwrap();
    assert_eq!(
        s.sandbox.kubernetes.max_resources.cpu.as_deref(),
        Some("16")
    );
}

#[test]
fn the_kueue_queue_is_a_dns_label_and_the_admission_timeout_positive() {
    let s = load(
        None,
        &env(&[("SANDFLEET__SANDBOX__KUBERNETES__KUEUE_QUEUE", "sandboxes")]),
    )
    .unwrap();
    assert_eq!(
        s.sandbox.kubernetes.kueue_queue.as_deref(),
        Some("sandboxes")
    );
    assert_eq!(s.sandbox.kubernetes.admission_timeout_secs, 3600);
    let err = load(
        None,
        &env(&[
            ("SANDFLEET__SANDBOX__KUBERNETES__KUEUE_QUEUE", "Team Queue"),
            (
                "SANDFLEET__SANDBOX__KUBERNETES__ADMISSION_TIMEOUT_SECS",
                "0",
            ),
        ]),
    )
    .unwrap_err();
    let keys: Vec<String> = err.errors().iter().map(|e| e.key.clone()).collect();
    assert_eq!(
        keys,
        [
            "sandbox.kubernetes.kueue_queue",
            "sandbox.kubernetes.admission_timeout_secs"
        ]
    );
}
