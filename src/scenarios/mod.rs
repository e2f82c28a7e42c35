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

pub mod block_cpu;
pub mod block_sleep;
pub mod catalogue;
pub mod coop_cpu;
pub mod coop_sleep;
pub mod downstream;
pub mod fanout_join;
pub mod fanout_offload;
pub mod fanout_sequential;
pub mod fanout_spawn;
pub mod healthz;
pub mod offload_cpu;

/// What the catalogue says about a route.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Scenario {
    pub route: &'static str,
    /// Query parameters it takes, in order.
    pub params: &'static [&'static str],
    /// The lesson, in one line.
    pub lesson: &'static str,
    /// The route that does the same work the other way (blocking ↔ fixed).
    pub twin: Option<&'static str>,
    /// Whether it holds a worker on purpose and so counts against the stall
    /// budget (`limits.max_stalling_in_flight`).
    pub stalls: bool,
    /// A query string that makes a good first try.
    pub example_query: &'static str,
}

impl Scenario {
    /// How the catalogue and the dashboard describe this scenario, with its
    /// example URL on `base_url` (the app server).
    pub fn describe(&self, base_url: &str) -> serde_json::Value {
        serde_json::json!({
            "route": self.route,
            "params": self.params,
            "lesson": self.lesson,
            "twin": self.twin,
            "stalls": self.stalls,
            "example": format!("{base_url}{}", self.example_path()),
        })
    }

    /// `route?example_query`, ready to append to a base URL.
    pub fn example_path(&self) -> String {
        if self.example_query.is_empty() {
            self.route.to_owned()
        } else {
            format!("{}?{}", self.route, self.example_query)
        }
    }
}

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

/// The scenario routes (everything but the catalogue).
pub fn router() -> Router<AppState> {
    Router::new()
        .route(block_sleep::SCENARIO.route, get(block_sleep::handler))
        .route(block_cpu::SCENARIO.route, get(block_cpu::handler))
        .route(coop_sleep::SCENARIO.route, get(coop_sleep::handler))
        .route(coop_cpu::SCENARIO.route, get(coop_cpu::handler))
        .route(offload_cpu::SCENARIO.route, get(offload_cpu::handler))
        .route(fanout_join::SCENARIO.route, get(fanout_join::handler))
        .route(
            fanout_sequential::SCENARIO.route,
            get(fanout_sequential::handler),
        )
        .route(fanout_spawn::SCENARIO.route, get(fanout_spawn::handler))
        .route(fanout_offload::SCENARIO.route, get(fanout_offload::handler))
        .route(downstream::SCENARIO.route, get(downstream::handler))
        .route(healthz::SCENARIO.route, get(healthz::handler))
        .route("/", get(catalogue::handler))
}

/// A poll longer than this is "holding the worker" in verdicts: long enough
/// to be no accident of scheduling, short enough that a person would notice
/// it in a latency chart.
pub const HOLD_MS: f64 = 20.0;

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
