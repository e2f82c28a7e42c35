//! What stall-lab's instrumentation costs: **server CPU time per request of
//! `GET /healthz` at saturation**, stall-lab against a hello-world axum server.
//!
//! Run with: cargo bench --bench overhead
//!
//! (`OVERHEAD_SECS`, default 5, sets the measured window per run;
//! `OVERHEAD_ROUNDS` (3), `OVERHEAD_CONNS` (32) and `OVERHEAD_CLIENT_THREADS`
//! (1) the rest; `OVERHEAD_VARIANTS=all,all-no-watcher` runs a subset, named
//! bare, off, otlp, console, all, all-no-watcher, off-no-watcher, naive. Run by `cargo test
//! --benches`, it only prints how to run it.)
//!
//! Variants, each a child process with 2 app worker threads:
//!
//! 1. `bare axum`: this binary re-executed as a hello-world axum server
//!    (`OVERHEAD_BARE_SERVER=1`), `/healthz` answering `{"status":"ok"}`;
//! 2. stall-lab with telemetry off (`--no-otlp --no-console`);
//! 3. stall-lab exporting OTLP/HTTP (protobuf) to a live receiver in this
//!    process, which counts the spans it gets;
//! 4. stall-lab serving tokio-console (nobody connected);
//! 5. stall-lab with both;
//! 6. the same with the stall watcher off (`STALL_LAB__STALL__WATCH=false`);
//! 7. telemetry off and the stall watcher off: the cleanest view of what the
//!    poll hooks and the watcher thread cost (6 and 7 are skipped when the
//!    build does not know that key);
//! 8. `naive`: the bare server again with the telemetry a first attempt
//!    adds by following each crate's README (tower-http `TraceLayer`,
//!    tracing-opentelemetry batching to the same receiver, tokio-console's
//!    layer, fmt): the reference point of "a naive setup measures about
//!    1.8×". It has none of stall-lab's per-request work (request task, poll
//!    statistics, watcher, report).
//!
//! The load is a closed loop: `OVERHEAD_CONNS` keep-alive connections, each
//! sending its next `GET /healthz` as soon as the previous answer arrived,
//! for 1 s of warm-up and then the measured window. The client is a minimal
//! HTTP/1.1 client written here (one write, one read per request), so that it
//! takes as little as possible of the CPU it shares with the server.
//!
//! **Why CPU per request, not latency or throughput.** On a shared 2-core
//! machine the client and the server compete for the same cores, so
//! requests/s and latency mostly measure the contention; CPU time spent *in
//! the server process* per completed request is what the instrumentation
//! actually adds, and it stays comparable across variants measured the same
//! way. It is read from `/proc/<pid>/task/*/schedstat` (nanoseconds on CPU,
//! every thread of the server: app workers, exporter, console, watcher),
//! falling back to `/proc/<pid>/stat` (clock ticks) if a thread exits during
//! the window. The variants run one at a time, interleaved over several
//! rounds; the table reports the median of the rounds and their spread.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_http::trace::{DefaultMakeSpan, TraceLayer};
use tracing::Level;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// The allocator stall-lab's binary uses (see `src/bin/stall-lab.rs`), so
/// that the bare axum server differs from stall-lab by the instrumentation
/// only, not by its allocator.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Set in the child environment to run this binary as the bare axum server.
const BARE_SERVER_ENV: &str = "OVERHEAD_BARE_SERVER";
/// Its value for the naive everything-on server instead of the bare one.
const NAIVE: &str = "naive";
/// The real server, built by cargo for benches and integration tests.
const STALL_LAB: &str = env!("CARGO_BIN_EXE_stall-lab");
const REPRODUCE: &str = "cargo bench --bench overhead";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const WARMUP: Duration = Duration::from_secs(1);
/// Environment variables of our own shell that would change a server's
/// telemetry or configuration; removed from every child.
const SCRUBBED_PREFIXES: &[&str] = &["OTEL_", "STALL_LAB__", "TOKIO_CONSOLE_", "RUST_LOG"];

