//! `/fanout/join?n&ms` — `n` timer waits polled together with `join_all`.
//!
//! **What it does.** Builds `n` futures that each `tokio::time::sleep(ms)`,
//! and awaits them all at once with `futures::future::join_all`.
//!
//! **Why it takes ≈ `ms`, not `n·ms`.** `join_all` polls every child each time
//! it is polled; each child registers its timer and returns `Pending`, so all
//! `n` timers run at the same time. This is *concurrency without
//! parallelism*: one task, one worker at a time, yet `n` waits overlap. No
//! thread is held while waiting, so it works the same on `current_thread`.
//! Compare `/fanout/sequential`.
//!
//! **What you will see.**
//! - JSON: `wall_ms` ≈ `ms`; `jobs` whose `[start_ms, end_ms]` intervals all
//!   overlap, all on the request's own worker; `busy_ms` ≈ 0.
//! - tokio-console: a single task `GET /fanout/join` (the branches are
//!   futures inside it, not tasks), Idle while the timers run.

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
    route: "/fanout/join",
    params: &["n", "ms"],
    lesson: "n timer waits polled together (join_all) take about ms in total: concurrency on one task",
    twin: Some("/fanout/sequential"),
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

    let started = probe.started;
    let waits = (0..n as usize).map(|index| {
        async move {
            let start = Instant::now();
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let end = Instant::now();
            // A timer wait holds no thread: its busy time is ~0 by construction.
            Job::record(index, started, start, end, Duration::ZERO)
        }
        .instrument(tracing::info_span!("join branch", index, ms))
    });
    // All n futures are polled by this one task; their timers overlap.
    let jobs = futures::future::join_all(waits).await;

    let stats = probe.stats.snapshot();
    let verdict = format!(
        "{n} waits of {} polled together finished in {} (about ms, not n·ms): concurrency without extra threads",
        fmt_ms(ms as f64),
        fmt_ms(stats.wall_ms)
    );
    Ok(probe
        .report(&SCENARIO, json!({ "n": n, "ms": ms }), stats, verdict)
        .with_jobs(jobs))
}
