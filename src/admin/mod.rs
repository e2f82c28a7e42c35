//! stall-lab's admin server: stall-watch's (dashboard, `/debug/*`, on its
//! own thread), plus what only stall-lab has: the scenarios and limits in
//! `/api/info`, the dashboard's fire buttons (`POST /api/fire`), the blocking
//! pool's size, the console's budget and the span export's counters in
//! `/debug/runtime`.

mod fire;

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::routing::post;
use serde_json::json;
use stall_watch::{AdminServer, Watch};

use crate::config::Config;
use crate::telemetry::{ConsoleBudget, ExportCounters};

/// What the admin server shows besides the watch itself.
pub(crate) struct AdminParts {
    pub config: Arc<Config>,
    /// tokio-console's task budget and its counters, when the console is on.
    pub console: Option<Arc<ConsoleBudget>>,
    /// The span export's counters, when OTLP export is on.
    pub export: Option<ExportCounters>,
    pub app_url: String,
    pub workers: usize,
}

/// Binds `admin.listen` and serves from the admin thread.
pub(crate) fn start(watch: &Watch, parts: AdminParts) -> anyhow::Result<AdminServer> {
    let AdminParts {
        config,
        console,
        export,
        app_url,
        workers,
    } = parts;
    let scenarios: Vec<_> = crate::scenarios::ALL
        .iter()
        .map(|s| s.describe(&app_url))
        .collect();
    let c = &config;
    let info = json!({
        "name": "stall-lab",
        "app_url": app_url,
        // null when traces are not exported: no links to traces that do not exist.
        "jaeger_ui_url": c.telemetry.otlp.then_some(&c.admin.jaeger_ui_url),
        "flavor": c.runtime.flavor,
        "workers": workers,
        "max_blocking_threads": c.runtime.max_blocking_threads,
        "limits": c.limits,
        "scenarios": scenarios,
        "max_fire_concurrency": fire::MAX_CONCURRENCY,
    });
    let max_blocking_threads = c.runtime.max_blocking_threads;
    let fire = fire::Fire {
        app_url,
        http: reqwest::Client::builder().no_proxy().build()?,
    };
    let routes = Router::new()
        .route("/api/fire", post(fire::fire))
        .with_state(Arc::new(fire));
    let mut admin = watch
        .admin(c.admin.listen)
        .info(info)
        .routes(routes)
        .runtime_extra(move || {
            json!({
                "max_blocking_threads": max_blocking_threads,
                // null with the console off.
                "console": console.as_ref().map(|b| b.snapshot()),
                // Spans exported, dropped (a collector down, slow or
                // blackholed), queued; null with OTLP off.
                "otlp": export.as_ref().map(ExportCounters::snapshot),
            })
        })
        // The admin runtime's tasks (connections, event streams) are
        // plumbing: out of tokio-console, where they would pass for the
        // application's and spend its task budget.
        .on_thread_start(crate::telemetry::keep_this_thread_out_of_the_console);
    for host in &c.admin.allowed_hosts {
        admin = admin.allow_host(host);
    }
    let listen = c.admin.listen;
    admin
        .spawn()
        .with_context(|| format!("cannot listen on {listen} (admin.listen)"))
}
