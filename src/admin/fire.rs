//! `POST /api/fire`: the dashboard's buttons. Forwards a GET to the
//! application server, optionally N at once, and answers what came back with
//! the time it took as seen by a client. A POST, so the admin server's
//! `Origin` check applies: a page elsewhere cannot fire stalls through the
//! user's browser.
//!
//! Why a proxy rather than `fetch()` from the page straight to the app: the
//! app is another origin (another port), and a browser opens at most six
//! connections per host, so "fire ×8 concurrently" would not be concurrent.

use std::time::Instant;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use serde::Deserialize;
use serde_json::{Value, json};

/// Most requests one click may fire at once.
pub(super) const MAX_CONCURRENCY: usize = 64;

#[derive(Debug, Deserialize)]
pub(super) struct FireQuery {
    /// Path and query on the app, e.g. `/block/sleep?ms=200`.
    path: String,
    /// How many identical requests to send at once (1..=64). When given, the
    /// answer is `{"results": [...]}`.
    concurrency: Option<usize>,
}

/// Where `/api/fire` sends requests.
pub(super) struct Fire {
    /// Base URL of the app server.
    pub(super) app_url: String,
    /// Client living on the admin runtime.
    pub(super) http: reqwest::Client,
}

pub(super) async fn fire(
    State(state): State<std::sync::Arc<Fire>>,
    Query(query): Query<FireQuery>,
) -> Response {
    // Only paths on our own app: no scheme, no authority, no `//host`.
    if !query.path.starts_with('/') || query.path.starts_with("//") {
        return bad("path", "a path on the app, starting with a single /");
    }
    let n = query.concurrency.unwrap_or(1);
    if !(1..=MAX_CONCURRENCY).contains(&n) {
        return bad("concurrency", &format!("1..={MAX_CONCURRENCY}"));
    }
    let url = format!("{}{}", state.app_url, query.path);
    let calls = (0..n).map(|_| one(&state.http, &url));
    let mut results = futures::future::join_all(calls).await;
    if query.concurrency.is_none() {
        return no_store(Json(results.remove(0)));
    }
    no_store(Json(json!({ "results": results })))
}

async fn one(http: &reqwest::Client, url: &str) -> Value {
    let start = Instant::now();
    match http.get(url).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            let body = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
            json!({
                "status": status,
                "elapsed_ms": stall_watch::ms(start.elapsed()),
                "body": body,
            })
        }
        Err(e) => json!({
            "status": 502,
            "elapsed_ms": stall_watch::ms(start.elapsed()),
            "body": { "error": format!("the app did not answer: {e}") },
        }),
    }
}

fn bad(parameter: &str, allowed: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({
            "error": format!("bad `{parameter}`: expected {allowed}"),
            "parameter": parameter,
            "allowed": allowed,
        })),
    )
        .into_response()
}

/// Marks an answer as never cacheable: results are live.
fn no_store(body: impl IntoResponse) -> Response {
    let mut response = body.into_response();
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    response
}
