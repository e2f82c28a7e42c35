//! The scenarios: one module per route, each a small lesson.
//!
//! Every module opens with what the handler does, why it stalls the executor
//! or does not, and what you will see in its JSON answer and in tokio-console.
//! Each blocking scenario has a "fixed twin" that does the same work without
//! holding a worker: `/block/sleep` ↔ `/coop/sleep`, `/block/cpu` ↔
//! `/coop/cpu` ↔ `/offload/cpu`.
//!
//! [`ALL`] is the one route table: the router, the catalogue at `/` and the
//! docs are all built from it.

use axum::Router;
use axum::routing::get;

use crate::state::AppState;

mod block_cpu;
mod block_sleep;
mod catalogue;
mod coop_cpu;
mod coop_sleep;
mod downstream;
mod fanout_join;
mod fanout_offload;
mod fanout_sequential;
mod fanout_spawn;
mod healthz;
mod offload_cpu;

/// Every scenario, in the order the catalogue lists them.
pub const ALL: &[Scenario] = &[
    block_sleep::SCENARIO,
    block_cpu::SCENARIO,
    coop_sleep::SCENARIO,
    coop_cpu::SCENARIO,
    offload_cpu::SCENARIO,
    fanout_join::SCENARIO,
    fanout_sequential::SCENARIO,
    fanout_spawn::SCENARIO,
    fanout_offload::SCENARIO,
    downstream::SCENARIO,
    healthz::SCENARIO,
];

/// The scenario routes, built from [`ALL`], and the catalogue at `/`.
pub fn router() -> Router<AppState> {
    ALL.iter()
        .fold(Router::new(), |router, s| {
            router.route(s.route, (s.handler)())
        })
        .route("/", get(catalogue::handler))
}

pub use crate::report::HOLD_MS;
pub use crate::scenario::Scenario;

/// Runs `job` on the blocking pool, its thread reniced by
/// `runtime.offload_nice` first ([`crate::cpu::lower_priority`]): offloaded
/// CPU work yields contended cores to the workers.
fn offload<T: Send + 'static>(
    state: &AppState,
    job: impl FnOnce() -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    let nice = state.offload_nice;
    tokio::task::spawn_blocking(move || {
        if let Err(e) = crate::cpu::lower_priority(nice) {
            tracing::debug!("offloaded job runs at the workers' priority: renice refused: {e}");
        }
        job()
    })
}

/// How the worker a request ran on is named in verdicts: on a
/// `current_thread` runtime it is "the only worker", which is the point.
pub fn worker_phrase(state: &AppState, places: &[stall_watch::Place]) -> String {
    if state.workers == 1 {
        "the only worker".to_owned()
    } else {
        crate::report::fmt_places(places)
    }
}

/// What the rest of the runtime suffered while a request held its worker.
pub fn victims_phrase(state: &AppState) -> &'static str {
    if state.workers == 1 {
        "every other request and task waited"
    } else {
        "every task queued on that worker waited"
    }
}
