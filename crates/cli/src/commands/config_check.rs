//! `sandfleet config check`: load the settings the way every command does
//! (defaults → file → `SANDFLEET__*` env → flags), validate them, and print
//! the effective configuration with secrets hidden.

use std::collections::HashMap;

use sandfleet_settings::{Settings, redact_url};
use serde_json::{Value, json};

use crate::args::GlobalArgs;
use crate::exit::{CliError, CliResult, Exit};
use crate::output::Output;

/// What replaces a secret's value.
pub const HIDDEN: &str = "<hidden>";

/// Runs `config check`. Reaching here means the settings loaded and
/// validated (a bad setting already exited 2 with every problem listed).
pub fn run(
    global: &GlobalArgs,
    env: &HashMap<String, String>,
    settings: &Settings,
    out: Output,
) -> CliResult<Exit> {
    let file = crate::config::config_file(global)?;
    let mut overrides: Vec<&str> = env
        .keys()
        .filter(|k| k.starts_with("SANDFLEET__"))
        .map(String::as_str)
        .collect();
    overrides.sort_unstable();
    let effective = redacted(settings)?;
    if out.json {
        out.json(&json!({
            "ok": true,
            "file": file.as_ref().map(|p| p.display().to_string()),
            "env": overrides,
            "settings": effective,
        }));
        return Ok(Exit::Ok);
    }
    let toml = toml::to_string_pretty(&without_nulls(effective))
        .map_err(|e| CliError::Failed(format!("cannot print the settings as TOML: {e}")))?;
    out.human(format!(
        "# configuration OK\n# file: {}\n# environment: {}\n# secrets are shown as {HIDDEN:?}; unset options are left out\n\n{toml}",
        file.as_ref()
            .map_or_else(|| "none (defaults)".to_owned(), |p| p.display().to_string()),
        if overrides.is_empty() {
            "no SANDFLEET__* variables".to_owned()
        } else {
            overrides.join(", ")
        },
    ));
    Ok(Exit::Ok)
}

/// The settings as JSON with every secret hidden: values of keys that name a
/// secret (`*secret*`, `*token*`, `*password*`), and the password of any URL
/// (`amqp.url`, an OTLP endpoint with credentials).
pub fn redacted(settings: &Settings) -> CliResult<Value> {
    let mut v = serde_json::to_value(settings)
        .map_err(|e| CliError::Failed(format!("cannot print the settings: {e}")))?;
    hide(&mut v, false);
    Ok(v)
}

fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["secret", "token", "password"]
        .iter()
        .any(|w| k.contains(w))
        // Names of Kubernetes Secrets, not their contents.
        && !k.contains("pull_secrets")
}

fn hide(v: &mut Value, secret: bool) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                hide(child, secret || is_secret_key(k));
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| hide(i, secret)),
        Value::String(s) if secret && !s.is_empty() => *s = HIDDEN.to_owned(),
        Value::String(s) if s.contains("://") => *s = redact_url(s),
        _ => {}
    }
}

/// TOML has no null: unset options are left out.
fn without_nulls(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_url_passwords_are_hidden() {
        let mut s = Settings::default();
        s.amqp.url = "amqp://fleet:hunter2@rabbit:5672/%2f".to_owned();
        s.gateway.github_secret = Some("gh-secret".to_owned());
        s.gateway.api_tokens = vec!["tok-1".to_owned(), "tok-2".to_owned()];
        let v = redacted(&s).unwrap();
        let text = v.to_string();
        for secret in ["hunter2", "gh-secret", "tok-1", "tok-2"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert_eq!(v["amqp"]["url"], "amqp://fleet:***@rabbit:5672/%2f");
        assert_eq!(v["gateway"]["github_secret"], HIDDEN);
        assert_eq!(v["gateway"]["api_tokens"][1], HIDDEN);
        // Unset secrets stay visibly unset.
        assert!(v["gateway"]["gitlab_token"].is_null());
        assert!(toml::to_string_pretty(&without_nulls(v)).is_ok());
    }
}
