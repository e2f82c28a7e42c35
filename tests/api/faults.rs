//! A collector that fails: refusing connections, blackholed, slow, killed in
//! the middle of an export and restarted. Under steady load, each run
//! measures the same server with a healthy collector first, then with the
//! fault, then with the collector back, and then stops it with SIGTERM while
//! the fault is on again:
//!
//! - throughput with the fault, as a share of the healthy phase's;
//! - resident memory (VmRSS) over the run;
//! - how long after the collector returns the next export arrives;
//! - how many warnings the outage logged, and the dropped-span count;
//! - how long SIGTERM takes.
//!
//! Each test prints its figures (`--nocapture`). `STALL_LAB_FAULT_SECS`
//! sets each phase's length (default 5 s); `STALL_LAB_FAULT_MIN_RATIO` the
//! throughput share a CI run must keep (default 0.6: the goal is 0.9, but a
//! shared 2-core machine running other builds moves a 5 s phase by more
//! than 10 %; the printed figures are the measurement).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::helpers::{TestApp, spawn_app};
use crate::otlp_support::{Behaviour, ScriptedCollector};

/// The batch delay the runs use: the default (`telemetry.batch_delay_ms`).
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// `server.shutdown_grace_ms` in these runs.
const GRACE: Duration = Duration::from_millis(2000);
/// Closed-loop clients of the steady load.
const CLIENTS: usize = 4;
/// The load: a little CPU per request, so the server is CPU-bound and any
/// CPU the export takes away would show in the throughput.
const PATH: &str = "/coop/cpu?ms=2";

fn phase() -> Duration {
    let secs = std::env::var("STALL_LAB_FAULT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0);
    Duration::from_secs_f64(secs)
}

fn min_ratio() -> f64 {
    std::env::var("STALL_LAB_FAULT_MIN_RATIO")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.6)
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Closed-loop load: `CLIENTS` tasks sending `PATH` back to back over
/// kept-alive connections, counting answers.
struct Load {
    ok: Arc<AtomicU64>,
    /// Anything but a 200 (status or error), while `counting_errors`.
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    counting_errors: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(app: &TestApp) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let counting_errors = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..CLIENTS)
            .map(|_| {
                let (ok, errors, counting, stop) = (
                    ok.clone(),
                    errors.clone(),
                    counting_errors.clone(),
                    stop.clone(),
                );
                let client = reqwest::Client::builder().no_proxy().build().unwrap();
                let url = app.url(PATH);
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let answer = client.get(&url).send().await;
                        let failure = match answer {
                            Ok(r) if r.status() == 200 => {
                                let _ = r.bytes().await;
                                ok.fetch_add(1, Ordering::Relaxed);
                                None
                            }
                            Ok(r) => Some(format!("status {}", r.status())),
                            Err(e) => Some(e.to_string()),
                        };
                        if let Some(failure) = failure {
                            if counting.load(Ordering::Relaxed) {
                                errors.lock().unwrap().push(failure);
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                })
            })
            .collect();
        Self {
            ok,
            errors,
            counting_errors,
            stop,
            tasks,
        }
    }

    /// Answers per second over `length`, from now.
    async fn rate_over(&self, length: Duration) -> f64 {
        let before = self.ok.load(Ordering::Relaxed);
        let start = Instant::now();
        tokio::time::sleep(length).await;
        (self.ok.load(Ordering::Relaxed) - before) as f64 / start.elapsed().as_secs_f64()
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// Samples the server's VmRSS every 200 ms; keeps the largest.
fn watch_rss(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut max = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Some(kib) = rss_kib(pid) {
                max = max.max(kib);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        max
    })
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The port is closed: every connection is refused.
    Refusing,
    /// Exports are read and never answered.
    Blackhole,
    /// Every export takes 2 s.
    Slow,
    /// Killed while an export is in flight (that export's connection is
    /// reset), then restarted on the same port.
    KilledMidExport,
}

impl Fault {
    fn begin(self, collector: &ScriptedCollector) {
        match self {
            Fault::Refusing => collector.kill(),
            Fault::Blackhole => collector.set(Behaviour::Blackhole),
            Fault::Slow => collector.set(Behaviour::Slow(Duration::from_secs(2))),
            Fault::KilledMidExport => {
                // Hold the next export, then kill with it in flight.
                collector.set(Behaviour::Blackhole);
                std::thread::sleep(BATCH_DELAY * 2);
                collector.kill();
                collector.set(Behaviour::Healthy);
            }
        }
    }

