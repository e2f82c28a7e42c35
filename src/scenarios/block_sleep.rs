//! `/block/sleep?ms` — `std::thread::sleep` inside an async handler.
//!
//! **What it does.** Calls the *standard library's* sleep, which parks the OS
//! thread, in the middle of an `async fn`.
//!
//! **Why it stalls.** An `async fn` runs only while it is being polled, and a
//! poll ends only when the code reaches an `.await` that returns `Pending`.
//! There is none here, so this one poll lasts `ms` milliseconds and the worker
//! thread that polls it can do nothing else: tasks queued on it wait, and on
//! a `current_thread` runtime the whole server waits. `async` is not parallel.
//! The thread is not even busy — it is asleep — but nothing else can use it.
//!
//! **What you will see.**
//! - JSON: `polls` = 1, `busy_ms` ≈ `longest_poll_ms` ≈ `wall_ms` ≈ `ms`.
//!   A `/healthz` sent meanwhile on `--flavor current_thread` waits the whole
//!   `ms`. On `multi_thread` another worker answers it if that worker is
//!   awake; when this request came on a keep-alive connection (the
//!   dashboard's buttons) it usually is not, and the `/healthz` waits too
//!   (README, "A free worker is not enough").
//! - tokio-console: a task `GET /block/sleep` that is Busy for the whole
//!   `ms` with Polls = 1; past 1 s the console warns it has never yielded.
//! - The dashboard, `/debug/stalls` and the log, while it sleeps: the held
//!   worker's stack, `std::thread::sleep` called from the line below in
//!   this file (`stall over: … by GET /block/sleep at
//!   src/scenarios/block_sleep.rs:NN in std::thread::functions::sleep`);
//!   Jaeger shows the same line as the `executor.stall` span's `code.*`.
//! - The fixed twin is `/coop/sleep`.

use std::time::Duration;

use axum::extract::State;
use serde_json::json;

use super::{HOLD_MS, Scenario, victims_phrase, worker_phrase};
use crate::budget::StallPermit;
use crate::error::AppError;
use crate::params::Params;
use crate::report::{Probe, Report, fmt_ms};
use crate::state::AppState;

pub(super) const SCENARIO: Scenario = Scenario {
    route: "/block/sleep",
    params: &["ms"],
    lesson: "std::thread::sleep in an async handler holds its worker thread for the whole sleep",
    twin: Some("/coop/sleep"),
    stalls: true,
    example_query: "ms=200",
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
    let _permit = StallPermit::acquire(&state)?;

    // The blocking call. No `.await`: this poll does not end until the
    // thread wakes up, so nothing else runs on this worker meanwhile.
    // (The span shows the sleep in Jaeger; entering it is not an `.await`.)
    tracing::info_span!("std::thread::sleep", ms)
        .in_scope(|| std::thread::sleep(Duration::from_millis(ms)));

    let stats = probe.stats.snapshot();
    let verdict = if stats.longest_poll_ms >= HOLD_MS {
        format!(
            "held {} for {} without yielding (asleep, not computing); {}",
            worker_phrase(&state, &stats.workers),
            fmt_ms(stats.longest_poll_ms),
            victims_phrase(&state)
        )
    } else {
        format!(
            "slept only {} — too short to hold anyone up",
            fmt_ms(stats.longest_poll_ms)
        )
    };
    Ok(probe.report(&SCENARIO, json!({ "ms": ms }), stats, verdict))
}
