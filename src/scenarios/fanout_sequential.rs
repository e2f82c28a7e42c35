//! `/fanout/sequential?n&ms` — the same `n` timer waits, awaited one by one.
//!
//! **What it does.** `for _ in 0..n { sleep(ms).await }`.
//!
//! **Why it takes ≈ `n·ms`.** Each `.await` waits for its timer before the
//! loop even creates the next one, so the waits cannot overlap. Nothing is
//! blocked — the worker is free the whole time — but the request is slow.
//! This is the shape of a handler that calls three services in a row when it
//! could call them together. Compare `/fanout/join`.
//!
//! **What you will see.**
//! - JSON: `wall_ms` ≈ `n·ms`; `jobs` intervals laid end to end;
//!   `polls` = `n` + 1; `busy_ms` ≈ 0.
//! - tokio-console: one task `GET /fanout/sequential`, Idle almost all along.

use std::time::{Duration, Instant};

use axum::extract::State;
use serde_json::json;
use tracing::Instrument;

use super::Scenario;
use crate::error::AppError;
use crate::params::Params;
use crate::report::{Job, Probe, Report, fmt_ms};
use crate::state::AppState;

pub(super) const SCENARIO: Scenario = Scenario {
    route: "/fanout/sequential",
    params: &["n", "ms"],
    lesson: "the same n waits awaited one by one take n·ms: nothing blocks, but nothing overlaps either",
    twin: Some("/fanout/join"),
    stalls: false,
    example_query: "n=8&ms=200",
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
    let n = params.n()?;
    let ms = params.ms()?;

    let mut jobs = Vec::with_capacity(n as usize);
    for index in 0..n as usize {
        let start = Instant::now();
        // The next wait is not even created until this one is over.
        tokio::time::sleep(Duration::from_millis(ms))
            .instrument(tracing::info_span!("sequential wait", index, ms))
            .await;
        jobs.push(Job::record(
            index,
            probe.started,
            start,
            Instant::now(),
            Duration::ZERO,
        ));
    }

    let stats = probe.stats.snapshot();
    let verdict = format!(
        "{n} waits of {} one after another took {} (about n·ms); the worker was free all along, the request was just serial",
        fmt_ms(ms as f64),
        fmt_ms(stats.wall_ms)
    );
    Ok(probe
        .report(&SCENARIO, json!({ "n": n, "ms": ms }), stats, verdict)
        .with_jobs(jobs))
}
