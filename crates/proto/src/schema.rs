//! JSON Schema of the messages, generated from the Rust types.
//!
//! The committed copies under `schemas/` (`task.v1.schema.json`,
//! `result.v1.schema.json`, `cancellation.v1.schema.json`) are what non-Rust producers validate against; a
//! test fails when they drift from these functions' output.

use schemars::Schema;
use serde_json::Value;

use crate::{Cancellation, Task, TaskResult};

/// `$id` of the task schema.
pub const TASK_SCHEMA_ID: &str = "https://sandfleet.dev/schemas/task.v1.schema.json";
/// `$id` of the result schema.
pub const RESULT_SCHEMA_ID: &str = "https://sandfleet.dev/schemas/result.v1.schema.json";

/// `$id` of the cancellation schema.
pub const CANCELLATION_SCHEMA_ID: &str =
    "https://sandfleet.dev/schemas/cancellation.v1.schema.json";

/// JSON Schema (2020-12) of a cancellation message.
pub fn cancellation_schema() -> Schema {
    with_id(schemars::schema_for!(Cancellation), CANCELLATION_SCHEMA_ID)
}

/// JSON Schema (2020-12) of a task message.
pub fn task_schema() -> Schema {
    with_id(schemars::schema_for!(Task), TASK_SCHEMA_ID)
}

/// JSON Schema (2020-12) of a result message.
pub fn result_schema() -> Schema {
    with_id(schemars::schema_for!(TaskResult), RESULT_SCHEMA_ID)
}

/// A schema as committed: pretty-printed JSON with a trailing newline.
pub fn to_pretty_json(schema: &Schema) -> String {
    let mut s = serde_json::to_string_pretty(schema).unwrap_or_default();
    s.push('\n');
    s
}

fn with_id(mut schema: Schema, id: &str) -> Schema {
    schema.insert("$id".to_owned(), Value::String(id.to_owned()));
    schema
}
