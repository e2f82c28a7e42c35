//! What stall-lab's instrumentation costs: **server CPU time per request of
//! `GET /healthz` at saturation**, stall-lab against a hello-world axum server.
//!
//! Run with: cargo bench --bench overhead
//!
//! (`OVERHEAD_SECS`, default 5, sets the measured window per run;
//! `OVERHEAD_ROUNDS` (3), `OVERHEAD_CONNS` (32) and `OVERHEAD_CLIENT_THREADS`
//! (1) the rest; `OVERHEAD_VARIANTS=all,all-no-watcher` runs a subset, named
//! bare, off, otlp, console, all, all-no-watcher, off-no-watcher, naive,
//! bare-task;
//! `OVERHEAD_STALL_LAB=<path>` runs another build of stall-lab. Run by `cargo test
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
//!    layer, fmt): the reference point for what a first attempt costs. It
//!    has none of stall-lab's per-request work (request task, poll
//!    statistics, watcher, report).
//! 9. `bare-task`: the bare server with each request's handler spawned as
//!    a named task and awaited, as stall-lab does: the floor of that design,
//!    before any span, statistics or watcher.
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
//!
//! Layout: `variant` (the variants, results per variant), `servers` (the
//! child processes), `receiver` (the OTLP receiver), `load` (the client),
//! `measure` (one variant once: CPU, RSS, spans; allocations, counted by
//! `allocs`), `report` (the table and
//! targets), `watcher_cost` (the watcher measured in process) with
//! `in_process`, the bench's only calls into stall-lab's library.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

mod allocs;
mod in_process;
mod load;
mod measure;
mod receiver;
mod report;
mod servers;
mod variant;
mod watcher_cost;

use measure::{Outcome, clock_ticks_per_second, count_allocs, measure};
use receiver::start_otlp_receiver;
use report::{Results, report};
use servers::{Hello, bare_server, stall_lab_binary};
use variant::{ByVariant, Variant};
use watcher_cost::measure_watcher_cost;

/// The allocator stall-lab's binary uses (see `src/bin/stall-lab.rs`), so
/// that the bare axum server differs from stall-lab by the instrumentation
/// only, not by its allocator.
/// Wrapped to count allocations, only in a child asked to (see `allocs`).
#[global_allocator]
static GLOBAL: allocs::Counting = allocs::Counting(tikv_jemallocator::Jemalloc);

/// Set in the child environment to run this binary as the bare axum server.
pub(crate) const BARE_SERVER_ENV: &str = "OVERHEAD_BARE_SERVER";
/// Its value for the naive everything-on server instead of the bare one.
pub(crate) const NAIVE: &str = "naive";
/// Its value for bare axum with a task per request (variant 9).
pub(crate) const TASK_PER_REQUEST: &str = "task";
/// Its value for stall-lab itself, run from this binary (`stall_lab::cli`)
/// so that its allocations are counted (see `allocs`).
pub(crate) const STALL_LAB_HERE: &str = "stall-lab";
/// The real server, built by cargo for benches and integration tests.
pub(crate) const STALL_LAB: &str = env!("CARGO_BIN_EXE_stall-lab");
pub(crate) const REPRODUCE: &str = "cargo bench --bench overhead";
pub(crate) const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const WARMUP: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    if let Some(which) = std::env::var_os(BARE_SERVER_ENV) {
        allocs::serve_counts_if_asked();
        if which == STALL_LAB_HERE {
            return stall_lab::cli::main();
        }
        return bare_server(if which == NAIVE {
            Hello::Naive
        } else if which == TASK_PER_REQUEST {
            Hello::TaskPerRequest
        } else {
            Hello::Bare
        });
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

pub(crate) struct Settings {
    pub(crate) window: Duration,
    pub(crate) rounds: usize,
    pub(crate) connections: usize,
    pub(crate) client_threads: usize,
    pub(crate) clk_tck: u64,
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
    let mut results: ByVariant<Results> = ByVariant::default();
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
        for variant in Variant::EVERY {
            if !keys.contains(&variant.key()) {
                results[variant].skipped = Some("not selected (OVERHEAD_VARIANTS)".into());
            }
        }
    }
    println!("overhead: server CPU time per `GET /healthz` at saturation");
    println!(
        "  {} round(s) x {} variant(s), {:.1} s measured after {:.0} s warm-up each; \
         {} keep-alive connections from {} client thread(s); {cores} CPU core(s)",
        settings.rounds,
        results.values().filter(|r| r.skipped.is_none()).count(),
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
    println!("  counting allocations per request (each variant once, from this binary)…");
    for variant in Variant::EVERY {
        let r = &mut results[variant];
        if r.skipped.is_some() {
            continue;
        }
        match count_allocs(variant, &settings, &client, receiver_addr) {
            Ok(Some(n)) => {
                println!("  {:<45} {n:>8.1} allocations/request", variant.label());
                r.allocs_per_request = Some(n);
            }
            Ok(None) => println!("  {:<45} not counted", variant.label()),
            Err(e) => println!("  {:<45} counting failed: {e}", variant.label()),
        }
    }
    for round in 1..=settings.rounds {
        for variant in Variant::EVERY {
            let r = &mut results[variant];
            if r.skipped.is_some() || r.failed.is_some() {
                continue;
            }
            match measure(variant, &settings, &client, (receiver_addr, &received)) {
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
    if results.values().any(|r| r.failed.is_some()) {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
