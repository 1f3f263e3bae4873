//! Small helpers over `metadata` and `status` of JSON objects.

use rand::Rng as _;
use serde_json::{Map, Value, json};

/// The kubelet's cap on a termination message, in bytes.
pub(crate) const MAX_TERMINATION_MESSAGE: usize = 4096;

/// Kubernetes timestamps have second precision.
pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub(crate) fn name(object: &Value) -> &str {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

pub(crate) fn namespace(object: &Value) -> &str {
    object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
}

pub(crate) fn uid(object: &Value) -> &str {
    object
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
}

pub(crate) fn resource_version(object: &Value) -> u64 {
    object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// `metadata` as a mutable map, created when missing or not an object.
pub(crate) fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.is_object() {
        *object = json!({});
    }
    let md = &mut object["metadata"];
    if !md.is_object() {
        *md = json!({});
    }
    match md {
        Value::Object(m) => m,
        // Just made it an object above.
        _ => unreachable!("metadata is an object"),
    }
}

pub(crate) fn is_deleting(object: &Value) -> bool {
    object
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

pub(crate) fn finalizers(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn set_finalizers(object: &mut Value, finalizers: &[String]) {
    let md = metadata_mut(object);
    if finalizers.is_empty() {
        md.remove("finalizers");
    } else {
        md.insert("finalizers".into(), json!(finalizers));
    }
}

pub(crate) fn remove_finalizer(object: &mut Value, finalizer: &str) {
    let remaining: Vec<String> = finalizers(object)
        .into_iter()
        .filter(|f| f != finalizer)
        .collect();
    set_finalizers(object, &remaining);
}

/// Deleting, no finalizers left and no grace period pending: the store drops it.
pub(crate) fn ready_to_remove(object: &Value) -> bool {
    is_deleting(object)
        && finalizers(object).is_empty()
        && object
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            == 0
}

/// The uid of the controlling owner, if any.
pub(crate) fn controller_uid(object: &Value) -> Option<&str> {
    object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)?
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
        .and_then(|r| r.get("uid"))
        .and_then(Value::as_str)
}

/// The name of the controlling owner, if any.
pub(crate) fn controller_name(object: &Value) -> Option<&str> {
    object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)?
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
        .and_then(|r| r.get("name"))
        .and_then(Value::as_str)
}

/// `generateName` + 5 characters from the API server's alphabet, with the prefix cut so
/// the result fits `max_len`.
pub(crate) fn generate_name(prefix: &str, max_len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let keep = prefix.len().min(max_len.saturating_sub(5));
    let mut name: String = prefix.chars().take(keep).collect();
    let mut rng = rand::rng();
    for _ in 0..5 {
        let i = rng.random_range(0..ALPHABET.len());
        name.push(char::from(ALPHABET[i]));
    }
    name
}

/// Sets (or replaces) a condition of type `ty` in `status.conditions`.
pub(crate) fn set_condition(
    object: &mut Value,
    ty: &str,
    status: &str,
    reason: &str,
    message: &str,
) {
    let now = now();
    let conditions = &mut object["status"]["conditions"];
    if !conditions.is_array() {
        *conditions = json!([]);
    }
    if let Value::Array(list) = conditions {
        if let Some(c) = list
            .iter_mut()
            .find(|c| c.get("type").and_then(Value::as_str) == Some(ty))
        {
            if c.get("status").and_then(Value::as_str) != Some(status) {
                c["lastTransitionTime"] = json!(now);
            }
            c["status"] = json!(status);
            c["reason"] = json!(reason);
            c["message"] = json!(message);
            if c.get("lastProbeTime").is_some() {
                c["lastProbeTime"] = json!(now);
            }
        } else {
            let mut c = json!({
                "type": ty,
                "status": status,
                "lastTransitionTime": now,
            });
            if !reason.is_empty() {
                c["reason"] = json!(reason);
            }
            if !message.is_empty() {
                c["message"] = json!(message);
            }
            list.push(c);
        }
    }
}

/// Whether `status.conditions` has `ty` with status `True`.
pub(crate) fn has_condition(object: &Value, ty: &str) -> bool {
    object
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|list| {
            list.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some(ty)
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        })
}

/// Truncates to at most `max` bytes on a char boundary.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_fit_and_keep_prefix() {
        let n = generate_name("sbx-", 63);
        assert_eq!(n.len(), 9);
        assert!(n.starts_with("sbx-"));
        let long = "a".repeat(80);
        assert_eq!(generate_name(&long, 63).len(), 63);
    }

    #[test]
    fn conditions_are_replaced_not_duplicated() {
        let mut o = json!({});
        set_condition(&mut o, "Ready", "False", "X", "");
        set_condition(&mut o, "Ready", "True", "", "");
        assert!(has_condition(&o, "Ready"));
        assert_eq!(o["status"]["conditions"].as_array().map(Vec::len), Some(1));
    }
}