fn main() -> ExitCode {
    if let Some(which) = std::env::var_os(BARE_SERVER_ENV) {
        return bare_server(which == NAIVE);
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and a
    // test run must not spend minutes measuring.
    if !std::env::args().any(|a| a == "--bench") {
        println!("overhead: a benchmark, not a test; run `{REPRODUCE}` for the figures");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("overhead: error: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// Variant 1: the bare axum server (this binary, re-executed)
// ---------------------------------------------------------------------------

/// The bare axum hello-world; with `naive`, the same server with the
/// telemetry a first attempt would add by following each crate's README
/// (variant 8).
fn bare_server(naive: bool) -> ExitCode {
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

/// The reference point of the "a naive setup measures about 1.8×":
/// one subscriber with tokio-console's layer, tracing-opentelemetry batching
/// to OTLP/HTTP and a fmt layer, each as its README shows it, plus
/// tower-http's `TraceLayer` for the request span. No request task, no poll
/// statistics, no stall watcher, no report: it answers `{"status":"ok"}`.
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

// ---------------------------------------------------------------------------
// Variants
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Bare,
    Off,
    Otlp,
    Console,
    All,
    AllNoWatcher,
    OffNoWatcher,
    Naive,
}

impl Variant {
    const EVERY: [Self; 8] = [
        Self::Bare,
        Self::Off,
        Self::Otlp,
        Self::Console,
        Self::All,
        Self::AllNoWatcher,
        Self::OffNoWatcher,
        Self::Naive,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Bare => "bare axum",
            Self::Off => "stall-lab, telemetry off",
            Self::Otlp => "stall-lab, OTLP only",
            Self::Console => "stall-lab, console only",
            Self::All => "stall-lab, everything on",
            Self::AllNoWatcher => "stall-lab, everything on, stall watcher off",
            Self::OffNoWatcher => "stall-lab, telemetry off, stall watcher off",
            Self::Naive => "naive axum: TraceLayer + OTLP + console",
        }
    }

    /// The name `OVERHEAD_VARIANTS` uses.
    fn key(self) -> &'static str {
        match self {
            Self::Bare => "bare",
            Self::Off => "off",
            Self::Otlp => "otlp",
            Self::Console => "console",
            Self::All => "all",
            Self::AllNoWatcher => "all-no-watcher",
            Self::OffNoWatcher => "off-no-watcher",
            Self::Naive => "naive",
        }
    }

    fn exports_otlp(self) -> bool {
        matches!(
            self,
            Self::Otlp | Self::All | Self::AllNoWatcher | Self::Naive
        )
    }

    fn command(self, otlp_receiver: SocketAddr) -> Result<Command, String> {
        let mut command = if matches!(self, Self::Bare | Self::Naive) {
            let exe = std::env::current_exe()
                .map_err(|e| format!("cannot find this bench's own executable: {e}"))?;
            let mut c = Command::new(exe);
            c.env(
                BARE_SERVER_ENV,
                if self == Self::Naive { NAIVE } else { "1" },
            );
            c
        } else {
            let mut c = Command::new(stall_lab_binary()?);
            c.args(["serve", "--listen", "127.0.0.1:0", "--workers", "2"]);
            c
        };
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if SCRUBBED_PREFIXES.iter().any(|p| key.starts_with(p)) {
                command.env_remove(&*key);
            }
        }
        if self == Self::Bare {
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

fn stall_lab_binary() -> Result<PathBuf, String> {
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

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// A running server; killed (and reaped) when dropped, also on panic.
struct Server {
    child: Child,
    app: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Every line it logged, including those past [`MAX_STDERR_LINES`].
    stderr_total: Arc<AtomicU64>,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lines the server logged on stderr (warnings and errors only).
    fn stderr_lines(&self) -> Vec<String> {
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

enum Started {
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

fn start_server(mut command: Command) -> Result<Started, String> {
    command
        .stdin(Stdio::null())
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
    let stdout = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        // Keeps reading after the line we want, so the pipe never fills.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix("listening: app http://") {
                let _ = tx.send(addr.trim().to_string());
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

// ---------------------------------------------------------------------------
// Server CPU time from /proc
// ---------------------------------------------------------------------------

struct CpuSample {
    /// Sum over the threads alive now of their time on CPU (schedstat), ns.
    sched_ns: u64,
    /// Thread id → (thread name, time on CPU in ns).
    threads: BTreeMap<u32, (String, u64)>,
    /// utime + stime of the whole process, including exited threads, ticks.
    ticks: u64,
}

fn cpu_sample(pid: u32) -> Result<CpuSample, String> {
    let task_dir = format!("/proc/{pid}/task");
    let mut sched_ns = 0;
    let mut threads = BTreeMap::new();
    let entries = std::fs::read_dir(&task_dir).map_err(|e| format!("{task_dir}: {e}"))?;
    for entry in entries.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread may exit between read_dir and this read: then it is
        // simply not counted (and not in `threads`).
        let Ok(stat) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        let Some(ns) = stat
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let name = std::fs::read_to_string(entry.path().join("comm"))
            .map_or_else(|_| "?".to_string(), |n| n.trim().to_string());
        sched_ns += ns;
        threads.insert(tid, (name, ns));
    }
    let stat_path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&stat_path).map_err(|e| format!("{stat_path}: {e}"))?;
    // Fields after the `(comm)`, which may itself contain spaces: field 3
    // (state) is index 0, so utime (14) and stime (15) are 11 and 12.
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{stat_path}: cannot read field {}", i + 3))
    };
    Ok(CpuSample {
        sched_ns,
        threads,
        ticks: field(11)? + field(12)?,
    })
}

/// CPU time between two samples of the same process, in ns, and whether it
/// had to fall back to clock ticks (a thread exited during the window, so
/// its schedstat time is gone).
fn cpu_between(a: &CpuSample, b: &CpuSample, clk_tck: u64) -> (u64, bool) {
    let kept_all = a.threads.keys().all(|tid| b.threads.contains_key(tid));
    if kept_all && b.sched_ns >= a.sched_ns {
        (b.sched_ns - a.sched_ns, false)
    } else {
        let ticks = b.ticks.saturating_sub(a.ticks);
        (ticks * 1_000_000_000 / clk_tck.max(1), true)
    }
}

/// CPU time between two samples by thread name, numbered threads grouped
/// (`app-rt-0`, `app-rt-1` → `app-rt-*`), largest first, in ns.
fn cpu_by_thread(a: &CpuSample, b: &CpuSample) -> Vec<(String, u64)> {
    let mut groups: BTreeMap<String, u64> = BTreeMap::new();
    for (tid, (name, ns)) in &b.threads {
        let before = a.threads.get(tid).map_or(0, |(_, ns)| *ns);
        let trimmed = name.trim_end_matches(|c: char| c.is_ascii_digit());
        let group = if trimmed.len() < name.len() {
            format!("{trimmed}*")
        } else {
            name.clone()
        };
        *groups.entry(group).or_default() += ns.saturating_sub(before);
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by_key(|(_, ns)| std::cmp::Reverse(*ns));
    groups
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

// ---------------------------------------------------------------------------
// The in-process OTLP/HTTP receiver
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Received {
    spans: AtomicU64,
    batches: AtomicU64,
    bad_batches: AtomicU64,
}

/// Serves `POST /v1/traces` on 127.0.0.1:0 from its own thread and runtime,
/// for the life of the bench; counts what it receives.
fn start_otlp_receiver() -> Result<(SocketAddr, Arc<Received>), String> {
    let received = Arc::new(Received::default());
    let state = Arc::clone(&received);
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("otlp-receiver".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(format!("receiver runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(format!("receiver bind: {e}")));
                        return;
                    }
                };
                let _ = tx.send(listener.local_addr().map_err(|e| e.to_string()));
                let app = Router::new()
                    .route("/v1/traces", post(receive_traces))
                    .layer(DefaultBodyLimit::disable())
                    .with_state(state);
                let _ = axum::serve(listener, app).await;
            });
        })
        .map_err(|e| format!("cannot spawn the receiver thread: {e}"))?;
    let addr = rx
        .recv()
        .map_err(|_| "the receiver thread died".to_string())??;
    Ok((addr, received))
}

async fn receive_traces(State(received): State<Arc<Received>>, body: Bytes) -> Response {
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            let spans: usize = request
                .resource_spans
                .iter()
                .flat_map(|rs| &rs.scope_spans)
                .map(|ss| ss.spans.len())
                .sum();
            received.spans.fetch_add(spans as u64, Ordering::Relaxed);
            received.batches.fetch_add(1, Ordering::Relaxed);
            (
                [(header::CONTENT_TYPE, "application/x-protobuf")],
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
                .into_response()
        }
        Err(e) => {
            received.bad_batches.fetch_add(1, Ordering::Relaxed);
            (StatusCode::BAD_REQUEST, format!("not an OTLP request: {e}")).into_response()
        }
    }
}

// ---------------------------------------------------------------------------
// The load: a closed-loop, keep-alive HTTP/1.1 client
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    not_ok: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

struct Load {
    counters: Arc<Counters>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(runtime: &tokio::runtime::Runtime, addr: SocketAddr, connections: usize) -> Self {
        let counters = Arc::new(Counters::default());
        let tasks = (0..connections)
            .map(|_| runtime.spawn(connection(addr, Arc::clone(&counters))))
            .collect();
        Self { counters, tasks }
    }

    fn stop(self, runtime: &tokio::runtime::Runtime) {
        self.counters.stop.store(true, Ordering::Relaxed);
        let aborts: Vec<_> = self.tasks.iter().map(|t| t.abort_handle()).collect();
        runtime.block_on(async {
            let all = futures::future::join_all(self.tasks);
            let _ = tokio::time::timeout(Duration::from_secs(2), all).await;
        });
        for abort in aborts {
            abort.abort();
        }
    }
}

/// One connection: sends the next request as soon as the previous answer is
/// in; reconnects after an error.
async fn connection(addr: SocketAddr, counters: Arc<Counters>) {
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut buf = Vec::with_capacity(8192);
    while !counters.stop.load(Ordering::Relaxed) {
        let mut stream = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(_) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        buf.clear();
        while !counters.stop.load(Ordering::Relaxed) {
            let answer = match stream.write_all(request.as_bytes()).await {
                Ok(()) => read_response(&mut stream, &mut buf).await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(200) => counters.ok.fetch_add(1, Ordering::Relaxed),
                Ok(_) => counters.not_ok.fetch_add(1, Ordering::Relaxed),
                Err(_) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
        }
    }
}

/// Reads one response (status line, headers, `Content-Length` body) and
/// returns its status. Leftover bytes stay in `buf` (there are none: the
/// client never pipelines).
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    loop {
        if let Some(head_len) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..head_len])
                .map_err(|_| invalid("response head is not UTF-8"))?;
            let mut lines = head.split("\r\n");
            let status = lines
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u16>().ok())
                .ok_or_else(|| invalid("bad status line"))?;
            let mut body_len = None;
            for line in lines {
                let Some((name, value)) = line.split_once(':') else {
                    continue;
                };
                if name.trim().eq_ignore_ascii_case("content-length") {
                    body_len = value.trim().parse::<usize>().ok();
                } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
                    return Err(invalid("chunked responses are not supported"));
                }
            }
            let total = head_len + 4 + body_len.ok_or_else(|| invalid("no Content-Length"))?;
            while buf.len() < total {
                read_more(stream, buf).await?;
            }
            buf.drain(..total);
            return Ok(status);
        }
        read_more(stream, buf).await?;
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.reserve(4096);
    if stream.read_buf(buf).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Measuring one variant once
// ---------------------------------------------------------------------------

struct Settings {
    window: Duration,
    rounds: usize,
    connections: usize,
    client_threads: usize,
    clk_tck: u64,
}

fn env_number<T: std::str::FromStr>(key: &str, default: T) -> Result<T, String> {
    match std::env::var(key) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| format!("{key}={v:?} is not a valid number")),
        _ => Ok(default),
    }
}

