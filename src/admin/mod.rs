//! The admin server: the dashboard and `/debug/*`, on its own OS thread with
//! its own single-threaded runtime.
//!
//! It must keep answering while every application worker is blocked — that is
//! when you need it — so it shares nothing with the application runtime but
//! lock-free reads: the stall watcher's slots (atomics), tokio's runtime
//! metrics (atomics), and the lag probe's last report (atomics). It never
//! awaits anything that runs on the application runtime, except `/api/fire`,
//! which *is* a request to the application and waits like any client.

pub mod fire;
pub mod lag;
pub mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;

pub use lag::LagProbe;

use crate::config::Config;
use crate::stall::Monitor;

/// Name of the admin server's OS thread.
pub const THREAD_NAME: &str = "admin";

/// The dashboard: one self-contained page (no CDN, no build step).
pub const DASHBOARD_HTML: &str = include_str!("../../assets/dashboard.html");

/// How often `/debug/events` sends a snapshot.
pub const EVENTS_INTERVAL: Duration = Duration::from_millis(100);

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    pub monitor: Option<Arc<Monitor>>,
    /// tokio-console's task budget and its counters, when the console is on.
    pub console: Option<Arc<crate::telemetry::ConsoleBudget>>,
    /// Handle of the *application* runtime, for its metrics only.
    pub app: tokio::runtime::Handle,
    pub app_url: String,
    pub lag: Arc<LagProbe>,
    pub busy: Arc<views::BusySampler>,
    pub config: Arc<Config>,
    pub workers: usize,
    /// Client for `/api/fire`, living on the admin runtime.
    pub http: reqwest::Client,
}

/// A running admin server; dropping it stops the server.
pub struct AdminServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Binds `admin.listen` here (so a taken port is an error now, naming the
/// key) and serves the admin router from a new `admin` thread.
pub fn start(state: AdminState) -> anyhow::Result<AdminServer> {
    let listen = state.config.admin.listen;
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen} (admin.listen)"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || {
            // The admin runtime's tasks (connections, event streams, the
            // busy sampler) are plumbing: out of tokio-console, where they
            // would pass for the application's and spend its task budget.
            crate::telemetry::keep_this_thread_out_of_the_console();
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let sampler = state.busy.clone().run(state.app.clone());
                let serve = axum::serve(listener, router(state));
                // No graceful shutdown: `/debug/events` streams never end on
                // their own, and nothing here needs draining.
                tokio::select! {
                    result = serve => if let Err(e) = result {
                        tracing::error!("admin server stopped: {e}");
                    },
                    () = sampler => {},
                    _ = stop_rx => {},
                }
            });
        })
        .context("cannot spawn the admin thread")?;
    ready_rx
        .recv()
        .context("the admin thread died during startup")?
        .context("cannot start the admin runtime")?;
    Ok(AdminServer {
        addr,
        stop: Some(stop_tx),
    })
}

fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/api/info", get(info))
        .route("/api/fire", get(fire::fire))
        .route("/debug/runtime", get(views::runtime))
        .route("/debug/stalls", get(views::stalls))
        .route("/debug/events", get(views::events))
        .with_state(state)
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD_HTML)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "server": "admin" }))
}

/// Static facts for the dashboard: where things are, the limits, the
/// scenarios it can fire.
async fn info(axum::extract::State(state): axum::extract::State<AdminState>) -> Response {
    let scenarios: Vec<_> = crate::scenarios::ALL
        .iter()
        .map(|s| s.describe(&state.app_url))
        .collect();
    let c = &state.config;
    no_store(Json(json!({
        "app_url": state.app_url,
        // null when traces are not exported: no links to traces that do not exist.
        "jaeger_ui_url": c.telemetry.otlp.then_some(&c.admin.jaeger_ui_url),
        "flavor": c.runtime.flavor,
        "workers": state.workers,
        "max_blocking_threads": c.runtime.max_blocking_threads,
        "threshold_ms": c.stall.threshold_ms,
        "watch": state.monitor.is_some(),
        "limits": c.limits,
        "scenarios": scenarios,
        "max_fire_concurrency": fire::MAX_CONCURRENCY,
    })))
}

/// Marks an answer as never cacheable: the dashboard polls live data.
fn no_store(body: impl IntoResponse) -> Response {
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
