//! The application router: scenarios, catalogue, JSON fallbacks, and the
//! middleware that runs each request in its own measured task.

use axum::Router;
use axum::http::{Method, Uri};
use axum::middleware;

use crate::error::AppError;
use crate::request;
use crate::scenarios;
use crate::state::AppState;

/// Builds the application. Tests can drive it with `tower::ServiceExt::oneshot`
/// without a socket; `server::run` serves it on one.
pub fn app(state: AppState) -> Router {
    scenarios::router()
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // `layer` (not `route_layer`) so that unmatched requests are measured
        // and named too; `MatchedPath` is already known when it runs.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request::run_in_own_task,
        ))
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> AppError {
    AppError::NotFound {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> AppError {
    AppError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}
