//! The one error type of the application server, and its JSON shape.
//!
//! Every failure a client can cause answers JSON with an `error` sentence a
//! person can act on; a bad parameter also names the parameter and the range
//! it accepts, so `curl` alone is enough to correct the call.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Exit code for bad configuration, bad flags or bad input (clap uses 2 for
/// usage errors too, so scripts can treat every "you asked for something
/// invalid" alike).
pub(crate) const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub(crate) enum AppError {
    /// A query parameter is missing, malformed or out of range (400).
    #[error("{problem}")]
    BadParameter {
        parameter: String,
        allowed: String,
        problem: String,
    },
    /// No route matches (404).
    #[error("no route for {method} {path}")]
    NotFound { method: String, path: String },
    /// The route exists but not for this method (405).
    #[error("{method} is not allowed on {path}; every scenario is a GET")]
    MethodNotAllowed { method: String, path: String },
    /// Too many stalling requests in flight (503 with Retry-After).
    #[error(
        "stall budget exhausted: {limit} stalling requests are already in flight (limits.max_stalling_in_flight); retry when one finishes"
    )]
    StallBudget { limit: usize },
    /// `/downstream` could not reach its target (502).
    #[error("downstream call failed: {0}")]
    Downstream(String),
    /// A bug or an unexpected failure (500).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Seconds a client should wait before retrying past the stall budget.
pub(crate) const RETRY_AFTER_SECS: u64 = 1;

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let error = self.to_string();
        match self {
            AppError::BadParameter {
                parameter, allowed, ..
            } => (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": error, "parameter": parameter, "allowed": allowed })),
            )
                .into_response(),
            AppError::NotFound { .. } | AppError::MethodNotAllowed { .. } => {
                let status = if matches!(self, AppError::NotFound { .. }) {
                    StatusCode::NOT_FOUND
                } else {
                    StatusCode::METHOD_NOT_ALLOWED
                };
                (
                    status,
                    Json(json!({ "error": error, "hint": "GET / lists every scenario" })),
                )
                    .into_response()
            }
            AppError::StallBudget { limit } => {
                let mut response = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({ "error": error, "limit": limit })),
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
                response
            }
            AppError::Downstream(_) => {
                (StatusCode::BAD_GATEWAY, Json(json!({ "error": error }))).into_response()
            }
            AppError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": error })),
            )
                .into_response(),
        }
    }
}
