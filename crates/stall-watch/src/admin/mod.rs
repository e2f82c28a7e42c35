//! The admin server: the dashboard and `/debug/*`, on its own OS thread with
//! its own single-threaded runtime.
//!
//! It must keep answering while every worker of the watched runtime is
//! blocked (that is when you need it), so it shares nothing with that
//! runtime but lock-free reads: the watcher's slots, tokio's runtime
//! metrics, the lag probe's last report.
//!
//! It answers only requests whose `Host` is loopback or an allowed name, so
//! a DNS-rebinding page cannot read it, and refuses any non-GET request
//! whose `Origin` is another site, so a web page elsewhere cannot drive the
//! routes a service adds (such as a button that fires requests).

mod guard;
mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::watch::Watch;

/// Name of the admin server's OS thread.
const THREAD_NAME: &str = "stall-watch-admin";

/// The dashboard: one self-contained page (no CDN, no build step).
const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// How often `/debug/events` sends a snapshot.
const EVENTS_INTERVAL: Duration = Duration::from_millis(100);

type Extra = Arc<dyn Fn() -> Value + Send + Sync>;

/// The admin server, configured; [`Admin::spawn`] starts it.
///
/// Routes: `/` (the dashboard), `/healthz`, `/api/info`, `/debug/runtime`,
/// `/debug/stalls`, `/debug/events` (server-sent events, one snapshot every
/// 100 ms), plus any [`Admin::routes`] of your own.
#[must_use = "the admin server starts only with `spawn`"]
pub struct Admin {
    watch: Watch,
    listen: SocketAddr,
    hosts: Vec<String>,
    routes: Router,
    info: Value,
    runtime_extra: Option<Extra>,
    on_thread_start: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("listen", &self.listen)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// The admin server of this watch, to listen on `listen`.
    pub fn admin(&self, listen: SocketAddr) -> Admin {
        Admin {
            watch: self.clone(),
            listen,
            hosts: Vec::new(),
            routes: Router::new(),
            info: json!({}),
            runtime_extra: None,
            on_thread_start: None,
        }
    }

    /// Starts the admin server on `listen` with the defaults:
    /// `self.admin(listen).spawn()`.
    pub fn serve_admin(&self, listen: SocketAddr) -> std::io::Result<AdminServer> {
        self.admin(listen).spawn()
    }
}

impl Admin {
    /// Also answer requests for `host` (a name, without port), e.g. the
    /// service name in a container network.
    ///
    /// By default, only loopback hosts are answered: `localhost`,
    /// `127.0.0.0/8` and `[::1]`.
    pub fn allow_host(mut self, host: impl Into<String>) -> Admin {
        self.hosts.push(host.into().to_ascii_lowercase());
        self
    }

    /// Routes of your own, merged into the admin router (they get the same
    /// `Host` and `Origin` checks and run on the admin thread).
    pub fn routes(mut self, routes: Router) -> Admin {
        self.routes = self.routes.merge(routes);
        self
    }

    /// Extra fields for `/api/info` (an object, merged at the top level).
    /// The dashboard reads `app_url`, `jaeger_ui_url`, `limits`,
    /// `scenarios` and `max_fire_concurrency` from there when present.
    pub fn info(mut self, info: Value) -> Admin {
        merge(&mut self.info, info);
        self
    }

    /// Extra fields for `/debug/runtime`, computed at each request (an
    /// object, merged at the top level).
    pub fn runtime_extra(mut self, extra: impl Fn() -> Value + Send + Sync + 'static) -> Admin {
        self.runtime_extra = Some(Arc::new(extra));
        self
    }

    /// Runs `f` first thing on the admin thread (e.g. to keep that thread
    /// out of a tracing layer).
    pub fn on_thread_start(mut self, f: impl Fn() + Send + Sync + 'static) -> Admin {
        self.on_thread_start = Some(Arc::new(f));
        self
    }

    /// Binds now (so a taken port is an error here) and serves from a new
    /// thread, `stall-watch-admin`.
    pub fn spawn(mut self) -> std::io::Result<AdminServer> {
        let listener = std::net::TcpListener::bind(self.listen)?;
        // std listens with a backlog of 128: a burst of connections past it
        // overflows the accept queue and a dropped SYN costs its client a
        // 1 s retransmit. Listening again raises it (capped by
        // net.core.somaxconn), as tokio's own `bind` does.
        socket2::SockRef::from(&listener).listen(4096)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let on_thread_start = self.on_thread_start.clone();
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                if let Some(f) = on_thread_start {
                    f();
                }
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
                    let hosts: Arc<[String]> = self.hosts.clone().into();
                    let routes = std::mem::take(&mut self.routes);
                    let state = State::new(self);
                    let sampler = state.busy.clone().run(state.watch.clone());
                    let serve = axum::serve(listener, router(state, routes, hosts));
                    // No graceful shutdown: `/debug/events` streams never end
                    // on their own, and nothing here needs draining.
                    tokio::select! {
                        result = serve => if let Err(e) = result {
                            tracing::error!(target: crate::span::TARGET, "admin server stopped: {e}");
                        },
                        () = sampler => {},
                        _ = stop_rx => {},
                    }
                });
            })?;
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the admin thread died during startup"))??;
        Ok(AdminServer {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

/// A running admin server; dropping it stops the server and joins its
/// thread.
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminServer {
    /// The address it listens on (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the admin handlers read.
#[derive(Clone)]
struct State {
    watch: Watch,
    info: Arc<Value>,
    runtime_extra: Option<Extra>,
    busy: Arc<views::BusySampler>,
}

impl State {
    fn new(admin: Admin) -> State {
        State {
            watch: admin.watch,
            info: Arc::new(admin.info),
            runtime_extra: admin.runtime_extra,
            busy: Arc::default(),
        }
    }
}

fn router(state: State, routes: Router, hosts: Arc<[String]>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/api/info", get(info))
        .route("/debug/runtime", get(views::runtime))
        .route("/debug/stalls", get(views::stalls))
        .route("/debug/events", get(views::events))
        .with_state(state)
        .merge(routes)
        .layer(axum::middleware::from_fn_with_state(hosts, guard::check))
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD_HTML)
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok", "server": "admin" }))
}

/// Static facts for the dashboard.
async fn info(axum::extract::State(state): axum::extract::State<State>) -> Response {
    let watch = &state.watch;
    let runtime = watch.runtime();
    let mut info = json!({
        "flavor": runtime.as_ref().map(|rt| flavor(rt.runtime_flavor())),
        "workers": runtime.as_ref().map(|rt| rt.metrics().num_workers()),
        "threshold_ms": crate::ms(watch.threshold()),
        "watch": watch.is_installed(),
        "stacks": watch.stalls(0).stacks,
    });
    merge(&mut info, (*state.info).clone());
    no_store(Json(info))
}

/// How `/debug/runtime` and `/api/info` name a runtime flavor.
fn flavor(flavor: tokio::runtime::RuntimeFlavor) -> &'static str {
    match flavor {
        tokio::runtime::RuntimeFlavor::CurrentThread => "current_thread",
        _ => "multi_thread",
    }
}

/// Merges the fields of object `extra` into object `into`.
fn merge(into: &mut Value, extra: Value) {
    if let (Some(into), Value::Object(extra)) = (into.as_object_mut(), extra) {
        into.extend(extra);
    }
}

/// Marks an answer as never cacheable: the dashboard polls live data.
fn no_store(body: impl IntoResponse) -> Response {
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
