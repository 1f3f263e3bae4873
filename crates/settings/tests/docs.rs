//! docs/configuration.md documents every key the loader accepts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;

/// `section.key` paths of every leaf of the default settings.
fn keys(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) if !map.is_empty() && !prefix.ends_with("node_selector") => {
            for (k, v) in map {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                keys(&p, v, out);
            }
        }
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

#[test]
fn every_key_is_in_the_configuration_reference() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/configuration.md"
    ))
    .expect("docs/configuration.md");
    let defaults = serde_json::to_value(sandfleet_settings::Settings::default()).unwrap();
    let mut all = Vec::new();
    keys("", &defaults, &mut all);
    // Prints the keys and defaults, to start a new table row from.
    #[allow(clippy::print_stdout)]
    if std::env::var_os("SANDFLEET_PRINT_KEYS").is_some() {
        for (k, v) in &all {
            println!("{k}\t{v}");
        }
    }
    let missing: Vec<&str> = all
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !doc.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document: {missing:?}"
    );
}
