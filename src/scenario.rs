//! What a scenario is: a route, its lesson, its twin, and its handler. The
//! table of them is [`crate::scenarios::ALL`]; the router, the catalogue and
//! the dashboard are all built from it.

use axum::routing::MethodRouter;

use crate::state::AppState;

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
    /// The route's handler, as the router mounts it.
    #[serde(skip)]
    pub handler: fn() -> MethodRouter<AppState>,
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
