//! Errors as HTTP answers: a status and a JSON body `{"error": {"code", "message"}}`
//! with a stable `code` a client can act on.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sandfleet_sandbox::session::SessionError;
use serde_json::json;

/// An error answer of the service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Stable machine-readable code (`session_limit`, `not_found`, `connection_lost`, ...).
    pub code: &'static str,
    /// What a human should know.
    pub message: String,
}

impl ApiError {
    /// A refused limit.
    pub(crate) fn limit(status: u16, code: &'static str, message: String) -> ApiError {
        ApiError {
            status,
            code,
            message,
        }
    }

    pub(crate) fn unauthorized() -> ApiError {
        ApiError {
            status: 401,
            code: "unauthorized",
            message: "a valid `Authorization: Bearer <token>` header is required".into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            code: "bad_request",
            message: message.into(),
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> ApiError {
        let (status, code) = match &e {
            SessionError::InvalidSpec(_) => (422, "invalid"),
            SessionError::NotFound(_) => (404, "not_found"),
            SessionError::Start(_) => (502, "start_failed"),
            // The command may or may not have run: never an exit code.
            SessionError::ConnectionLost(_) => (502, "connection_lost"),
            SessionError::Unavailable(_) => (503, "unavailable"),
            SessionError::File { .. } => (422, "file"),
            SessionError::Io(_) => (500, "internal"),
        };
        ApiError {
            status,
            code,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}
