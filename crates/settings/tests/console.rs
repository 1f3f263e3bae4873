//! The `[console]` section: tokens with roles from a file, and the
//! mistakes that must stop `sandfleet console` before it serves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::Write;

use sandfleet_settings::{ConsoleRole, SettingsError, load};

fn load_toml(text: &str) -> Result<sandfleet_settings::Settings, SettingsError> {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    let s = load(Some(f.path()), &HashMap::new())?;
    s.validate()?;
    Ok(s)
}

fn keys(err: SettingsError) -> Vec<String> {
    err.errors().iter().map(|e| e.key.clone()).collect()
}

#[test]
fn tokens_with_roles_load_from_the_file() {
    let s = load_toml(
        r#"
[console]
listen_addr = "0.0.0.0:8070"
read_requires_token = true
workers = ["http://w-0:9090"]
tokens = [
  { name = "oncall", token = "0123456789abcdef0123", role = "operator" },
  { name = "wall", token = "fedcba9876543210fedc", role = "viewer" },
]
"#,
    )
    .unwrap();
    assert!(s.console.read_requires_token);
    assert_eq!(s.console.workers, vec!["http://w-0:9090"]);
    let roles: Vec<(&str, ConsoleRole)> = s
        .console
        .tokens
        .iter()
        .map(|t| (t.name.as_str(), t.role))
        .collect();
    assert_eq!(
        roles,
        vec![
            ("oncall", ConsoleRole::Operator),
            ("wall", ConsoleRole::Viewer)
        ]
    );
}

#[test]
fn weak_tokens_unknown_roles_and_locked_doors_are_refused() {
    let err = load_toml(
        r#"
[console]
tokens = [{ name = "x", token = "short", role = "operator" }]
"#,
    )
    .unwrap_err();
    assert_eq!(keys(err), vec!["console.tokens"]);

    let err = load_toml(
        r#"
[console]
tokens = [{ name = "x", token = "0123456789abcdef0123", role = "admin" }]
"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("admin"), "{err}");

    // Reading behind a token, and no token to read with.
    let err = load_toml("[console]\nread_requires_token = true\n").unwrap_err();
    assert_eq!(keys(err), vec!["console.read_requires_token"]);

    let err = load_toml("[console]\nsessions_url = \"http://sessions:8081\"\n").unwrap_err();
    assert_eq!(keys(err), vec!["console.sessions_token"]);

    let err = load_toml("[console]\nlisten_addr = \"nowhere\"\n").unwrap_err();
    assert_eq!(keys(err), vec!["console.listen_addr"]);
}

#[test]
fn fairness_weights_and_caps_load_and_bad_ones_are_named() {
    let s = load_toml(
        r#"
[topology]
task_shards = 16

[fairness]
default_key_cap = 4

[[fairness.tenants]]
name = "acme"
weight = 3

[[fairness.keys]]
name = "acme/web"
weight = 2
cap = 1
"#,
    )
    .unwrap();
    assert_eq!(s.topology.task_shards, 16);
    assert_eq!(s.fairness.tenants[0].weight, 3);
    assert_eq!(s.fairness.tenants[0].cap, 0);
    assert_eq!(s.fairness.keys[0].cap, 1);
    assert_eq!(s.fairness.default_key_cap, 4);
    let err = load_toml(
        r#"
[topology]
task_shards = 5000
[fairness]
prefetch_per_shard = 0
[[fairness.keys]]
name = "a/b"
weight = 0
[[fairness.keys]]
name = "a/b"
"#,
    )
    .unwrap_err();
    let k = keys(err);
    for want in [
        "topology.task_shards",
        "fairness.prefetch_per_shard",
        "fairness.keys[0].weight",
        "fairness.keys[1].name",
    ] {
        assert!(k.iter().any(|x| x == want), "{want} not in {k:?}");
    }
}
