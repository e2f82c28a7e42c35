//! `/healthz` — answers at once. The probe that suffers when workers stall.
//!
//! **What it does.** Nothing: it returns as soon as it is polled.
//!
//! **Why it matters.** Its latency *is* the executor's health. Fired while
//! `/block/sleep` holds the only worker of a `current_thread` runtime, it
//! waits for the whole sleep. On `multi_thread` another worker usually
//! answers it, but not always: if the blocked worker was the one polling the
//! sockets, tokio may leave the free worker asleep until the block ends
//! (README, "A free worker is not enough"; `examples/free_worker.rs`).
//! It is the victim, never the culprit.
//!
//! **What you will see.**
//! - JSON: `wall_ms` and `busy_ms` of a few microseconds; `queued_ms` shows
//!   how long its bytes sat in the socket before a worker read them (the
//!   whole stall, on a blocked `current_thread` runtime), and
//!   `sched_delay_ms` how long its task then waited for a worker. When it
//!   waited, the verdict says which workers were held meanwhile, and
//!   whether a free one failed to pick it up.
//! - tokio-console: short-lived `GET /healthz` tasks.

use axum::extract::State;
use serde_json::json;

use super::Scenario;
use crate::error::AppError;
use crate::params::Params;
use crate::report::{Probe, Report, fmt_ms};
use crate::state::AppState;

pub(super) const SCENARIO: Scenario = Scenario {
    route: "/healthz",
    params: &[],
    lesson: "answers at once; its latency is the executor's health, and it suffers when workers stall",
    twin: None,
    stalls: false,
    example_query: "",
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
    let stats = probe.stats.snapshot();
    let queued = stats.queued_ms.unwrap_or(0.0);
    let verdict = if queued >= super::HOLD_MS {
        format!(
            "a victim: answered in {} once it ran",
            fmt_ms(stats.wall_ms)
        )
    } else {
        format!(
            "healthy: answered in {} after waiting {} for a worker",
            fmt_ms(stats.wall_ms),
            fmt_ms(stats.sched_delay_ms + queued)
        )
    };
    Ok(probe.report(&SCENARIO, json!({}), stats, verdict))
}
