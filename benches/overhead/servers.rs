//! The servers measured, each a child process: the bare and naive axum
//! servers (this binary, re-executed) and stall-lab's binary.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tower_http::trace::{DefaultMakeSpan, TraceLayer};
use tracing::Level;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

use crate::allocs::COUNT_ALLOCS_ENV;
use crate::variant::Variant;
use crate::{
    BARE_SERVER_ENV, NAIVE, REPRODUCE, STALL_LAB, STALL_LAB_HERE, STARTUP_TIMEOUT, TASK_PER_REQUEST,
};

/// Environment variables of our own shell that would change a server's
/// telemetry or configuration; removed from every child.
const SCRUBBED_PREFIXES: &[&str] = &["OTEL_", "STALL_LAB__", "TOKIO_CONSOLE_", "RUST_LOG"];

/// The hello-world servers this binary runs (`OVERHEAD_BARE_SERVER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hello {
    /// Bare axum (variant 1).
    Bare,
    /// The same with the telemetry a first attempt would add by following
    /// each crate's README (variant 8).
    Naive,
    /// Bare axum with each request's handler run as a task of its own, as
    /// stall-lab does (variant 9): what that design costs by itself.
    TaskPerRequest,
}

/// Serves one of the [`Hello`] servers until killed.
pub(crate) fn bare_server(hello: Hello) -> ExitCode {
    let naive = hello == Hello::Naive;
    // Before the runtime: the blocking HTTP client of the OTLP exporter
    // cannot be built inside one.
    let _provider = if naive {
        match naive_telemetry() {
            Ok(provider) => Some(provider),
            Err(e) => {
                eprintln!("naive server: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bare server: cannot build the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: std::io::Result<()> = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening: app http://{addr}")?;
        out.flush()?;
        drop(out);
        let mut app = Router::new().route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        );
        if naive {
            // tower-http's request span, at INFO so the OTLP layer keeps it.
            app = app.layer(
                TraceLayer::new_for_http()
                    .make_span_with(DefaultMakeSpan::new().level(Level::INFO)),
            );
        }
        if hello == Hello::TaskPerRequest {
            app = app.layer(axum::middleware::from_fn(in_own_task));
        }
        axum::serve(listener, app).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the rest of the request as a named task and awaits it: stall-lab's
/// `request::run_in_own_task` without the span, statistics or culprit.
async fn in_own_task(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::task::Builder::new()
        .name("GET /healthz")
        .spawn(next.run(req))
    {
        Ok(handle) => handle
            .await
            .unwrap_or_else(|_| axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The naive reference point: one subscriber with tokio-console's layer,
/// tracing-opentelemetry batching to OTLP/HTTP and a fmt layer, each as its
/// README shows it, plus tower-http's `TraceLayer` for the request span. No
/// request task, no poll statistics, no stall watcher, no report: it answers
/// `{"status":"ok"}`.
fn naive_telemetry() -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("naive");
    let console = console_subscriber::ConsoleLayer::builder()
        .server_addr(SocketAddr::from(([127, 0, 0, 1], 0)))
        .spawn();
    tracing_subscriber::registry()
        .with(console)
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(EnvFilter::new("info")),
        )
        .with(tracing_subscriber::fmt::layer().with_filter(EnvFilter::from_default_env()))
        .try_init()
        .map_err(|e| format!("subscriber: {e}"))?;
    Ok(provider)
}

impl Variant {
    /// The command that starts this variant's server; with `count_allocs`,
    /// always this bench binary, counting its allocations (see `allocs`).
    pub(crate) fn command(
        self,
        otlp_receiver: SocketAddr,
        count_allocs: bool,
    ) -> Result<Command, String> {
        let this_exe = || {
            std::env::current_exe()
                .map(Command::new)
                .map_err(|e| format!("cannot find this bench's own executable: {e}"))
        };
        let mut command = if matches!(self, Self::Bare | Self::Naive | Self::BareTask) {
            let mut c = this_exe()?;
            c.env(
                BARE_SERVER_ENV,
                match self {
                    Self::Naive => NAIVE,
                    Self::BareTask => TASK_PER_REQUEST,
                    _ => "1",
                },
            );
            c
        } else {
            let mut c = if count_allocs {
                let mut c = this_exe()?;
                c.env(BARE_SERVER_ENV, STALL_LAB_HERE);
                c
            } else {
                Command::new(stall_lab_binary()?)
            };
            c.args(["serve", "--listen", "127.0.0.1:0", "--workers", "2"]);
            c
        };
        if count_allocs {
            command.env(COUNT_ALLOCS_ENV, "1");
        }
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if SCRUBBED_PREFIXES.iter().any(|p| key.starts_with(p)) {
                command.env_remove(&*key);
            }
        }
        if matches!(self, Self::Bare | Self::BareTask) {
            return Ok(command);
        }
        command.env("RUST_LOG", "warn");
        if self == Self::Naive {
            command.env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{otlp_receiver}"),
            );
            return Ok(command);
        }
        if self.exports_otlp() {
            command
                .env("STALL_LAB__TELEMETRY__OTLP", "true")
                .env(
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    format!("http://{otlp_receiver}"),
                )
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
        } else {
            command.arg("--no-otlp");
        }
        match self {
            Self::Off | Self::Otlp | Self::OffNoWatcher => {
                command.arg("--no-console");
            }
            _ => {
                command.env("STALL_LAB__TELEMETRY__CONSOLE_LISTEN", "127.0.0.1:0");
            }
        }
        if matches!(self, Self::AllNoWatcher | Self::OffNoWatcher) {
            command.env("STALL_LAB__STALL__WATCH", "false");
        }
        Ok(command)
    }
}

/// The release build of stall-lab that the variants run.
///
/// `OVERHEAD_STALL_LAB=<path>` measures another build instead (an older
/// commit's, for a before/after in the same conditions); the allocation
/// counts still come from this build.
pub(crate) fn stall_lab_binary() -> Result<PathBuf, String> {
    if let Some(other) = std::env::var_os("OVERHEAD_STALL_LAB") {
        let path = PathBuf::from(other);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "OVERHEAD_STALL_LAB: {} is not a file",
                path.display()
            ))
        };
    }
    let path = PathBuf::from(STALL_LAB);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{STALL_LAB} does not exist; build it first (`cargo build --release`), \
             or run `{REPRODUCE}`, which builds it"
        ))
    }
}

