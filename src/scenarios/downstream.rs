//! `/downstream?ms` — an HTTP call to this server's own `/coop/sleep?ms`.
//!
//! **What it does.** Sends `GET {self}/coop/sleep?ms=..` with the async HTTP
//! client and awaits the answer.
//!
//! **Why it does not stall.** Network IO is the case async was made for:
//! while the request is on the wire, the task is parked on a socket and the
//! worker polls others. The calling and the called request both run on this
//! same runtime, each in its own task, yet neither holds a worker while
//! waiting, which is why even a `current_thread` runtime can call itself.
//! (A blocking HTTP client here would deadlock a `current_thread` runtime:
//! the only worker would wait for an answer that only it could produce.)
//!
//! **What you will see.**
//! - JSON: `wall_ms` ≈ `ms`, `busy_ms` ≈ 0, and in `detail` the status and
//!   the answer of the downstream `/coop/sleep`.
//! - tokio-console: `GET /downstream` Idle, and meanwhile a
//!   `GET /coop/sleep` task.

use axum::extract::State;
use serde_json::json;
use tracing::Instrument;

use super::Scenario;
use crate::error::AppError;
use crate::params::Params;
use crate::report::{Probe, Report, fmt_ms};
use crate::state::AppState;

pub(super) const SCENARIO: Scenario = Scenario {
    route: "/downstream",
    params: &["ms"],
    lesson: "an HTTP call to this server's /coop/sleep: network IO waits without holding a worker",
    twin: None,
    stalls: false,
    example_query: "ms=100",
    handler: route,
};

fn route() -> axum::routing::MethodRouter<AppState> {
    axum::routing::get(handler)
}

pub(super) async fn handler(
    State(state): State<AppState>,
    probe: Probe,
    params: Params,
) -> Result<Report, AppError> {
    params.only(SCENARIO.params)?;
    let ms = params.ms()?;

    let url = format!("{}/coop/sleep?ms={ms}", state.self_url);
    // Awaiting the response parks this task on the socket; the worker is free.
    // A client span, and its context in a `traceparent` header: the called
    // request continues this trace, so Jaeger shows both in one trace.
    let client_span = tracing::info_span!(
        "downstream call",
        otel.name = "GET /coop/sleep",
        otel.kind = "client",
        http.request.method = "GET",
        url.full = %url,
        http.response.status_code = tracing::field::Empty,
    );
    let response = state
        .http
        .get(&url)
        .headers(crate::telemetry::inject_headers(&client_span))
        .send()
        .instrument(client_span.clone())
        .await
        .map_err(|e| AppError::Downstream(format!("GET {url}: {e}")))?;
    let status = response.status().as_u16();
    client_span.record("http.response.status_code", status);
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|e| AppError::Downstream(format!("GET {url}: unreadable answer: {e}")))?;

    let stats = probe.stats.snapshot();
    let verdict = format!(
        "waited {} for an HTTP call to /coop/sleep while holding a worker for only {}",
        fmt_ms(stats.wall_ms),
        fmt_ms(stats.busy_ms)
    );
    Ok(probe
        .report(&SCENARIO, json!({ "ms": ms }), stats, verdict)
        .with_detail(json!({ "url": url, "status": status, "answer": body })))
}
