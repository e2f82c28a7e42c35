//! `/fanout/spawn?n&ms` — `n` CPU jobs, each in its own `tokio::spawn`ed task.
//!
//! **What it does.** Spawns `n` tasks that each burn `ms` of CPU without
//! yielding, and awaits their `JoinHandle`s.
//!
//! **Why it is parallel only with more than one worker.** A spawned task is
//! a unit the scheduler can hand to *another* worker (idle workers steal from
//! busy ones), so on `multi_thread` with W workers the jobs run W at a time
//! and the request takes about ⌈n/W⌉·ms. On `current_thread` there is one
//! worker: the jobs run one after another (≈ n·ms) and, since none of them
//! yields, each one stalls the whole server for `ms`. Spawning gives
//! parallelism only if there are threads to run on — and these jobs still
//! hold the workers they run on, so they count against the stall budget.
//!
//! **What you will see.**
//! - JSON: `jobs` with `ran_on` = several workers and overlapping intervals
//!   on `multi_thread` (`detail.parallelism` ≈ W), or one worker and
//!   end-to-end intervals on `current_thread` (`parallelism` ≈ 1).
//! - tokio-console: `n` tasks `GET /fanout/spawn job`, each Busy for `ms`
//!   with Polls = 1, next to the Idle request task.

use axum::extract::State;
use serde_json::json;
use tracing::Instrument;

use super::Scenario;
use crate::budget::StallPermit;
use crate::error::AppError;
use crate::params::Params;
use crate::report::{Job, Probe, Report, fmt_ms, job_places, parallelism};
use crate::state::AppState;

pub(super) const SCENARIO: Scenario = Scenario {
    route: "/fanout/spawn",
    params: &["n", "ms"],
    lesson: "n spawned CPU tasks run in parallel only when there is more than one worker, and each holds the worker it runs on",
    twin: Some("/fanout/offload"),
    stalls: true,
    example_query: "n=4&ms=100",
    handler: route,
};

/// Task name of the spawned jobs in tokio-console.
pub(super) const JOB_TASK_NAME: &str = "GET /fanout/spawn job";

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
    let mut handles = Vec::with_capacity(n as usize);
    let mut tracked = Vec::with_capacity(n as usize);
    for index in 0..n as usize {
        // Each job is a task of its own: the unit a scheduler can move to
        // another worker. The job itself never yields.
        let handle = tokio::task::Builder::new()
            .name(JOB_TASK_NAME)
            // `.instrument` carries the request's trace into the new task:
            // spans do not follow `spawn` by themselves.
            .spawn(
                async move { Job::cpu(index, ms, started) }.instrument(tracing::info_span!(
                    "spawned job",
                    index,
                    ms
                )),
            )
            .map_err(|e| AppError::Internal(format!("cannot spawn job: {e}")))?;
        // Each job holds its worker: name it for the stall watcher, as part
        // of this request.
        let culprit = probe
            .culprit
            .as_ref()
            .map(|c| std::sync::Arc::new((**c).clone().with_task(JOB_TASK_NAME)));
        tracked.push(state.track(handle.id(), culprit));
        handles.push(handle);
    }
    let mut jobs = Vec::with_capacity(handles.len());
    for handle in handles {
        jobs.push(
            handle
                .await
                .map_err(|e| AppError::Internal(format!("job failed: {e}")))?,
        );
    }

    let stats = probe.stats.snapshot();
    let places = job_places(&jobs);
    let p = parallelism(&jobs);
    let verdict = format!(
        "{n} CPU jobs of {} ran on {} in {}: {p:.1}× parallel{}",
        fmt_ms(ms as f64),
        crate::report::fmt_places(&places),
        fmt_ms(stats.wall_ms),
        if places.len() == 1 {
            "; one worker means one job at a time, each holding it"
        } else {
            "; each job held its worker while it ran"
        }
    );
    Ok(probe
        .report(&SCENARIO, json!({ "n": n, "ms": ms }), stats, verdict)
        .with_jobs(jobs)
        .with_detail(json!({ "parallelism": p })))
}
