//! The `[sessions]` section: warm pools load from the file, and names that
//! could not become Job names or labels stop the service before it starts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::Write;

use sandfleet_settings::{SessionBackendKind, SettingsError, load};

fn load_toml(text: &str) -> Result<sandfleet_settings::Settings, SettingsError> {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    let s = load(Some(f.path()), &HashMap::new())?;
    s.validate()?;
    Ok(s)
}

#[test]
fn pools_load_from_the_file() {
    let s = load_toml(
        r#"
[[sessions.pools]]
name = "python"
image = "python:3.12"
size = 20
memory_limit = "2Gi"

[[sessions.pools]]
name = "node-20"
image = "node:20"
size = 5
max_age_secs = 900
"#,
    )
    .unwrap();
    let pools = &s.sessions.pools;
    assert_eq!(pools.len(), 2);
    assert_eq!((pools[0].size, pools[0].max_age_secs), (20, 3600));
    assert_eq!(pools[0].memory_limit.as_deref(), Some("2Gi"));
    assert_eq!(
        (pools[1].name.as_str(), pools[1].max_age_secs),
        ("node-20", 900)
    );
}

#[test]
fn bad_pool_names_duplicates_and_short_ages_are_refused() {
    let err = load_toml(
        r#"
[[sessions.pools]]
name = "Python_3"
image = "python:3.12"
size = 1

[[sessions.pools]]
name = "a"
image = ""
size = 1
max_age_secs = 5

[[sessions.pools]]
name = "a"
image = "x"
size = 1
"#,
    )
    .unwrap_err();
    let keys: Vec<String> = err.errors().iter().map(|e| e.key.clone()).collect();
    assert_eq!(
        keys,
        [
            "sessions.pools[0].name",
            "sessions.pools[1].image",
            "sessions.pools[1].max_age_secs",
            "sessions.pools[2].name",
        ]
    );
}

#[test]
fn the_backend_is_kubernetes_unless_set_and_pools_need_it() {
    let s = load_toml("").unwrap();
    assert_eq!(s.sessions.backend, SessionBackendKind::Kubernetes);
    let s = load_toml("[sessions]\nbackend = \"local\"\n").unwrap();
    assert_eq!(s.sessions.backend, SessionBackendKind::Local);

    let err = load_toml(
        r#"
[sessions]
backend = "local"

[[sessions.pools]]
name = "python"
image = "python:3.12"
size = 2
"#,
    )
    .unwrap_err();
    let e = &err.errors()[0];
    assert_eq!(e.key, "sessions.pools");
    assert!(e.reason.contains("backend = \"kubernetes\""), "{e}");
}