#[derive(Debug, Clone)]
struct Sample {
    requests_per_s: f64,
    cpu_us_per_request: f64,
    /// Server CPU time / wall time: how many cores the server kept busy.
    server_cores: f64,
    spans_per_request: Option<f64>,
    tick_based: bool,
    /// µs per request by server thread (group), largest first.
    by_thread: Vec<(String, f64)>,
    not_ok: u64,
    errors: u64,
    warnings: Vec<String>,
    /// How many lines the server logged (at `RUST_LOG=warn`) in this run.
    log_lines: u64,
    /// The server's peak resident memory (VmHWM), MiB.
    peak_rss_mib: Option<f64>,
}

/// Peak resident set size of `pid` in MiB, from /proc/<pid>/status.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

enum Outcome {
    Measured(Sample),
    Skipped {
        why: String,
        /// What the server said (its first stderr line).
        detail: String,
    },
}

fn measure(
    variant: Variant,
    settings: &Settings,
    client: &tokio::runtime::Runtime,
    receiver: (SocketAddr, &Received),
) -> Result<Outcome, String> {
    let (receiver_addr, received) = receiver;
    let spans_before = received.spans.load(Ordering::Relaxed);
    let server = match start_server(variant.command(receiver_addr)?)? {
        Started::Up(server) => server,
        Started::Exited { code, stderr } => {
            let said = stderr.join("\n");
            if matches!(variant, Variant::AllNoWatcher | Variant::OffNoWatcher) && code == Some(2) {
                return Ok(Outcome::Skipped {
                    why: "skipped: this build has no stall.watch key".into(),
                    detail: stderr.first().cloned().unwrap_or_default(),
                });
            }
            return Err(format!(
                "{} exited at startup with {code:?}:\n{said}",
                variant.label()
            ));
        }
    };
    let pid = server.pid();

    let load = Load::start(client, server.app, settings.connections);
    std::thread::sleep(WARMUP);
    let t0 = Instant::now();
    let ok0 = load.counters.ok.load(Ordering::Relaxed);
    let cpu0 = cpu_sample(pid)?;
    std::thread::sleep(settings.window);
    let cpu1 = cpu_sample(pid)?;
    let ok1 = load.counters.ok.load(Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let counters = Arc::clone(&load.counters);
    load.stop(client);
    let total_ok = counters.ok.load(Ordering::Relaxed);

    let spans_per_request = if variant.exports_otlp() {
        // The batch processor exports every 500 ms: wait until the count
        // stops moving, so the last requests' spans are in.
        let mut last = received.spans.load(Ordering::Relaxed);
        let mut still_since = Instant::now();
        let give_up = Instant::now() + Duration::from_secs(10);
        while still_since.elapsed() < Duration::from_millis(1200) && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(100));
            let now = received.spans.load(Ordering::Relaxed);
            if now != last {
                last = now;
                still_since = Instant::now();
            }
        }
        Some((last - spans_before) as f64 / total_ok.max(1) as f64)
    } else {
        None
    };

    let requests = ok1.saturating_sub(ok0);
    if requests == 0 {
        return Err(format!(
            "{}: no request completed in the window ({} errors, {} non-200); server said:\n{}",
            variant.label(),
            counters.errors.load(Ordering::Relaxed),
            counters.not_ok.load(Ordering::Relaxed),
            server.stderr_lines().join("\n")
        ));
    }
    let (cpu_ns, tick_based) = cpu_between(&cpu0, &cpu1, settings.clk_tck);
    let sample = Sample {
        requests_per_s: requests as f64 / elapsed,
        cpu_us_per_request: cpu_ns as f64 / 1000.0 / requests as f64,
        server_cores: cpu_ns as f64 / 1e9 / elapsed,
        spans_per_request,
        tick_based,
        by_thread: cpu_by_thread(&cpu0, &cpu1)
            .into_iter()
            .map(|(name, ns)| (name, ns as f64 / 1000.0 / requests as f64))
            .collect(),
        not_ok: counters.not_ok.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        warnings: server.stderr_lines(),
        log_lines: server.stderr_total.load(Ordering::Relaxed),
        peak_rss_mib: peak_rss_mib(pid),
    };
    drop(server);
    Ok(Outcome::Measured(sample))
}

