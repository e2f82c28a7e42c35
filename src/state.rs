//! What every handler can reach: the limits, the stall budget, and the
//! facts about the runtime it runs on.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::sync::Semaphore;

use crate::config::{Config, Flavor, LimitsConfig, ServerConfig};
use crate::stall::{Culprit, Monitor};
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
    /// Base URL of this very server, for `/downstream` to call itself.
    pub self_url: String,
    /// HTTP client for `/downstream`; one per server so connections are reused.
    pub http: reqwest::Client,
    /// Requests currently being handled, for the shutdown log.
    pub in_flight: AtomicUsize,
    /// The stall watcher's shared state, when it runs: request tasks are
    /// registered in it so a stall can name its culprit.
    pub monitor: Option<Arc<Monitor>>,
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

/// Unregisters a task from the stall watcher's culprit registry on drop.
pub struct Tracked {
    monitor: Option<Arc<Monitor>>,
    task: tokio::task::Id,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(monitor) = &self.monitor {
            monitor.culprits.unregister(self.task);
        }
    }
}

impl AppState {
    /// Names `task` as `culprit` for the stall watcher until the returned
    /// guard is dropped.
    pub fn track(&self, task: tokio::task::Id, culprit: Option<Arc<Culprit>>) -> Tracked {
        if let (Some(monitor), Some(culprit)) = (&self.monitor, culprit) {
            monitor.culprits.register(task, culprit);
        }
        Tracked {
            monitor: self.monitor.clone(),
            task,
        }
    }

    /// The task name of a request: `GET /block/sleep`.
    pub fn task_name(&self, method: &axum::http::Method, route: &str) -> Arc<str> {
        match self.names.get(route) {
            Some(names) if method == axum::http::Method::GET => names.task.clone(),
            _ => Arc::from(crate::request::task_name(method, route)),
        }
    }

    /// Who a request is, for the stall watcher: shared per route unless the
    /// request has its own trace ids.
    pub fn culprit(
        &self,
        task: &Arc<str>,
        route: &str,
        ids: Option<&(String, String)>,
    ) -> Arc<Culprit> {
        match (ids, self.names.get(route)) {
            (None, Some(names)) if Arc::ptr_eq(task, &names.task) => names.untraced.clone(),
            _ => Arc::new(Culprit {
                route: task.clone(),
                task: task.clone(),
                trace_id: ids.map(|(trace, _)| trace.clone()),
                span_id: ids.map(|(_, span)| span.clone()),
            }),
        }
    }

    pub fn new(
        config: &Config,
        self_url: String,
        monitor: Option<Arc<Monitor>>,
        console_budget: Option<Arc<ConsoleBudget>>,
    ) -> Self {
        let names = crate::scenarios::ALL
            .iter()
            .map(|s| {
                let task: Arc<str> =
                    Arc::from(crate::request::task_name(&axum::http::Method::GET, s.route));
                let untraced = Arc::new(Culprit {
                    route: task.clone(),
                    task: task.clone(),
                    trace_id: None,
                    span_id: None,
                });
                (s.route, RouteNames { task, untraced })
            })
            .collect();
        AppState(Arc::new(Shared {
            limits: config.limits.clone(),
            server: config.server.clone(),
            stall_budget: Arc::new(Semaphore::new(config.limits.max_stalling_in_flight)),
            flavor: config.runtime.flavor,
            workers: config.runtime.effective_workers(),
            self_url,
            http: reqwest::Client::builder()
                // Only loopback is ever called; never route it via a proxy
                // picked up from the environment.
                .no_proxy()
                .build()
                .expect("a plain HTTP client builds"),
            in_flight: AtomicUsize::new(0),
            monitor,
            console_budget,
            names,
        }))
    }
}
