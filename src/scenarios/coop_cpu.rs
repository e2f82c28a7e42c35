//! `/coop/cpu?ms` — the same CPU work as `/block/cpu`, in ~1 ms slices with
//! `tokio::task::yield_now().await` between them.
//!
//! **What it does.** Burns CPU for `ms` milliseconds in total, one
//! [`SLICE`] at a time, yielding to the scheduler after each slice.
//!
//! **Why it does not stall.** Each `yield_now().await` ends the poll and puts
//! the task at the back of the queue, so other ready tasks run between
//! slices: the worker is *shared*. It is still busy — this is no faster, and
//! on a `current_thread` runtime two such requests take twice as long each —
//! but nobody waits more than one slice. This is the fix when the work must
//! stay on the runtime and can be cut into pieces; otherwise use
//! `/offload/cpu`.
//!
//! **What you will see.**
//! - JSON: `polls` ≈ `ms` (one per slice), `busy_ms` ≈ `ms`, but
//!   `longest_poll_ms` ≈ 1. `wall_ms` grows when other tasks share the worker.
//! - tokio-console: `GET /coop/cpu` with a climbing poll count, Busy most of
//!   the time, and no "never yielded" warning.

use std::time::{Duration, Instant};

use axum::extract::State;
use serde_json::json;
use tracing::Instrument;

use super::{Scenario, worker_phrase};
use crate::cpu;
use crate::error::AppError;
use crate::params::Params;
use crate::report::{Probe, Report, fmt_ms};
use crate::state::AppState;

pub(super) const SCENARIO: Scenario = Scenario {
    route: "/coop/cpu",
    params: &["ms"],
    lesson: "the same CPU work in ~1 ms slices with yield_now().await between them shares the worker",
    twin: Some("/block/cpu"),
    stalls: false,
    example_query: "ms=200",
    handler: route,
};

/// How much work runs between two yields: short enough that a request
/// queued behind this one waits about a millisecond, long enough that the
/// cost of a yield (a trip through the scheduler) stays small.
pub(super) const SLICE: Duration = Duration::from_millis(1);

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
    let total = Duration::from_millis(ms);

    let sliced_loop = async {
        let mut done = Duration::ZERO;
        let mut slices = 0u64;
        while done < total {
            let slice = SLICE.min(total - done);
            let start = Instant::now();
            cpu::burn(slice);
            done += start.elapsed();
            slices += 1;
            // End this poll and go to the back of the queue: whatever else is
            // ready on this worker runs now, before our next slice.
            tokio::task::yield_now().await;
        }
        slices
    };
    let slices = sliced_loop
        .instrument(tracing::info_span!("cpu loop (sliced)", ms))
        .await;

    let stats = probe.stats.snapshot();
    let verdict = format!(
        "did {} of CPU work on {} in {} slices of at most {}; other tasks ran between slices, so the request took {}",
        fmt_ms(stats.busy_ms),
        worker_phrase(&state, &stats.workers),
        slices,
        fmt_ms(stats.longest_poll_ms),
        fmt_ms(stats.wall_ms)
    );
    Ok(probe
        .report(&SCENARIO, json!({ "ms": ms }), stats, verdict)
        .with_detail(json!({ "slices": slices })))
}
