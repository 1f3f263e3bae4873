//! `Status` error bodies, shaped exactly like the API server's so kube maps them into
//! `kube::Error::Api`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::store::Kind;

/// One `details.causes[]` entry of a 422 `Invalid`.
#[derive(Debug, Clone)]
pub(crate) struct Cause {
    pub(crate) reason: &'static str,
    pub(crate) message: String,
    pub(crate) field: String,
}

/// An API error, rendered as a `Status` object with a matching HTTP status code.
/// Boxed: it travels in `Result`s through every route.
#[derive(Debug, Clone)]
pub(crate) struct ApiError(Box<ErrorBody>);

/// The fields of an [`ApiError`].
#[derive(Debug, Clone)]
pub(crate) struct ErrorBody {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
    /// `details.name`, `details.group`, `details.kind`.
    pub(crate) details: Option<(String, &'static str, &'static str)>,
    pub(crate) causes: Vec<Cause>,
    pub(crate) retry_after_secs: Option<u64>,
}

impl std::ops::Deref for ApiError {
    type Target = ErrorBody;
    fn deref(&self) -> &ErrorBody {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut ErrorBody {
        &mut self.0
    }
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self(Box::new(ErrorBody {
            code,
            reason,
            message: message.into(),
            details: None,
            causes: Vec::new(),
            retry_after_secs: None,
        }))
    }

    fn with_details(mut self, kind: Kind, name: &str) -> Self {
        self.details = Some((name.to_owned(), kind.group(), kind.plural()));
        self
    }

    /// 404 `NotFound`: `jobs.batch "x" not found`.
    pub(crate) fn not_found(kind: Kind, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.qualified()),
        )
        .with_details(kind, name)
    }

    /// 409 `AlreadyExists`.
    pub(crate) fn already_exists(kind: Kind, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", kind.qualified()),
        )
        .with_details(kind, name)
    }

    /// 409 `Conflict` for a stale resourceVersion.
    pub(crate) fn conflict(kind: Kind, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                kind.qualified()
            ),
        )
        .with_details(kind, name)
    }

    /// 422 `Invalid` listing every failed field.
    pub(crate) fn invalid(kind: Kind, name: &str, causes: Vec<Cause>) -> Self {
        let summary: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let message = if summary.len() == 1 {
            format!(
                "{} \"{name}\" is invalid: {}",
                kind.kind_qualified(),
                summary.join(", ")
            )
        } else {
            format!(
                "{} \"{name}\" is invalid: [{}]",
                kind.kind_qualified(),
                summary.join(", ")
            )
        };
        let mut e = Self::new(422, "Invalid", message);
        e.details = Some((name.to_owned(), kind.group(), kind.kind_name()));
        e.causes = causes;
        e
    }

    /// 400 `BadRequest`.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 405 `MethodNotAllowed`.
    pub(crate) fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    /// 415 `UnsupportedMediaType`.
    pub(crate) fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (kube-sim got {content_type:?})"
            ),
        )
    }

    /// 410 `Expired` for a watch or list from a compacted resourceVersion.
    pub(crate) fn gone(rv: u64) -> Self {
        Self::new(410, "Expired", format!("too old resource version: {rv}"))
    }

    /// An injected error with the reason the API server uses for `code`.
    pub(crate) fn injected(code: u16, retry_after_secs: Option<u64>) -> Self {
        let (reason, message) = match code {
            400 => ("BadRequest", "injected bad request"),
            401 => ("Unauthorized", "Unauthorized"),
            403 => ("Forbidden", "forbidden (injected)"),
            404 => (
                "NotFound",
                "the server could not find the requested resource",
            ),
            409 => ("Conflict", "the object has been modified (injected)"),
            410 => ("Expired", "too old resource version (injected)"),
            429 => (
                "TooManyRequests",
                "too many requests, please try again later",
            ),
            500 => ("InternalError", "Internal error occurred: injected fault"),
            503 => (
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            504 => (
                "Timeout",
                "the server was unable to return a response in the time allotted",
            ),
            _ => ("InternalError", "injected fault"),
        };
        let mut e = Self::new(code, reason, message);
        e.retry_after_secs = retry_after_secs;
        e
    }

    /// The `Status` object.
    pub(crate) fn body(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        let mut details = serde_json::Map::new();
        if let Some((name, group, kind)) = &self.details {
            details.insert("name".into(), json!(name));
            if !group.is_empty() {
                details.insert("group".into(), json!(group));
            }
            details.insert("kind".into(), json!(kind));
        }
        if !self.causes.is_empty() {
            let causes: Vec<Value> = self
                .causes
                .iter()
                .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                .collect();
            details.insert("causes".into(), Value::Array(causes));
        }
        if let Some(secs) = self.retry_after_secs {
            details.insert("retryAfterSeconds".into(), json!(secs));
        }
        if !details.is_empty() {
            status["details"] = Value::Object(details);
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (code, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

/// A successful deletion `Status` (what `kube::Api::delete` returns as `Right(Status)`).
pub(crate) fn deleted_status(kind: Kind, name: &str, uid: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "group": kind.group(), "kind": kind.plural(), "uid": uid},
    })
}