// ---------------------------------------------------------------------------
// The whole run and the report
// ---------------------------------------------------------------------------

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[derive(Default)]
struct Results {
    samples: Vec<Sample>,
    skipped: Option<String>,
    failed: Option<String>,
}

impl Results {
    fn median_of(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        median(&mut self.samples.iter().map(f).collect::<Vec<_>>())
    }
    fn cpu(&self) -> Option<f64> {
        (!self.samples.is_empty()).then(|| self.median_of(|s| s.cpu_us_per_request))
    }
}

fn run() -> Result<ExitCode, String> {
    let settings = Settings {
        window: Duration::from_secs_f64(env_number("OVERHEAD_SECS", 5.0_f64)?.max(0.1)),
        rounds: env_number("OVERHEAD_ROUNDS", 3_usize)?.max(1),
        connections: env_number("OVERHEAD_CONNS", 32_usize)?.max(1),
        client_threads: env_number("OVERHEAD_CLIENT_THREADS", 1_usize)?.max(1),
        clk_tck: clock_ticks_per_second(),
    };
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let stall_lab = stall_lab_binary()?;
    Path::new("/proc/self/schedstat")
        .exists()
        .then_some(())
        .ok_or(
            "/proc/<pid>/schedstat is missing: this bench needs Linux with schedstat".to_string(),
        )?;

    let (receiver_addr, received) = start_otlp_receiver()?;
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .thread_name("load-client")
        .enable_all()
        .build()
        .map_err(|e| format!("client runtime: {e}"))?;

    let started = Instant::now();
    let mut results: Vec<Results> = Variant::EVERY.iter().map(|_| Results::default()).collect();
    if let Ok(only) = std::env::var("OVERHEAD_VARIANTS") {
        let keys: Vec<&str> = only.split(',').map(str::trim).collect();
        if let Some(bad) = keys
            .iter()
            .find(|k| !Variant::EVERY.iter().any(|v| v.key() == **k))
        {
            let known: Vec<&str> = Variant::EVERY.iter().map(|v| v.key()).collect();
            return Err(format!(
                "OVERHEAD_VARIANTS: unknown variant {bad:?} (known: {})",
                known.join(",")
            ));
        }
        for (variant, r) in Variant::EVERY.iter().zip(&mut results) {
            if !keys.contains(&variant.key()) {
                r.skipped = Some("not selected (OVERHEAD_VARIANTS)".into());
            }
        }
    }
    println!("overhead: server CPU time per `GET /healthz` at saturation");
    println!(
        "  {} round(s) x {} variant(s), {:.1} s measured after {:.0} s warm-up each; \
         {} keep-alive connections from {} client thread(s); {cores} CPU core(s)",
        settings.rounds,
        results.iter().filter(|r| r.skipped.is_none()).count(),
        settings.window.as_secs_f64(),
        WARMUP.as_secs_f64(),
        settings.connections,
        settings.client_threads,
    );
    println!("  stall-lab: {}", stall_lab.display());
    println!(
        "  measuring the stall watcher in isolation (hooks per poll, polls per request, registry)…"
    );
    let watcher = measure_watcher_cost();
    for round in 1..=settings.rounds {
        for (i, variant) in Variant::EVERY.iter().enumerate() {
            let r = &mut results[i];
            if r.skipped.is_some() || r.failed.is_some() {
                continue;
            }
            match measure(*variant, &settings, &client, (receiver_addr, &received)) {
                Ok(Outcome::Measured(s)) => {
                    println!(
                        "  round {round}/{}  {:<45} {:>8.0} req/s  {:>7.2} µs/req  {:.2} cores{}{}",
                        settings.rounds,
                        variant.label(),
                        s.requests_per_s,
                        s.cpu_us_per_request,
                        s.server_cores,
                        s.spans_per_request
                            .map_or(String::new(), |x| format!("  {x:.2} spans/req")),
                        if s.tick_based { "  (tick-based)" } else { "" },
                    );
                    r.samples.push(s);
                }
                Ok(Outcome::Skipped { why, detail }) => {
                    println!(
                        "  round {round}/{}  {:<45} {why}\n      ({detail})",
                        settings.rounds,
                        variant.label()
                    );
                    r.skipped = Some(why);
                }
                Err(e) => {
                    println!(
                        "  round {round}/{}  {:<45} FAILED",
                        settings.rounds,
                        variant.label()
                    );
                    eprintln!("overhead: {e}");
                    r.failed = Some(e);
                }
            }
        }
    }
    let took = started.elapsed();
    client.shutdown_timeout(Duration::from_secs(1));

    report(&settings, &results, &received, took, &watcher);
    if results.iter().any(|r| r.failed.is_some()) {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn report(
    settings: &Settings,
    results: &[Results],
    received: &Received,
    took: Duration,
    watcher: &WatcherCost,
) {
    let bare = results[0].cpu();
    println!();
    println!(
        "{:<45} {:>9} {:>12} {:>8} {:>7} {:>10} {:>16}",
        "variant", "req/s", "CPU µs/req", "× bare", "cores", "spans/req", "µs/req min–max"
    );
    println!("{}", "-".repeat(45 + 9 + 12 + 8 + 7 + 10 + 16 + 6));
    for (variant, r) in Variant::EVERY.iter().zip(results) {
        let Some(cpu) = r.cpu() else {
            let why = r
                .skipped
                .as_deref()
                .or(r.failed.as_deref().map(|_| "FAILED (see above)"))
                .unwrap_or("no data");
            println!("{:<45} {why}", variant.label());
            continue;
        };
        let rps = r.median_of(|s| s.requests_per_s);
        let cores = r.median_of(|s| s.server_cores);
        let ratio = bare.map_or("-".to_string(), |b| format!("{:.2}×", cpu / b));
        let spans = if variant.exports_otlp() {
            format!(
                "{:.2}",
                r.median_of(|s| s.spans_per_request.unwrap_or(f64::NAN))
            )
        } else {
            "-".to_string()
        };
        let (lo, hi) = r.samples.iter().fold((f64::MAX, f64::MIN), |(lo, hi), s| {
            (lo.min(s.cpu_us_per_request), hi.max(s.cpu_us_per_request))
        });
        println!(
            "{:<45} {rps:>9.0} {cpu:>12.2} {ratio:>8} {cores:>7.2} {spans:>10} {:>16}",
            variant.label(),
            format!("{lo:.2}–{hi:.2}"),
        );
    }

    println!();
    println!("peak resident memory of the server (VmHWM, largest over the rounds):");
    for (variant, r) in Variant::EVERY.iter().zip(results) {
        let peak = r
            .samples
            .iter()
            .filter_map(|s| s.peak_rss_mib)
            .fold(f64::NAN, f64::max);
        if peak.is_finite() {
            println!("  {:<45} {peak:>9.1} MiB", variant.label());
        }
    }

    println!();
    println!("where the server CPU goes, µs/request by thread (median round of each variant):");
    for (variant, r) in Variant::EVERY.iter().zip(results) {
        let Some(cpu) = r.cpu() else { continue };
        // The round whose total is the median: its breakdown adds up to it.
        let Some(sample) = r.samples.iter().min_by(|a, b| {
            (a.cpu_us_per_request - cpu)
                .abs()
                .total_cmp(&(b.cpu_us_per_request - cpu).abs())
        }) else {
            continue;
        };
        let parts: Vec<String> = sample
            .by_thread
            .iter()
            .filter(|(_, us)| *us >= 0.05)
            .take(6)
            .map(|(name, us)| format!("{name} {us:.2}"))
            .collect();
        println!("  {:<45} {}", variant.label(), parts.join(", "));
    }

    println!();
    println!("targets (MISS is a figure to report, not a failure):");
    let ratio = |a: usize, b: usize| Some(results[a].cpu()? / results[b].cpu()?);
    // Why a ratio is missing: the first of its two variants without figures.
    let missing = |a: usize, b: usize| -> String {
        [a, b]
            .into_iter()
            .find(|&i| results[i].cpu().is_none())
            .map_or(String::new(), |i| {
                let why = results[i].skipped.as_deref().unwrap_or("not measured");
                format!("{}: {why}", Variant::EVERY[i].label())
            })
    };
    // Whether two variants' min–max ranges over the rounds overlap: then
    // their difference is within this machine's noise.
    let overlap = |a: usize, b: usize| {
        let range = |i: usize| {
            results[i]
                .samples
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), s| {
                    (lo.min(s.cpu_us_per_request), hi.max(s.cpu_us_per_request))
                })
        };
        let ((alo, ahi), (blo, bhi)) = (range(a), range(b));
        alo <= bhi && blo <= ahi
    };
    let target = |name: &str, (a, b): (usize, usize), limit: f64| match ratio(a, b) {
        Some(v) => println!(
            "  {name:<62} {v:.3}× (≤ {limit}×)  {}{}",
            if v <= limit { "PASS" } else { "MISS" },
            if overlap(a, b) {
                "  (the rounds' ranges overlap: within noise)"
            } else {
                ""
            }
        ),
        None => println!("  {name:<62} n/a: {}", missing(a, b)),
    };
    target("everything on ≤ 1.5× bare axum", (4, 0), 1.5);
    target("telemetry off ≤ 1.05× bare axum", (1, 0), 1.05);
    match (ratio(7, 0), ratio(4, 7)) {
        (Some(naive), Some(ours)) => println!(
            "  {:<62} {naive:.3}× bare (the issue: about 1.8×); everything on is {ours:.3}× naive",
            "reference: the naive setup (variant 8)"
        ),
        // Missing the naive or the bare figure, else everything on's.
        _ => println!(
            "  reference: the naive setup: n/a: {}",
            Some(missing(7, 0))
                .filter(|why| !why.is_empty())
                .unwrap_or_else(|| missing(4, 0))
        ),
    }
    target(
        "stall watcher ≤ 1.05× (telemetry off vs off-without-watcher)",
        (1, 6),
        1.05,
    );
    target(
        "stall watcher ≤ 1.05× (all-on vs all-on-without-watcher)",
        (4, 5),
        1.05,
    );
    // The same question without the machine's noise: the watcher's own cost
    // per request, measured in isolation, over what a request costs without
    // it (telemetry off, watcher off).
    let added_us = watcher.ns_per_request() / 1000.0;
    let isolated = results[6]
        .cpu()
        .or_else(|| results[1].cpu())
        .map(|base| (base + added_us) / base);
    match isolated {
        Some(v) => println!(
            "  {:<62} {v:.3}× (≤ 1.05×)  {}",
            "stall watcher ≤ 1.05× (measured in isolation, see below)",
            if v <= 1.05 { "PASS" } else { "MISS" }
        ),
        None => println!("  stall watcher in isolation: n/a (no telemetry-off figure)"),
    }
    println!(
        "    hooks +{:.1} ns/poll × {:.2} polls per /healthz + culprit registry {:.1} ns = +{:.3} µs per request",
        watcher.hooks_ns_per_poll,
        watcher.polls_per_request,
        watcher.registry_ns_per_request,
        added_us
    );

    println!();
    println!(
        "notes: medians of {} interleaved round(s); CPU is the server process's \
         (all threads, from /proc/<pid>/task/*/schedstat) over the measured window, \
         divided by the number of 200 answers completed in it.",
        settings.rounds
    );
    println!(
        "  The load client and the OTLP receiver run in this process on the same \
         cores as the server, so req/s is shared-machine throughput; every variant \
         is measured the same way, which keeps the CPU-per-request ratios comparable."
    );
    println!(
        "  spans/req: spans the receiver got per completed request ({} batches, {} \
         unreadable); below 1 means the server dropped spans.",
        received.batches.load(Ordering::Relaxed),
        received.bad_batches.load(Ordering::Relaxed)
    );
    let mut problems = Vec::new();
    for (variant, r) in Variant::EVERY.iter().zip(results) {
        let (not_ok, errors) = r
            .samples
            .iter()
            .fold((0, 0), |(n, e), s| (n + s.not_ok, e + s.errors));
        if not_ok + errors > 0 {
            problems.push(format!(
                "  {}: {not_ok} non-200 answers, {errors} connection errors",
                variant.label()
            ));
        }
        if r.samples.iter().any(|s| s.tick_based) {
            problems.push(format!(
                "  {}: a thread exited during a window; its CPU is from clock ticks \
                 (1/{} s resolution)",
                variant.label(),
                settings.clk_tck
            ));
        }
        if let Some(line) = r.samples.iter().flat_map(|s| &s.warnings).next() {
            let lines: u64 = r.samples.iter().map(|s| s.log_lines).sum();
            problems.push(format!(
                "  {} logged {lines} line(s) at RUST_LOG=warn over {} run(s), e.g.: {line}",
                variant.label(),
                r.samples.len()
            ));
        }
    }
    if !problems.is_empty() {
        println!("  worth a look:");
        for p in problems {
            println!("  {p}");
        }
    }
    println!(
        "  took {:.0} s; reproduce with: {REPRODUCE}",
        took.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// The stall watcher's cost, measured in isolation
// ---------------------------------------------------------------------------

/// What the stall watcher adds to one request, measured without the noise of
/// a loaded 2-core machine: the poll hooks' cost per poll (a current_thread
/// runtime polling a yielding task millions of times, with and without the
/// hooks, best of several runs), times the polls a `/healthz` request takes
/// (counted by tokio's metrics on an in-process stall-lab server), plus
/// registering and unregistering the request task as a culprit.
struct WatcherCost {
    hooks_ns_per_poll: f64,
    polls_per_request: f64,
    registry_ns_per_request: f64,
}

impl WatcherCost {
    fn ns_per_request(&self) -> f64 {
        self.hooks_ns_per_poll * self.polls_per_request + self.registry_ns_per_request
    }
}

fn app_runtime(watch: bool) -> (tokio::runtime::Runtime, Option<stall_watch::Watch>) {
    let config = stall_lab::config::RuntimeConfig {
        flavor: stall_lab::config::Flavor::CurrentThread,
        worker_threads: 1,
        max_blocking_threads: 1,
    };
    let w = watch.then(|| {
        stall_watch::Watch::new(
            stall_watch::Config::default()
                .threshold(Duration::from_millis(20))
                .history(16),
        )
    });
    (
        stall_lab::runtime::build(&config, w.as_ref()).expect("runtime builds"),
        w,
    )
}

/// Nanoseconds per poll of a task that yields `polls` times.
fn ns_per_poll(watch: bool, polls: u32) -> f64 {
    let (runtime, _monitor) = app_runtime(watch);
    runtime.block_on(async {
        let task = tokio::spawn(async move {
            for _ in 0..polls {
                tokio::task::yield_now().await;
            }
        });
        let start = Instant::now();
        task.await.expect("yielding task");
        start.elapsed().as_nanos() as f64 / f64::from(polls)
    })
}

fn measure_watcher_cost() -> WatcherCost {
    const POLLS: u32 = 1_000_000;
    const RUNS: usize = 5;
    // Interleaved, best of RUNS: the minimum is the cost without
    // interference from whatever else the machine is doing.
    let (mut with, mut without) = (f64::MAX, f64::MAX);
    for _ in 0..RUNS {
        with = with.min(ns_per_poll(true, POLLS));
        without = without.min(ns_per_poll(false, POLLS));
    }

    // Registry: what request.rs does per request when the watcher runs.
    let (runtime, watch) = app_runtime(true);
    let watch = watch.expect("watcher on");
    let registry_ns = runtime.block_on(async {
        let id = tokio::spawn(async {}).id();
        let culprit = Arc::new(stall_watch::Culprit::new("GET /healthz"));
        let n = 200_000u32;
        let mut best = f64::MAX;
        for _ in 0..RUNS {
            let start = Instant::now();
            for _ in 0..n {
                drop(watch.track(id, culprit.clone()));
            }
            best = best.min(start.elapsed().as_nanos() as f64 / f64::from(n));
        }
        best
    });

    WatcherCost {
        hooks_ns_per_poll: (with - without).max(0.0),
        polls_per_request: polls_per_healthz(),
        registry_ns_per_request: registry_ns,
    }
}

/// Task polls per `GET /healthz` on a real (in-process) stall-lab server,
/// from tokio's per-worker poll counts.
fn polls_per_healthz() -> f64 {
    const REQUESTS: u64 = 2000;
    let (runtime, monitor) = app_runtime(true);
    let config =
        stall_lab::config::load(None, Vec::new(), &stall_lab::config::Overrides::default())
            .expect("default config")
            .config;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = stall_lab::state::AppState::new(
        &config,
        format!("http://{addr}"),
        monitor,
        None,
        stall_lab::scenarios::ALL.iter().map(|s| s.route),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(stall_lab::server::run(
        listener,
        state,
        async {
            let _ = stop_rx.await;
        },
        Duration::from_millis(100),
    ));
    // The client runs on the blocking pool: its work is not a task poll on
    // the worker, so the worker's count is the server's alone.
    let polls = runtime.block_on(async move {
        let metrics = tokio::runtime::Handle::current().metrics();
        let drive = move |n: u64| tokio::task::spawn_blocking(move || drive_healthz(addr, n));
        drive(100).await.expect("warm-up");
        let before = metrics.worker_poll_count(0);
        drive(REQUESTS).await.expect("requests");
        metrics.worker_poll_count(0) - before
    });
    let _ = stop_tx.send(());
    let _ = runtime.block_on(server);
    polls as f64 / REQUESTS as f64
}

/// Sends `n` sequential `GET /healthz` on one keep-alive connection.
fn drive_healthz(addr: SocketAddr, n: u64) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    for _ in 0..n {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: bench\r\n\r\n")
            .expect("write");
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read");
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let mut body = vec![0u8; length];
        std::io::Read::read_exact(&mut reader, &mut body).expect("body");
    }
}