/// A running server; killed (and reaped) when dropped, also on panic.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) app: SocketAddr,
    pub(crate) stderr: Arc<Mutex<Vec<String>>>,
    /// Every line it logged, including those past [`MAX_STDERR_LINES`].
    pub(crate) stderr_total: Arc<AtomicU64>,
    /// Its `allocs: N` answers, when it counts allocations.
    allocs: mpsc::Receiver<u64>,
}

impl Server {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Allocations the server made so far, if it counts them (started with
    /// `count_allocs`).
    pub(crate) fn allocations(&mut self) -> Result<u64, String> {
        let stdin = self
            .child
            .stdin
            .as_mut()
            .ok_or("this server does not count allocations")?;
        writeln!(stdin).map_err(|e| format!("asking for allocations: {e}"))?;
        stdin.flush().map_err(|e| e.to_string())?;
        self.allocs
            .recv_timeout(Duration::from_secs(5))
            .map_err(|e| format!("no allocation count: {e}"))
    }

    /// Lines the server logged on stderr (warnings and errors only).
    pub(crate) fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child being started: killed on drop until it becomes a [`Server`].
struct Starting(Option<Child>);

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) enum Started {
    Up(Server),
    /// The process exited before printing its `listening: app` line.
    Exited {
        code: Option<i32>,
        stderr: Vec<String>,
    },
}

const MAX_STDERR_LINES: usize = 200;

/// Removes terminal colour codes (`ESC [ … m`) from a log line.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn start_server(mut command: Command) -> Result<Started, String> {
    let counts = command
        .get_envs()
        .any(|(key, value)| key == COUNT_ALLOCS_ENV && value.is_some());
    command
        .stdin(if counts {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = command.get_program().to_string_lossy().into_owned();
    let mut guard = Starting(Some(
        command
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?,
    ));
    let child = guard.0.as_mut().expect("just set");

    let stderr_lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("piped");
    let sink = Arc::clone(&stderr_lines);
    let stderr_total = Arc::new(AtomicU64::new(0));
    let total = Arc::clone(&stderr_total);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            total.fetch_add(1, Ordering::Relaxed);
            let mut lines = sink.lock().unwrap();
            if lines.len() < MAX_STDERR_LINES {
                lines.push(strip_ansi(&line));
            }
        }
    });

    let (tx, rx) = mpsc::channel();
    let (allocs_tx, allocs) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        // Keeps reading after the line we want, so the pipe never fills.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix("listening: app http://") {
                let _ = tx.send(addr.trim().to_string());
            } else if let Some(n) = line.strip_prefix("allocs: ") {
                let _ = allocs_tx.send(n.trim().parse().unwrap_or(u64::MAX));
            }
        }
    });

    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(addr) => {
                let app = addr
                    .parse()
                    .map_err(|e| format!("{program} printed a bad address {addr:?}: {e}"))?;
                let child = guard.0.take().expect("still owned");
                return Ok(Started::Up(Server {
                    child,
                    app,
                    stderr: stderr_lines,
                    stderr_total,
                    allocs,
                }));
            }
            Err(mpsc::RecvTimeoutError::Timeout | mpsc::RecvTimeoutError::Disconnected) => {}
        }
        let child = guard.0.as_mut().expect("still owned");
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            guard.0 = None;
            // Let the stderr reader catch the last lines.
            std::thread::sleep(Duration::from_millis(50));
            return Ok(Started::Exited {
                code: status.code(),
                stderr: stderr_lines.lock().unwrap().clone(),
            });
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{program} printed no `listening: app` line within {STARTUP_TIMEOUT:?}"
            ));
        }
    }
}
