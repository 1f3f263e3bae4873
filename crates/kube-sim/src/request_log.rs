//! The request log: every request the server received, with the Kubernetes verb and
//! resource it maps to, so tests can assert how a client talked to the API (which
//! propagation policy a delete used, which (verb, resource) pairs an RBAC Role needs).

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use serde_json::Value;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// HTTP method (`GET`, `POST`, ...).
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Raw query string (empty when there was none).
    pub query: String,
    /// The body parsed as JSON, when it was JSON.
    pub body: Option<Value>,
    /// The response status; `0` when the connection was reset without a response.
    pub status: u16,
    /// When the request arrived.
    pub at: SystemTime,
    verb: &'static str,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
}

impl RequestRecord {
    pub(crate) fn new(method: &str, path: &str, query: &str, body: &[u8]) -> Self {
        let body = if body.is_empty() {
            None
        } else {
            serde_json::from_slice(body).ok()
        };
        let route = Route::parse(path);
        let is_watch = query_param(query, "watch").is_some_and(|v| v == "true" || v == "1");
        let verb = match (method, route.name.is_some(), is_watch) {
            _ if route.resource.is_empty() => "",
            ("GET", _, true) => "watch",
            ("GET", true, false) => "get",
            ("GET", false, false) => "list",
            ("POST", _, _) => "create",
            ("PUT", _, _) => "update",
            ("PATCH", _, _) => "patch",
            ("DELETE", true, _) => "delete",
            ("DELETE", false, _) => "deletecollection",
            _ => "",
        };
        Self {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            body,
            status: 0,
            at: SystemTime::now(),
            verb,
            resource: route.resource,
            namespace: route.namespace,
            name: route.name,
        }
    }

    /// The Kubernetes verb: `create`, `get`, `list`, `watch`, `patch`, `update`,
    /// `delete`, `deletecollection`; `""` for non-resource paths such as `/version`.
    pub fn verb(&self) -> &str {
        self.verb
    }

    /// The resource with its subresource: `jobs`, `jobs/status`, `pods`, `pods/log`,
    /// `pods/exec`, `pods/attach`; `""` for non-resource paths. A WebSocket exec or
    /// attach is a `GET` (verb `get`), as RBAC sees it; `POST` is `create`.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The namespace from the path, if any.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// The object name from the path, if any.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// A query parameter, form-decoded (`+` is a space).
    pub fn query_param(&self, key: &str) -> Option<String> {
        query_param(&self.query, key)
    }

    /// The delete propagation policy, from the body or the query.
    pub fn propagation_policy(&self) -> Option<String> {
        self.body
            .as_ref()
            .and_then(|b| b.get("propagationPolicy"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| self.query_param("propagationPolicy"))
    }
}

fn query_param(query: &str, key: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// A path split into its Kubernetes parts.
struct Route {
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
}

impl Route {
    fn parse(path: &str) -> Self {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        // Skip `/api/v1` or `/apis/<group>/<version>`.
        let rest: &[&str] = match segs.first() {
            Some(&"api") if segs.len() >= 2 => &segs[2..],
            Some(&"apis") if segs.len() >= 3 => &segs[3..],
            _ => {
                return Self {
                    resource: String::new(),
                    namespace: None,
                    name: None,
                };
            }
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some((*ns).to_owned()), tail),
            _ => (None, rest),
        };
        let resource = match rest {
            [res, _name, sub, ..] => format!("{res}/{sub}"),
            [res, ..] => (*res).to_owned(),
            [] => String::new(),
        };
        Self {
            resource,
            namespace,
            name: rest.get(1).map(|s| (*s).to_owned()),
        }
    }
}

/// The log of requests, in arrival order.
#[derive(Debug, Default)]
pub(crate) struct RequestLog {
    records: Mutex<Vec<RequestRecord>>,
}

impl RequestLog {
    /// Appends a record and returns its index (to fill in the status later).
    pub(crate) fn push(&self, record: RequestRecord) -> usize {
        observe(&record);
        let mut r = self.lock();
        r.push(record);
        r.len() - 1
    }

