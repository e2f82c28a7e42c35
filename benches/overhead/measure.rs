//! Measuring one variant once: server CPU time from /proc (schedstat, with
//! clock ticks as the fallback), peak RSS, and the spans received.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::load::Load;
use crate::receiver::Received;
use crate::servers::{Started, start_server};
use crate::variant::Variant;
use crate::{Settings, WARMUP};

#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub(crate) requests_per_s: f64,
    pub(crate) cpu_us_per_request: f64,
    /// Server CPU time / wall time: how many cores the server kept busy.
    pub(crate) server_cores: f64,
    pub(crate) spans_per_request: Option<f64>,
    pub(crate) tick_based: bool,
    /// µs per request by server thread (group), largest first.
    pub(crate) by_thread: Vec<(String, f64)>,
    pub(crate) not_ok: u64,
    pub(crate) errors: u64,
    pub(crate) warnings: Vec<String>,
    /// How many lines the server logged (at `RUST_LOG=warn`) in this run.
    pub(crate) log_lines: u64,
    /// The server's peak resident memory (VmHWM), MiB.
    pub(crate) peak_rss_mib: Option<f64>,
}

/// Peak resident set size of `pid` in MiB, from /proc/<pid>/status.
pub(crate) fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub(crate) enum Outcome {
    Measured(Sample),
    Skipped {
        why: String,
        /// What the server said (its first stderr line).
        detail: String,
    },
}

pub(crate) fn measure(
    variant: Variant,
    settings: &Settings,
    client: &tokio::runtime::Runtime,
    receiver: (SocketAddr, &Received),
) -> Result<Outcome, String> {
    let (receiver_addr, received) = receiver;
    let spans_before = received.spans.load(Ordering::Relaxed);
    let server = match start_server(variant.command(receiver_addr, false)?)? {
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

pub(crate) struct CpuSample {
    /// Sum over the threads alive now of their time on CPU (schedstat), ns.
    sched_ns: u64,
    /// Thread id → (thread name, time on CPU in ns).
    threads: BTreeMap<u32, (String, u64)>,
    /// utime + stime of the whole process, including exited threads, ticks.
    ticks: u64,
}

pub(crate) fn cpu_sample(pid: u32) -> Result<CpuSample, String> {
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
pub(crate) fn cpu_between(a: &CpuSample, b: &CpuSample, clk_tck: u64) -> (u64, bool) {
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
pub(crate) fn cpu_by_thread(a: &CpuSample, b: &CpuSample) -> Vec<(String, u64)> {
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

pub(crate) fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// Allocations per completed request of `variant`, from this bench binary
/// running it with its allocations counted (see `allocs`): the count over
/// `window` after the warm-up, over the requests answered in it. `None`
/// when the variant could not start (e.g. a build without a config key).
pub(crate) fn count_allocs(
    variant: Variant,
    settings: &Settings,
    client: &tokio::runtime::Runtime,
    receiver_addr: SocketAddr,
) -> Result<Option<f64>, String> {
    let Started::Up(mut server) = start_server(variant.command(receiver_addr, true)?)? else {
        return Ok(None);
    };
    let load = Load::start(client, server.app, settings.connections);
    std::thread::sleep(WARMUP);
    let ok0 = load.counters.ok.load(Ordering::Relaxed);
    let a0 = server.allocations()?;
    std::thread::sleep(settings.window.min(Duration::from_secs(2)));
    let a1 = server.allocations()?;
    let ok1 = load.counters.ok.load(Ordering::Relaxed);
    load.stop(client);
    let requests = ok1.saturating_sub(ok0);
    if requests == 0 {
        return Err("no request completed".into());
    }
    Ok(Some(a1.saturating_sub(a0) as f64 / requests as f64))
}
