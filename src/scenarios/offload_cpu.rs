//! `/offload/cpu?ms` — the same CPU work as `/block/cpu`, on
//! `tokio::task::spawn_blocking`.
//!
//! **What it does.** Hands the CPU loop to tokio's blocking pool (a separate
//! set of OS threads, at most `runtime.max_blocking_threads`) and awaits the
//! result.
//!
//! **Why it does not stall.** The request task's poll only *submits* the job
//! and returns `Pending`; the worker is free at once. The loop runs on a
//! blocking-pool thread, which the OS schedules next to the workers. This is
//! the fix for CPU-heavy or blocking calls that cannot be cut into slices.
//! The pool is bounded: past `max_blocking_threads` jobs queue (see
//! `/fanout/offload`), and on a 2-core machine the work still competes for
//! the same two cores: at a lower priority (`runtime.offload_nice`, +10 by
//! default), so a worker with requests to read gets a core first.
//!
//! **What you will see.**
//! - JSON: `polls` = 2, `busy_ms` ≈ 0, and one job that `ran_on` the
//!   blocking pool with `busy_ms` ≈ `ms`.
//! - tokio-console: a `GET /offload/cpu` task that is Idle while a blocking
//!   task (kind "blocking") is Busy for `ms`.

use axum::extract::State;
use serde_json::json;

use super::{Scenario, worker_phrase};
use crate::error::AppError;
use crate::params::Params;
use crate::report::{Job, Probe, Report, fmt_ms};
use crate::state::AppState;

pub(super) const SCENARIO: Scenario = Scenario {
    route: "/offload/cpu",
    params: &["ms"],
    lesson: "the same CPU work on spawn_blocking runs on the blocking pool: the worker is free at once",
    twin: Some("/block/cpu"),
    stalls: false,
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

    let started = probe.started;
    // The closure runs on a blocking-pool thread; awaiting its JoinHandle
    // frees this worker until the job is done.
    // The span is created here, inside the request span, and entered on the
    // blocking thread: spans do not follow `spawn_blocking` by themselves.
    let span = tracing::info_span!("offloaded job", index = 0, ms);
    let job = super::offload(&state, move || span.in_scope(|| Job::cpu(0, ms, started)))
        .await
        .map_err(|e| AppError::Internal(format!("offloaded job failed: {e}")))?;

    let stats = probe.stats.snapshot();
    let verdict = format!(
        "ran {} of CPU work on the blocking pool ({}); the request held {} for only {}",
        fmt_ms(job.busy_ms),
        job.thread,
        worker_phrase(&state, &stats.workers),
        fmt_ms(stats.busy_ms)
    );
    Ok(probe
        .report(&SCENARIO, json!({ "ms": ms }), stats, verdict)
        .with_jobs(vec![job]))
}