    pub(crate) fn set_status(&self, index: usize, status: u16) {
        if let Some(r) = self.lock().get_mut(index) {
            r.status = status;
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<RequestRecord> {
        self.lock().clone()
    }

    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RequestRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Environment variable naming a file that collects every resource request any
/// sim in this process serves, across a whole test run: one JSON line
/// `{"verb","resource","namespace","package"}` per request. `package` is the
/// Cargo package whose tests ran the sim (`CARGO_PKG_NAME`), so a checker can
/// tell the worker's calls from the sim's own tests. The RBAC check compares
/// these (verb, resource) pairs with the worker's Role.
pub const OBSERVED_ENV: &str = "SANDFLEET_RBAC_OBSERVED";

fn observe(record: &RequestRecord) {
    static PATH: OnceLock<Option<PathBuf>> = OnceLock::new();
    let Some(path) = PATH.get_or_init(|| std::env::var_os(OBSERVED_ENV).map(PathBuf::from)) else {
        return;
    };
    if record.verb.is_empty() {
        return;
    }
    let line = serde_json::json!({
        "verb": record.verb,
        "resource": record.resource,
        "namespace": record.namespace,
        "package": std::env::var("CARGO_PKG_NAME").unwrap_or_default(),
    });
    // One write_all of a short line on an O_APPEND file: lines from parallel
    // test processes do not interleave.
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot record the request for {OBSERVED_ENV}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_and_resources_follow_rbac_naming() {
        let cases = [
            (
                "POST",
                "/apis/batch/v1/namespaces/d/jobs",
                "",
                "create",
                "jobs",
            ),
            (
                "GET",
                "/apis/batch/v1/namespaces/d/jobs",
                "watch=true",
                "watch",
                "jobs",
            ),
            (
                "GET",
                "/apis/batch/v1/jobs",
                "labelSelector=a",
                "list",
                "jobs",
            ),
            (
                "GET",
                "/apis/batch/v1/namespaces/d/jobs/j",
                "",
                "get",
                "jobs",
            ),
            (
                "PATCH",
                "/apis/batch/v1/namespaces/d/jobs/j/status",
                "",
                "patch",
                "jobs/status",
            ),
            (
                "DELETE",
                "/apis/batch/v1/namespaces/d/jobs/j",
                "",
                "delete",
                "jobs",
            ),
            (
                "GET",
                "/api/v1/namespaces/d/pods/p/log",
                "follow=true",
                "get",
                "pods/log",
            ),
            ("GET", "/api/v1/namespaces/d/pods", "", "list", "pods"),
            (
                "GET",
                "/api/v1/namespaces/d/pods/p/exec",
                "command=sh&stdout=true",
                "get",
                "pods/exec",
            ),
            (
                "GET",
                "/api/v1/namespaces/d/pods/p/attach",
                "stdin=true&stdout=true",
                "get",
                "pods/attach",
            ),
            (
                "POST",
                "/api/v1/namespaces/d/pods/p/attach",
                "",
                "create",
                "pods/attach",
            ),
            ("GET", "/version", "", "", ""),
        ];
        for (method, path, query, verb, resource) in cases {
            let r = RequestRecord::new(method, path, query, b"");
            assert_eq!(
                (r.verb(), r.resource()),
                (verb, resource),
                "{method} {path}"
            );
        }
        let r = RequestRecord::new(
            "DELETE",
            "/apis/batch/v1/namespaces/d/jobs/j",
            "",
            br#"{"propagationPolicy":"Background"}"#,
        );
        assert_eq!(r.propagation_policy().as_deref(), Some("Background"));
        assert_eq!(r.name(), Some("j"));
        assert_eq!(r.namespace(), Some("d"));
    }
}
