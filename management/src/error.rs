//! The API's errors, answered as RabbitMQ answers them: a status and
//! `{"error": …, "reason": …}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// The realm of the Basic challenge.
pub const REALM: &str = "Basic realm=\"Ferry\"";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    /// RabbitMQ's short error word (`not_authorized`, `Object Not Found`, `bad_request`).
    pub error: &'static str,
    pub reason: String,
}

impl ApiError {
    /// No or bad credentials (with the Basic challenge).
    pub fn unauthorized(reason: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::UNAUTHORIZED, error: "not_authorized", reason: reason.into() }
    }
    /// Logged in, but the user's tags do not allow it (RabbitMQ answers 401 here too, which
    /// its clients expect).
    pub fn not_allowed(reason: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::UNAUTHORIZED, error: "not_authorised", reason: reason.into() }
    }
    pub fn not_found() -> ApiError {
        ApiError { status: StatusCode::NOT_FOUND, error: "Object Not Found", reason: "Not Found".into() }
    }
    pub fn bad_request(reason: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, error: "bad_request", reason: reason.into() }
    }
    pub fn unavailable(reason: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, error: "unavailable", reason: reason.into() }
    }
    pub fn too_many(reason: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::TOO_MANY_REQUESTS, error: "too_many_requests", reason: reason.into() }
    }
    pub fn internal(reason: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, error: "internal_error", reason: reason.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let challenge = self.status == StatusCode::UNAUTHORIZED;
        let body = serde_json::json!({ "error": self.error, "reason": self.reason });
        let mut response = (self.status, Json(body)).into_response();
        if challenge {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(REALM));
        }
        response
    }
}
