//! `/block/cpu?ms` — a busy CPU loop in an async handler, never yielding.
//!
//! **What it does.** Runs [`crate::cpu::burn`] for `ms` milliseconds directly
//! in the handler.
//!
//! **Why it stalls.** Same as `/block/sleep`, but the thread is genuinely
//! working: there is no `.await` in the loop, so the poll lasts `ms` and the
//! worker serves nobody else. This is the realistic version of the bug —
//! hashing a password, parsing a huge JSON document, compressing a response
//! in a handler. tokio cannot preempt it: its cooperative budget only acts at
//! `.await` points on tokio resources, and this loop has none.
//!
//! **What you will see.**
//! - JSON: `polls` = 1, `busy_ms` ≈ `longest_poll_ms` ≈ `ms`. Unlike
//!   `/block/sleep` the thread is on-CPU for the whole stall (the stall
//!   watcher classifies it so).
//! - tokio-console: `GET /block/cpu` Busy for `ms`, Polls = 1.
//! - The dashboard, `/debug/stalls` and the log, while it computes: the held
//!   worker's stack, inside `stall_lab::cpu::burn` (src/cpu.rs) called from
//!   this handler.
//! - The fixed twins: `/coop/cpu` (same work in slices, yielding between) and
//!   `/offload/cpu` (same work on the blocking pool).

use std::time::Duration;

use axum::extract::State;
use serde_json::json;

use super::{HOLD_MS, Scenario, victims_phrase, worker_phrase};
use crate::budget::StallPermit;
use crate::cpu;
use crate::error::AppError;
use crate::params::Params;
use crate::report::{Probe, Report, fmt_ms};
use crate::state::AppState;

pub(super) const SCENARIO: Scenario = Scenario {
    route: "/block/cpu",
    params: &["ms"],
    lesson: "a CPU loop that never reaches an .await holds its worker thread until it is done",
    twin: Some("/offload/cpu"),
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

    // The blocking call: pure computation, no `.await` inside, so this poll
    // lasts until the loop is done.
    let rounds =
        tracing::info_span!("cpu loop", ms).in_scope(|| cpu::burn(Duration::from_millis(ms)));

    let stats = probe.stats.snapshot();
    let verdict = if stats.longest_poll_ms >= HOLD_MS {
        format!(
            "held {} for {} computing without yielding; {}",
            worker_phrase(&state, &stats.workers),
            fmt_ms(stats.longest_poll_ms),
            victims_phrase(&state)
        )
    } else {
        format!(
            "computed for only {} — too short to hold anyone up",
            fmt_ms(stats.longest_poll_ms)
        )
    };
    Ok(probe
        .report(&SCENARIO, json!({ "ms": ms }), stats, verdict)
        .with_detail(json!({ "rounds": rounds })))
}
