//! `/coop/sleep?ms` — `tokio::time::sleep(..).await`: waiting without holding
//! a worker.
//!
//! **What it does.** Registers a timer and awaits it.
//!
//! **Why it does not stall.** The first poll registers the timer and returns
//! `Pending`; the worker is free at once and polls other tasks. When the timer
//! fires, the runtime wakes the task and a worker polls it a second time to
//! finish. This is why IO-bound work scales on a few threads: each `.await`
//! hands the thread back. The fixed twin of `/block/sleep`.
//!
//! **What you will see.**
//! - JSON: `polls` = 2, `busy_ms` well under 1 ms, `wall_ms` ≈ `ms`. A
//!   `/healthz` sent meanwhile answers at once, even on `current_thread`.
//! - tokio-console: `GET /coop/sleep` Idle for almost all of its life, Busy
//!   for microseconds.

use std::time::Duration;

use axum::extract::State;
use serde_json::json;
use tracing::Instrument;

use super::Scenario;
use crate::error::AppError;
use crate::params::Params;
use crate::report::{Probe, Report, fmt_ms};
use crate::state::AppState;

pub(super) const SCENARIO: Scenario = Scenario {
    route: "/coop/sleep",
    params: &["ms"],
    lesson: "tokio::time::sleep(..).await waits without holding a worker: the thread serves others meanwhile",
    twin: Some("/block/sleep"),
    stalls: false,
    example_query: "ms=200",
    handler: route,
};

fn route() -> axum::routing::MethodRouter<AppState> {
    axum::routing::get(handler)
}

pub(super) async fn handler(
    State(_state): State<AppState>,
    probe: Probe,
    params: Params,
) -> Result<Report, AppError> {
    params.only(SCENARIO.params)?;
    let ms = params.ms()?;

    // Returns `Pending` at once and frees the worker until the timer fires.
    tokio::time::sleep(Duration::from_millis(ms))
        .instrument(tracing::info_span!("tokio::time::sleep", ms))
        .await;

    let stats = probe.stats.snapshot();
    let verdict = format!(
        "waited {} but held a worker for only {} in {} polls; the worker served other tasks meanwhile",
        fmt_ms(stats.wall_ms),
        fmt_ms(stats.busy_ms),
        stats.polls
    );
    Ok(probe.report(&SCENARIO, json!({ "ms": ms }), stats, verdict))
}
