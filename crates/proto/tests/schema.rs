//! The committed JSON Schemas under `schemas/` must match the Rust types.
//!
//! Regenerate them after changing a type:
//! `SANDFLEET_BLESS=1 cargo test -p sandfleet-proto schema`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use sandfleet_proto::schema::{cancellation_schema, result_schema, task_schema, to_pretty_json};

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn check(file: &str, generated: String) {
    let path = schemas_dir().join(file);
    // Read only here, in the test: blessing is a developer action.
    if std::env::var_os("SANDFLEET_BLESS").is_some() {
        std::fs::create_dir_all(schemas_dir()).unwrap();
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is out of date with the Rust types.\n\
         Regenerate it with:\n    SANDFLEET_BLESS=1 cargo test -p sandfleet-proto schema\n\
         and commit the result.",
        path.display()
    );
}

#[test]
fn task_schema_is_committed_and_current() {
    check("task.v1.schema.json", to_pretty_json(&task_schema()));
}

#[test]
fn result_schema_is_committed_and_current() {
    check("result.v1.schema.json", to_pretty_json(&result_schema()));
}

#[test]
fn cancellation_schema_is_committed_and_current() {
    check(
        "cancellation.v1.schema.json",
        to_pretty_json(&cancellation_schema()),
    );
}

#[test]
fn task_schema_accepts_the_examples_shape() {
    // Spot checks a TypeScript producer relies on.
    let s = serde_json::to_value(task_schema()).unwrap();
    assert_eq!(
        s["$id"],
        "https://sandfleet.dev/schemas/task.v1.schema.json"
    );
    assert_eq!(s["properties"]["schema_version"]["const"], 1);
    assert_eq!(s["additionalProperties"], false);
    let required: Vec<&str> = s["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for field in [
        "schema_version",
        "id",
        "idempotency_key",
        "kind",
        "source",
        "sandbox",
        "steps",
    ] {
        assert!(
            required.contains(&field),
            "{field} not required: {required:?}"
        );
    }
}
