//! The tokio-console server: console-subscriber's gRPC service on a
//! listener we bind, on a `console-server` side thread.

use std::net::SocketAddr;
use std::sync::Arc;

use tracing_subscriber::Layer;

use super::TelemetryError;
use super::console_budget::ConsoleBudget;
use super::env::{EnvLookup, ResolvedConsole, resolve_console};
use super::filters::console_filter;
use super::layers::BoxedLayer;
use super::settings::TelemetryConfig;
use super::side_thread::SideRuntime;

/// The console, when it is on.
pub(super) struct Console {
    /// The console layer, with its filter.
    pub(super) layer: BoxedLayer,
    pub(super) server: ConsoleServer,
    pub(super) budget: Arc<ConsoleBudget>,
}

/// The running server; dropping it stops it.
pub(super) struct ConsoleServer {
    /// The bound address (port 0 resolved).
    pub(super) addr: SocketAddr,
    _thread: SideRuntime,
}

/// Starts the console when `telemetry.console` is on. Returns it and the
/// startup log line.
pub(super) fn start(
    cfg: &TelemetryConfig,
    env: EnvLookup<'_>,
) -> Result<(Option<Console>, String), TelemetryError> {
    if !cfg.console {
        return Ok((
            None,
            "tokio-console: off (telemetry.console = false)".into(),
        ));
    }
    let c = resolve_console(cfg, env)?;
    let (layer, server) = serve(&c)?;
    let budget = Arc::new(ConsoleBudget::new(cfg.console_task_budget, c.retention));
    // Static: which tasks and resources it records is decided by
    // `ConsoleGate`, around the whole subscriber.
    let layer = layer.with_filter(console_filter()).boxed();
    let line = format!(
        "tokio-console: listening on {} (retention {} s, publish every {} ms, {}) - run `tokio-console http://{}`",
        server.addr,
        c.retention.as_secs(),
        c.publish_interval.as_millis(),
        match cfg.console_task_budget {
            0 => "no task budget: ~50 KB per task for the retention, use --no-console under load"
                .to_string(),
            n => format!(
                "records at most {n} tasks per retention window, telemetry.console_task_budget"
            ),
        },
        server.addr
    );
    Ok((
        Some(Console {
            layer,
            server,
            budget,
        }),
        line,
    ))
}

/// Binds the console port *ourselves* (so a busy port is an error here, and
/// port 0 works), then serves console-subscriber's gRPC service on it from a
/// `console-server` thread with its own runtime — the same shape as
/// console-subscriber's `Builder::spawn`, minus its `expect()`s.
fn serve(
    c: &ResolvedConsole,
) -> Result<(console_subscriber::ConsoleLayer, ConsoleServer), TelemetryError> {
    let key = if c.listen_from_env {
        "telemetry.console_listen, set by TOKIO_CONSOLE_BIND"
    } else {
        "telemetry.console_listen"
    };
    let (listener, addr) = crate::net::bind(c.listen, key).map_err(TelemetryError::ConsoleBind)?;

    let (layer, server) = console_subscriber::ConsoleLayer::builder()
        .retention(c.retention)
        .publish_interval(c.publish_interval)
        .server_addr(addr) // informational only: we serve on our own listener
        .build();
    // Like console-subscriber's own spawn(), the server runs untraced (it
    // would report on its own tasks): `SideRuntime` keeps its thread silent.
    let thread = SideRuntime::start("console-server", async move {
        run(listener, server.into_parts())
            .await
            .map_err(|e| format!("tokio-console server on {addr} stopped: {e}"))
    })?;
    Ok((
        layer,
        ConsoleServer {
            addr,
            _thread: thread,
        },
    ))
}

async fn run(
    listener: std::net::TcpListener,
    parts: console_subscriber::ServerParts,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let console_subscriber::ServerParts {
        instrument_server,
        aggregator,
        ..
    } = parts;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let aggregate = tokio::spawn(aggregator.run());
    // Not serve_with_incoming_shutdown: graceful shutdown would wait for
    // open console watch streams, which never end. `SideRuntime` drops this
    // future when stopped.
    let result = tonic::transport::Server::builder()
        .add_service(instrument_server)
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await;
    aggregate.abort();
    result.map_err(Into::into)
}
