//! Starting, running and stopping the application server.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::app::app;
use crate::config::Loaded;
use crate::state::AppState;

/// Runs `stall-lab serve` to completion: builds the runtime, binds, serves
/// until SIGINT/SIGTERM, drains, and returns.
pub fn serve(loaded: Loaded) -> anyhow::Result<()> {
    let config = loaded.config;
    // Telemetry first: the console layer must be in place before the runtime
    // spawns its first task, or tokio-console would miss it.
    let telemetry = crate::telemetry::init(
        &config.telemetry,
        &crate::telemetry::ResourceInfo {
            flavor: config.runtime.flavor.as_str(),
            workers: config.runtime.effective_workers(),
        },
    )?;
    for line in telemetry.describe() {
        tracing::info!("{line}");
    }
    if let Some(addr) = telemetry.console_addr() {
        announce("console", addr);
    }

    let workers = config.runtime.effective_workers();
    // The stall watcher exists before the runtime: its hooks are part of
    // the runtime's construction.
    let watch = config
        .stall
        .watch
        .then(|| watch_config(&config))
        .map(stall_watch::Watch::new);
    let runtime = crate::runtime::build(&config.runtime, watch.as_ref())
        .context("cannot build the tokio runtime")?;
    tracing::info!(
        flavor = %config.runtime.flavor,
        workers,
        max_blocking_threads = config.runtime.max_blocking_threads,
        "runtime: {} with {workers} worker thread(s), blocking pool up to {} threads",
        config.runtime.flavor,
        config.runtime.max_blocking_threads,
    );
    match &watch {
        Some(w) => tracing::info!(
            "stall watcher: on, a poll longer than {} ms is a stall (stall.threshold_ms)",
            w.threshold().as_millis()
        ),
        None => tracing::info!("stall watcher: off (stall.watch = false)"),
    }
    if config.stall.wake_idle_worker {
        match (&watch, config.runtime.flavor) {
            (Some(_), crate::config::Flavor::MultiThread) => {
                tracing::info!(
                    "stall watcher: wakes an idle worker when a stall begins \
                     (stall.wake_idle_worker), so new requests are read during one-worker stalls"
                );
            }
            (None, _) => tracing::warn!(
                "stall.wake_idle_worker needs the stall watcher (stall.watch = true); ignored"
            ),
            (Some(_), _) => tracing::warn!(
                "stall.wake_idle_worker does nothing on a current_thread runtime \
                 (there is no other worker to wake); ignored"
            ),
        }
    }

    // Bound before the runtime runs, so the admin server knows the app's
    // address (port 0 included).
    let (app_listener, addr) = crate::net::bind(config.server.listen, "server.listen")?;
    let app_url = format!("http://{addr}");

    let config = Arc::new(config);
    let console_budget = telemetry.console_budget();
    // Without the watcher, an unused watch serves the admin pages (its
    // views then show no stalls), so the dashboard and /debug/runtime work
    // either way.
    let admin_watch = watch.clone().unwrap_or_else(|| {
        let unwatched = stall_watch::Watch::new(stall_watch::Config::default().stacks(false));
        unwatched.attach(runtime.handle());
        unwatched
    });
    if let Some(watch) = &watch {
        watch.attach(runtime.handle());
    }
    let admin = crate::admin::start(
        &admin_watch,
        crate::admin::AdminParts {
            config: config.clone(),
            console: console_budget.clone(),
            app_url: app_url.clone(),
            workers,
        },
    )?;
    announce("app", addr);
    announce("admin", admin.local_addr());

    let result = runtime.block_on(async {
        let listener = TcpListener::from_std(app_listener)?;
        let state = AppState::new(
            &config,
            app_url,
            watch,
            console_budget,
            crate::scenarios::ALL.iter().map(|s| s.route),
        );
        run(
            listener,
            state,
            crate::shutdown::signal(),
            Duration::from_millis(config.server.shutdown_grace_ms),
        )
        .await
        .context("the application server failed")
    });
    drop(admin);
    // Detached work (a fan-out job whose request was abandoned, a blocking
    // job still running) must not keep the process alive forever.
    runtime.shutdown_timeout(Duration::from_secs(1));

    // Flush spans of the requests that completed. This blocks, so it runs
    // here on the main thread, after the runtime is gone — never on a worker.
    let report = telemetry.shutdown(TELEMETRY_FLUSH_TIMEOUT);
    if report.dropped_spans > 0 {
        tracing::warn!(
            "telemetry: {} span(s) exported, {} dropped (collector unreachable or too slow)",
            report.exported_spans,
            report.dropped_spans
        );
    } else {
        tracing::info!(
            "telemetry: {} span(s) exported, none dropped",
            report.exported_spans
        );
    }
    result
}

/// The stall watcher's settings, from the `stall.*` keys; trace links only
/// when traces are exported (a link to a trace never sent would confuse).
pub(crate) fn watch_config(config: &crate::config::Config) -> stall_watch::Config {
    let stall = &config.stall;
    let mut watch = stall_watch::Config::default()
        .threshold(Duration::from_millis(stall.threshold_ms))
        .history(stall.history)
        .wake_idle_worker(stall.wake_idle_worker)
        .stacks(stall.stacks);
    if config.telemetry.otlp {
        watch = watch.trace_url(config.admin.jaeger_ui_url.as_str());
    }
    watch
}

/// How long shutdown waits for the last spans to reach the collector. With
/// the collector gone, the process still exits within
/// `server.shutdown_grace_ms` + this + a little.
pub const TELEMETRY_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Prints the `listening: NAME http://ADDR` line scripts look for, on
/// stdout, and flushes it at once (stdout is block-buffered when piped).
pub fn announce(name: &str, addr: SocketAddr) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening: {name} http://{addr}");
    let _ = out.flush();
}

/// Serves `state`'s application on `listener` until `shutdown` completes, then
/// lets requests in flight finish for up to `grace`.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    // For the shutdown log: how many requests were in flight.
    let at_grace_start = state.clone();
    let at_grace_end = state.clone();
    let listener = crate::arrival::ArrivalListener::new(listener);
    let app = app(state).into_make_service_with_connect_info::<crate::arrival::Arrival>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    });
    // Starts counting only once shutdown has begun.
    let grace_expired = async move {
        let _ = stopping_rx.wait_for(|stopping| *stopping).await;
        let waiting = at_grace_start.in_flight.load(Ordering::Relaxed);
        if waiting > 0 {
            tracing::info!(
                "waiting up to {} ms for {waiting} request(s) in flight",
                grace.as_millis()
            );
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => {
            tracing::info!("all connections closed; server stopped");
            result
        }
        () = grace_expired => {
            tracing::warn!(
                "shutdown grace of {} ms (server.shutdown_grace_ms) elapsed with {} request(s) still in flight; exiting anyway",
                grace.as_millis(),
                at_grace_end.in_flight.load(Ordering::Relaxed)
            );
            Ok(())
        }
    }
}