    fn end(self, collector: &ScriptedCollector) {
        match self {
            Fault::Refusing | Fault::KilledMidExport => collector.restart(),
            Fault::Blackhole | Fault::Slow => collector.set(Behaviour::Healthy),
        }
    }
}

#[derive(Debug)]
struct Figures {
    healthy_rps: f64,
    fault_rps: f64,
    recovered_rps: f64,
    rss_start_mib: f64,
    rss_max_mib: f64,
    resume: Option<Duration>,
    warnings: usize,
    /// Dropped by the first outage, from its recovery line (none if it
    /// never counted as one).
    dropped_in_outage: Option<u64>,
    exported: u64,
    dropped: u64,
    exit_after_sigterm: Duration,
}

/// Figures from the server's last log line, `telemetry: N span(s)
/// exported, M dropped …` (or `…, none dropped`).
fn shutdown_counts(logs: &str) -> (u64, u64) {
    let line = logs
        .lines()
        .rev()
        .find(|l| l.contains("span(s) exported"))
        .unwrap_or_else(|| panic!("no export report in the logs:\n{logs}"));
    let rest = line.split("telemetry: ").nth(1).unwrap();
    let exported = rest.split_whitespace().next().unwrap().parse().unwrap();
    let dropped = if rest.contains("none dropped") {
        0
    } else {
        rest.split(", ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (exported, dropped)
}

async fn run_with(fault: Fault, protocol: &str, extra_env: &[(&str, &str)]) -> Figures {
    let collector = match protocol {
        "grpc" => ScriptedCollector::start_grpc(),
        _ => ScriptedCollector::start(),
    };
    let endpoint = collector.endpoint();
    let grace = GRACE.as_millis().to_string();
    let delay = BATCH_DELAY.as_millis().to_string();
    let mut env = vec![
        ("STALL_LAB__TELEMETRY__OTLP", "true"),
        // The console's own memory (its task budget) is not this test's,
        // nor the stack symbolizer's: a stall from the OS preempting a
        // worker on a loaded machine would read the debug build's DWARF
        // (tens of MB for a moment; tests/api/stacks.rs covers stacks).
        ("STALL_LAB__TELEMETRY__CONSOLE", "false"),
        ("STALL_LAB__STALL__STACKS", "false"),
        ("STALL_LAB__TELEMETRY__BATCH_DELAY_MS", delay.as_str()),
        ("STALL_LAB__SERVER__SHUTDOWN_GRACE_MS", grace.as_str()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", collector.protocol),
    ];
    env.extend_from_slice(extra_env);
    let mut app = spawn_app(&["--workers", "2"], &env);
    let pid = app.pid();
    let load = Load::start(&app);
    // Warm-up: connections, allocator arenas, the first exports.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_start = rss_kib(pid).unwrap();
    let stop_rss = Arc::new(AtomicBool::new(false));
    let rss = watch_rss(pid, stop_rss.clone());

    let healthy_rps = load.rate_over(phase()).await;
    let before = app.admin_json("/debug/runtime").await["otlp"].clone();
    tokio::task::block_in_place(|| fault.begin(&collector));
    let fault_rps = load.rate_over(phase()).await;
    // What the admin server shows during the outage: the same counters the
    // recovery line and the shutdown report give.
    let during = app.admin_json("/debug/runtime").await["otlp"].clone();
    assert!(
        during["exported"].as_u64() >= before["exported"].as_u64(),
        "{before} then {during}"
    );
    assert!(
        during["dropped"].is_u64() && during["queued"].is_u64(),
        "{during}"
    );
    tokio::task::block_in_place(|| fault.end(&collector));
    let back = Instant::now();
    let recovered_rps = load.rate_over(phase()).await;
    let resume = collector
        .exports()
        .iter()
        .find(|e| e.received >= back)
        .map(|e| e.received - back);
    let logs = app.logs();
    let warnings = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("OTLP export"))
        .count();
    // The recovery line counts what the outage cost: `(N dropped so far)`.
    let dropped_in_outage = logs
        .lines()
        .find(|l| l.contains("recovered; spans are flowing again"))
        .and_then(|l| l.split('(').nth(1)?.split_whitespace().next()?.parse().ok());

    // The fault again, and SIGTERM under load.
    tokio::task::block_in_place(|| fault.begin(&collector));
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.counting_errors.store(false, Ordering::Relaxed);
    let start = Instant::now();
    let status = tokio::task::block_in_place(|| app.terminate(GRACE + Duration::from_secs(10)));
    let exit_after_sigterm = start.elapsed();
    stop_rss.store(true, Ordering::Relaxed);
    let rss_max = rss.await.unwrap();
    let errors = load.errors.lock().unwrap().clone();
    load.stop().await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", app.logs());
    assert!(
        errors.is_empty(),
        "{} failed requests: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let logs = app.logs_at_exit();
    let (exported, dropped) = shutdown_counts(&logs);
    Figures {
        healthy_rps,
        fault_rps,
        recovered_rps,
        rss_start_mib: rss_start as f64 / 1024.0,
        rss_max_mib: rss_max as f64 / 1024.0,
        resume,
        warnings,
        dropped_in_outage,
        exported,
        dropped,
        exit_after_sigterm,
    }
}

/// Runs `fault`, prints its figures, and checks them.
async fn the_server_holds_under(fault: Fault, protocol: &str, extra_env: &[(&str, &str)]) {
    let _exclusive = crate::helpers::exclusive().await;
    let f = run_with(fault, protocol, extra_env).await;
    let ratio = f.fault_rps / f.healthy_rps;
    eprintln!(
        "collector fault {fault:?} ({protocol}): {:.0} req/s healthy, {:.0} with the fault ({:.1} %), {:.0} after; \
         RSS {:.1} MiB -> max {:.1} MiB (+{:.1}); exports resumed {:?} after the collector returned; \
         {} warning(s); {:?} span(s) dropped by the outage; at exit {} span(s) exported, {} dropped \
         (the second fault included); exit {:?} after SIGTERM",
        f.healthy_rps,
        f.fault_rps,
        ratio * 100.0,
        f.recovered_rps,
        f.rss_start_mib,
        f.rss_max_mib,
        f.rss_max_mib - f.rss_start_mib,
        f.resume,
        f.warnings,
        f.dropped_in_outage,
        f.exported,
        f.dropped,
        f.exit_after_sigterm,
    );
    assert!(
        ratio >= min_ratio(),
        "throughput with the fault {:.0} req/s is {:.1} % of healthy {:.0} req/s",
        f.fault_rps,
        ratio * 100.0,
        f.healthy_rps
    );
    assert!(
        f.rss_max_mib - f.rss_start_mib <= 20.0,
        "RSS grew from {:.1} to {:.1} MiB",
        f.rss_start_mib,
        f.rss_max_mib
    );
    let resume = f
        .resume
        .expect("no export arrived after the collector returned");
    assert!(
        resume <= BATCH_DELAY * 2 + Duration::from_millis(250),
        "exports resumed {resume:?} after the collector returned (two batch intervals: {:?})",
        BATCH_DELAY * 2
    );
    match fault {
        // A collector that answers, slowly, is an outage only if the queue
        // overflows meanwhile.
        Fault::Slow => assert!(
            f.warnings <= 1,
            "{} warnings for one slow spell",
            f.warnings
        ),
        _ => assert_eq!(f.warnings, 1, "one warning for the one outage"),
    }
    assert!(f.exported > 0);
    assert!(
        f.exit_after_sigterm <= GRACE + Duration::from_secs(3),
        "SIGTERM took {:?}",
        f.exit_after_sigterm
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_refusing_connections() {
    the_server_holds_under(Fault::Refusing, "http/protobuf", &[]).await;
}

/// The exporter's timeout is what frees the export thread from a
/// blackhole; 3 s here (the spec's default, 10 s, behaves the same, slower).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_collector() {
    the_server_holds_under(
        Fault::Blackhole,
        "http/protobuf",
        &[("OTEL_EXPORTER_OTLP_TIMEOUT", "3000")],
    )
    .await;
}

/// Over gRPC the export runs on the `otlp-grpc` runtime under a tokio
/// timeout of the same length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_grpc_collector() {
    the_server_holds_under(
        Fault::Blackhole,
        "grpc",
        &[("OTEL_EXPORTER_OTLP_TIMEOUT", "3000")],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_collector() {
    the_server_holds_under(Fault::Slow, "http/protobuf", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_killed_mid_export_and_restarted() {
    the_server_holds_under(Fault::KilledMidExport, "http/protobuf", &[]).await;
}
