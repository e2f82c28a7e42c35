//! `/fanout/offload?n&ms` — `n` CPU jobs on the blocking pool
//! (`spawn_blocking`).
//!
//! **What it does.** Submits `n` CPU jobs of `ms` each to tokio's blocking
//! pool and awaits them all.
//!
//! **Why it is parallel on the pool, on any flavor.** Blocking-pool threads
//! are separate OS threads, so the jobs run in parallel even on a
//! `current_thread` runtime, and no worker is held meanwhile. Two limits stay
//! visible: the pool has at most `runtime.max_blocking_threads` threads (more
//! jobs queue for a thread: their intervals start late), and the machine has
//! only so many cores. Each job burns CPU for `ms` of wall time, so 8 jobs on
//! 8 threads of a 2-core machine all finish in about `ms` — but each was on a
//! CPU only a quarter of that time (`cpu_ms`), and `parallelism` stays ≈ 2.
//! The jobs' threads run at a lower priority than the workers
//! (`runtime.offload_nice`), so however many jobs burn, a worker with
//! requests to read gets a core first: `/healthz` and the budget's 503s
//! still answer in milliseconds.
//!
//! **What you will see.**
//! - JSON: `jobs` on several blocking-pool threads with overlapping
//!   intervals; `detail.parallelism` (CPU time over wall time) close to
//!   min(n, cores); `busy_ms` of the request itself ≈ 0.
//! - tokio-console: `n` blocking tasks, and the request task Idle.

use axum::extract::State;
use serde_json::json;

use super::Scenario;
use crate::budget::StallPermit;
use crate::error::AppError;
use crate::params::Params;
use crate::report::{Job, Probe, Report, fmt_ms, job_threads, parallelism};
use crate::state::AppState;

pub(super) const SCENARIO: Scenario = Scenario {
    route: "/fanout/offload",
    params: &["n", "ms"],
    lesson: "n CPU jobs on spawn_blocking run in parallel on the blocking pool, even on current_thread, holding no worker",
    twin: Some("/fanout/spawn"),
    stalls: true,
    example_query: "n=4&ms=100",
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
    let n = params.n()?;
    let ms = params.ms()?;
    let _permit = StallPermit::acquire(&state)?;

    let started = probe.started;
    let handles: Vec<_> = (0..n as usize)
        .map(|index| {
            // Created here (a child of the request span), entered on the
            // blocking thread.
            let span = tracing::info_span!("offloaded job", index, ms);
            super::offload(&state, move || {
                span.in_scope(|| Job::cpu(index, ms, started))
            })
        })
        .collect();
    let mut jobs = Vec::with_capacity(handles.len());
    for handle in handles {
        jobs.push(
            handle
                .await
                .map_err(|e| AppError::Internal(format!("job failed: {e}")))?,
        );
    }

    let stats = probe.stats.snapshot();
    let threads = job_threads(&jobs);
    let p = parallelism(&jobs);
    let verdict = format!(
        "{n} CPU jobs of {} ran on {} blocking-pool thread(s) at once in {}, {p:.1}× parallel on the machine's {cores} core(s), while the request held a worker for only {}",
        fmt_ms(ms as f64),
        threads,
        fmt_ms(stats.wall_ms),
        fmt_ms(stats.busy_ms),
        cores = std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    Ok(probe
        .report(&SCENARIO, json!({ "n": n, "ms": ms }), stats, verdict)
        .with_jobs(jobs)
        .with_detail(json!({ "parallelism": p, "threads": threads })))
}
