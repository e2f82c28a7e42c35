//! What every handler can reach: the limits, the stall budget, and the
//! facts about the runtime it runs on.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::sync::Semaphore;

use stall_watch::{Culprit, Tracked, Watch};

use crate::config::{Config, Flavor, LimitsConfig, ServerConfig};
use crate::telemetry::ConsoleBudget;

/// Cloned for every request (by the middleware, the router and each
/// extractor), so it is one `Arc`: a clone is one atomic increment.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub limits: LimitsConfig,
    /// `[server]`: `server::run` takes its connection limits from here
    /// (header read timeout, connection cap, largest request head).
    pub server: ServerConfig,
    /// The stall budget: one semaphore shared by every stalling route, so it
    /// bounds them *together*. (A `ConcurrencyLimitLayer` on each route would
    /// not: every clone of that layer gets its own semaphore.)
    pub stall_budget: Arc<Semaphore>,
    pub flavor: Flavor,
    pub workers: usize,
    /// `runtime.offload_nice`: how far offloaded CPU work lowers its
    /// blocking-pool thread's priority.
    pub offload_nice: u8,
    /// Base URL of this very server, for `/downstream` to call itself.
    pub self_url: String,
    /// HTTP client for `/downstream`; one per server so connections are reused.
    pub http: reqwest::Client,
    /// Requests currently being handled, for the shutdown log.
    pub in_flight: AtomicUsize,
    /// The stall watcher, when it runs: request tasks are registered in it
    /// so a stall can name its culprit.
    pub watch: Option<Watch>,
    /// tokio-console's task budget, when the console is on: asked after each
    /// request whether it ran out, so that is logged (once).
    pub console_budget: Option<Arc<ConsoleBudget>>,
    /// `GET /route` for every scenario route, made once: a request's task
    /// name and culprit share these instead of formatting and allocating
    /// them per request.
    names: HashMap<&'static str, RouteNames>,
}

/// The names of one route, made once at startup.
struct RouteNames {
    task: Arc<str>,
    /// The culprit of a request without a trace (OTLP off): the same for
    /// every request of the route.
    untraced: Arc<Culprit>,
}

/// The task name of a request: method and route template, e.g.
/// `GET /block/sleep`, never the concrete path with its query.
pub fn task_name(method: &axum::http::Method, route: &str) -> String {
    format!("{method} {route}")
}

impl AppState {
    /// Names `task` as `culprit` for the stall watcher until the returned
    /// guard is dropped.
    pub fn track(&self, task: tokio::task::Id, culprit: Option<Arc<Culprit>>) -> Option<Tracked> {
        Some(self.watch.as_ref()?.track(task, culprit?))
    }

    /// The task name of a request: `GET /block/sleep`.
    pub fn task_name(&self, method: &axum::http::Method, route: &str) -> Arc<str> {
        match self.names.get(route) {
            Some(names) if method == axum::http::Method::GET => names.task.clone(),
            _ => Arc::from(task_name(method, route)),
        }
    }

    /// Who a request is, for the stall watcher: shared per route unless the
    /// request has its own trace ids (taken, not copied: the culprit is
    /// their last user).
    pub fn culprit(
        &self,
        task: &Arc<str>,
        route: &str,
        ids: Option<(String, String)>,
    ) -> Arc<Culprit> {
        match (&ids, self.names.get(route)) {
            (None, Some(names)) if Arc::ptr_eq(task, &names.task) => names.untraced.clone(),
            _ => {
                let culprit = Culprit::new(task.clone());
                Arc::new(match ids {
                    // Traced: the stall's span will link to the request's
                    // by these ids (`telemetry::link_stall_span`).
                    Some((trace, span_id)) => culprit.with_trace(trace, span_id),
                    None => culprit,
                })
            }
        }
    }

    pub fn new(
        config: &Config,
        self_url: String,
        watch: Option<Watch>,
        console_budget: Option<Arc<ConsoleBudget>>,
        routes: impl IntoIterator<Item = &'static str>,
    ) -> Self {
        let names = routes
            .into_iter()
            .map(|route| {
                let task: Arc<str> = Arc::from(task_name(&axum::http::Method::GET, route));
                let untraced = Arc::new(Culprit::new(task.clone()));
                (route, RouteNames { task, untraced })
            })
            .collect();
        AppState(Arc::new(Shared {
            limits: config.limits.clone(),
            server: config.server.clone(),
            stall_budget: Arc::new(Semaphore::new(config.limits.max_stalling_in_flight)),
            flavor: config.runtime.flavor,
            workers: config.runtime.effective_workers(),
            offload_nice: config.runtime.offload_nice,
            self_url,
            http: reqwest::Client::builder()
                // Only loopback is ever called; never route it via a proxy
                // picked up from the environment.
                .no_proxy()
                .build()
                .expect("a plain HTTP client builds"),
            in_flight: AtomicUsize::new(0),
            watch,
            console_budget,
            names,
        }))
    }
}
