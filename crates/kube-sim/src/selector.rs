//! Label and field selectors, with the grammar of `k8s.io/apimachinery/pkg/labels`.
//!
//! A label selector is a comma-separated list of requirements, all of which must hold:
//! `key=value`, `key==value`, `key!=value`, `key in (a,b)`, `key notin (a,b)`, `key`
//! (exists) and `!key` (does not exist). Note that `!=` and `notin` also match objects
//! that lack the key, as on a real API server.

use std::collections::BTreeMap;

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value`.
    NotEquals(String, String),
    /// `key in (a,b)`.
    In(String, Vec<String>),
    /// `key notin (a,b)`.
    NotIn(String, Vec<String>),
    /// `key`.
    Exists(String),
    /// `!key`.
    DoesNotExist(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

/// Why a selector could not be parsed (the API server answers 400 BadRequest).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse requirement: {0}")]
pub struct SelectorError(pub String);

impl LabelSelector {
    /// Parses a selector string such as `app=x,tier in (a,b),!legacy`.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for part in split_top_level(input)? {
            let part = part.trim();
            if part.is_empty() {
                if input.trim().is_empty() {
                    continue;
                }
                return Err(SelectorError(format!("empty requirement in {input:?}")));
            }
            requirements.push(parse_requirement(part)?);
        }
        Ok(Self { requirements })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    /// Whether the object's `metadata.labels` satisfy the selector.
    pub fn matches_object(&self, object: &Value) -> bool {
        self.matches(&labels_of(object))
    }

    /// Whether this is the empty selector.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// Reads `metadata.labels` as a map (string values only).
pub(crate) fn labels_of(object: &Value) -> BTreeMap<String, String> {
    object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(input: &str) -> Result<Vec<&str>, SelectorError> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(SelectorError(format!("unbalanced ')' in {input:?}")));
                }
            }
            ',' if depth == 0 => {
                parts.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(SelectorError(format!("unbalanced '(' in {input:?}")));
    }
    parts.push(&input[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, SelectorError> {
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        check_key(key)?;
        return Ok(Requirement::DoesNotExist(key.to_owned()));
    }
    if let Some((k, v)) = part.split_once("!=") {
        let (k, v) = (k.trim(), v.trim());
        check_key(k)?;
        check_value(v)?;
        return Ok(Requirement::NotEquals(k.to_owned(), v.to_owned()));
    }
    if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        let (k, v) = (k.trim(), v.trim());
        check_key(k)?;
        check_value(v)?;
        return Ok(Requirement::Equals(k.to_owned(), v.to_owned()));
    }
    if let Some(open) = part.find('(') {
        let head = part[..open].trim();
        let rest = part[open..].trim();
        let Some(inner) = rest.strip_prefix('(').and_then(|r| r.strip_suffix(')')) else {
            return Err(SelectorError(format!("malformed set in {part:?}")));
        };
        let mut words = head.split_whitespace();
        let (Some(key), Some(op), None) = (words.next(), words.next(), words.next()) else {
            return Err(SelectorError(format!(
                "expected `key in (...)` in {part:?}"
            )));
        };
        check_key(key)?;
        let values: Vec<String> = inner
            .split(',')
            .map(|v| v.trim().to_owned())
            .collect::<Vec<_>>();
        for v in &values {
            check_value(v)?;
        }
        return match op {
            "in" => Ok(Requirement::In(key.to_owned(), values)),
            "notin" => Ok(Requirement::NotIn(key.to_owned(), values)),
            other => Err(SelectorError(format!(
                "unknown operator {other:?} in {part:?}"
            ))),
        };
    }
    if part.contains(char::is_whitespace) {
        return Err(SelectorError(format!("unexpected whitespace in {part:?}")));
    }
    check_key(part)?;
    Ok(Requirement::Exists(part.to_owned()))
}

/// Validates a label key: optional DNS-subdomain prefix and a name of ≤ 63 characters.
pub(crate) fn label_key_error(key: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && (p.is_empty() || p.len() > 253 || !is_dns1123_subdomain(p))
    {
        return Some("prefix part must be a lowercase RFC 1123 subdomain".to_owned());
    }
    if name.is_empty() || name.len() > 63 || !is_qualified_name(name) {
        return Some(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must \
             start and end with an alphanumeric character (max 63 characters)"
                .to_owned(),
        );
    }
    None
}

/// Validates a label value: empty, or ≤ 63 characters of the qualified-name alphabet.
pub(crate) fn label_value_error(value: &str) -> Option<String> {
    if value.len() > 63 {
        return Some("must be no more than 63 characters".to_owned());
    }
    if !value.is_empty() && !is_qualified_name(value) {
        return Some(
            "a valid label must be an empty string or consist of alphanumeric characters, \
             '-', '_' or '.', and must start and end with an alphanumeric character"
                .to_owned(),
        );
    }
    None
}

fn check_key(key: &str) -> Result<(), SelectorError> {
    match label_key_error(key) {
        Some(e) => Err(SelectorError(format!("invalid label key {key:?}: {e}"))),
        None => Ok(()),
    }
}

fn check_value(value: &str) -> Result<(), SelectorError> {
    match label_value_error(value) {
        Some(e) => Err(SelectorError(format!("invalid label value {value:?}: {e}"))),
        None => Ok(()),
    }
}

fn is_qualified_name(s: &str) -> bool {
    let b = s.as_bytes();
    let inner_ok = b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    inner_ok
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A lowercase RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
pub(crate) fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A lowercase RFC 1123 subdomain: dot-separated labels.
pub(crate) fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// A field selector; the fake supports `metadata.name` and `metadata.namespace` with
/// `=`, `==` and `!=`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector {
    terms: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses `metadata.name=x,metadata.namespace!=y`.
    pub(crate) fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        for part in input.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, true, v)
            } else {
                return Err(SelectorError(format!("invalid field selector {part:?}")));
            };
            let field = field.trim();
            if !matches!(field, "metadata.name" | "metadata.namespace") {
                return Err(SelectorError(format!("field label not supported: {field}")));
            }
            terms.push((field.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self { terms })
    }

    /// Whether the object satisfies every term.
    pub(crate) fn matches_object(&self, object: &Value) -> bool {
        self.terms.iter().all(|(field, equal, value)| {
            let actual = match field.as_str() {
                "metadata.name" => object.pointer("/metadata/name"),
                _ => object.pointer("/metadata/namespace"),
            }
            .and_then(Value::as_str)
            .unwrap_or("");
            (actual == value) == *equal
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn equality_and_set_requirements_are_anded() {
        let s = LabelSelector::parse("app=sandbox,tier in (a, b),env notin (prod),!legacy,team")
            .unwrap();
        let ok = labels(&[("app", "sandbox"), ("tier", "b"), ("team", "x")]);
        assert!(s.matches(&ok));
        let mut bad = ok.clone();
        bad.insert("legacy".into(), "1".into());
        assert!(!s.matches(&bad));
        let mut prod = ok.clone();
        prod.insert("env".into(), "prod".into());
        assert!(!s.matches(&prod));
        assert!(!s.matches(&labels(&[("app", "sandbox"), ("tier", "c"), ("team", "x")])));
    }

    #[test]
    fn not_equal_matches_missing_keys() {
        let s = LabelSelector::parse("app!=x").unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(!s.matches(&labels(&[("app", "x")])));
        let s = LabelSelector::parse("app==x").unwrap();
        assert!(s.matches(&labels(&[("app", "x")])));
    }

    #[test]
    fn prefixed_keys_and_empty_selector() {
        let s = LabelSelector::parse("sandfleet.dev/task-id=abc").unwrap();
        assert!(s.matches(&labels(&[("sandfleet.dev/task-id", "abc")])));
        assert!(LabelSelector::parse("").unwrap().matches(&labels(&[])));
    }

    #[test]
    fn invalid_selectors_are_rejected() {
        for bad in ["a in (b", "a=b=c d", "-bad=x", "a,,b", "a foo (x)", "a="] {
            let parsed = LabelSelector::parse(bad);
            if bad == "a=" {
                // An empty value is valid: `a=` matches a label with an empty value.
                assert!(parsed.is_ok());
            } else {
                assert!(parsed.is_err(), "{bad:?} should be rejected");
            }
        }
    }

    #[test]
    fn field_selector_on_name() {
        let f = FieldSelector::parse("metadata.name=job-1").unwrap();
        assert!(f.matches_object(&serde_json::json!({"metadata": {"name": "job-1"}})));
        assert!(!f.matches_object(&serde_json::json!({"metadata": {"name": "job-2"}})));
        assert!(FieldSelector::parse("status.phase=Running").is_err());
    }
}
