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
            export: config.telemetry.otlp.then(|| telemetry.export_counters()),
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
        watch = watch
            .trace_url(config.admin.jaeger_ui_url.as_str())
            // The request spans are OpenTelemetry SDK spans: link by ids.
            .link_stall_span(crate::telemetry::link_stall_span);
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
///
/// Connections are served here rather than by `axum::serve`, which has no
/// knobs for what a careless or hostile client can do (the `[server]` keys):
///
/// - a request head must arrive within `server.header_read_timeout_ms`, so a
///   client sending a byte a second cannot hold a connection for ever, and an
///   idle keep-alive connection is closed after as long;
/// - at most `server.max_connections` are served at once: past it, new ones
///   wait in the kernel's backlog instead of costing a task and a file each;
/// - a request head larger than `server.max_header_bytes` gets 431 once that
///   much is read, never read whole. Bodies are never read at all: no
///   scenario takes one, and hyper reads a body only when a handler asks.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(PlumbingTimer(hyper_util::rt::TokioTimer::new()))
        .header_read_timeout(Duration::from_millis(state.server.header_read_timeout_ms))
        // The read buffer stops growing here (hyper answers 431 when a head
        // does not fit), and a head that fits but is over the limit is 431 too.
        .max_buf_size(state.server.max_header_bytes.max(MIN_READ_BUFFER))
        .max_header_size(state.server.max_header_bytes);
    // One permit per open connection, given back when its task ends.
    let open = Arc::new(tokio::sync::Semaphore::new(state.server.max_connections));
    let cap = state.server.max_connections;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut listener = crate::arrival::ArrivalListener::new(listener);
    // For the shutdown log: how many requests were in flight.
    let in_flight = state.clone();
    let router = app(state);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut warned_full = false;

    loop {
        // A permit first, then accept: at the cap, connections wait in the
        // backlog (the kernel's queue), not in this process.
        let permit = match open.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if !warned_full {
                    warned_full = true;
                    tracing::warn!(
                        "{cap} connections open (server.max_connections): new ones wait \
                         until one closes (logged once)"
                    );
                }
                tokio::select! {
                    () = &mut shutdown => break,
                    permit = open.clone().acquire_owned() => {
                        permit.expect("the connection semaphore is never closed")
                    }
                }
            }
        };
        let (io, arrival) = tokio::select! {
            () = &mut shutdown => break,
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
        };
        // What `into_make_service_with_connect_info` did: each request of the
        // connection carries its `Arrival` (peer and kernel receive time).
        let service = tower::ServiceExt::map_request(
            router.clone(),
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(arrival.clone()));
                request
            },
        );
        let connection = http.serve_connection(
            hyper_util::rt::TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(service),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Errors here are the client's doing (a reset, a head too large
            // or too slow), already answered where HTTP allows: not logged.
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }

    // Stop accepting: connections arriving from now on are refused.
    drop(listener);
    let waiting = in_flight.in_flight.load(Ordering::Relaxed);
    if waiting > 0 {
        tracing::info!(
            "waiting up to {} ms for {waiting} request(s) in flight",
            grace.as_millis()
        );
    }
    // Idle keep-alive connections close at once; busy ones after their
    // answer.
    tokio::select! {
        () = graceful.shutdown() => {
            tracing::info!("all connections closed; server stopped");
        }
        () = tokio::time::sleep(grace) => {
            tracing::warn!(
                "shutdown grace of {} ms (server.shutdown_grace_ms) elapsed with {} request(s) still in flight; exiting anyway",
                grace.as_millis(),
                in_flight.in_flight.load(Ordering::Relaxed)
            );
        }
    }
    Ok(())
}

/// hyper's smallest allowed read buffer (`max_buf_size` panics below it).
const MIN_READ_BUFFER: usize = 8192;

/// tokio's timer for hyper, kept out of tokio-console.
///
/// hyper arms a timer for every request head it waits for (the header read
/// timeout) inside the connection's task. A connection task is recorded by
/// the console like any task of the budget, and so would be every timer it
/// makes: one `Sleep` resource per request, kept for the whole retention
/// (the overhead bench saw the console's thread spend 20 µs per request on
/// them and the server reach 354 MiB). They are plumbing, not the lesson.
#[derive(Clone, Debug)]
struct PlumbingTimer(hyper_util::rt::TokioTimer);

impl hyper::rt::Timer for PlumbingTimer {
    fn sleep(&self, duration: Duration) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        crate::telemetry::out_of_the_console(|| self.0.sleep(duration))
    }

    fn sleep_until(
        &self,
        deadline: std::time::Instant,
    ) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        crate::telemetry::out_of_the_console(|| self.0.sleep_until(deadline))
    }

    fn reset(
        &self,
        sleep: &mut std::pin::Pin<Box<dyn hyper::rt::Sleep>>,
        deadline: std::time::Instant,
    ) {
        crate::telemetry::out_of_the_console(|| self.0.reset(sleep, deadline));
    }

    fn now(&self) -> std::time::Instant {
        self.0.now()
    }
}
