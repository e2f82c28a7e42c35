//! `stall-lab experiment`: the lesson, measured on this machine.
//!
//! For each runtime configuration (current_thread; multi_thread with 1, 2
//! and one-per-core workers, duplicates removed) it starts stall-lab in this
//! process ([`server::spawn_server`]), drives it with the load generator
//! ([`crate::load`]) on a separate runtime, and measures the six claims of
//! [`claims::TITLES`] under load. It writes `report.md` (one table: claim,
//! configuration, measured, expected, verdict), `report.json`, and three
//! SVG charts.
//!
//! Between two measurements it waits until `/healthz` answers quickly
//! again: a closed loop cut at its deadline leaves requests queued in the
//! server (16 blocking requests on one worker are 800 ms of work), and the
//! next measurement must not inherit them.

pub(crate) mod charts;
pub(crate) mod claims;
pub(crate) mod report;
pub(crate) mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Overrides;
use crate::load::client::{Conn, Target};
use crate::load::mix::Mix;
use crate::load::{Mode, Spec};
use claims::{BesideRoutes, FanoutPoint, Plan, Row, RuntimeSetup, Stranding, ThroughputPoint};
use report::ExperimentReport;

/// Shown at the end of `stall-lab experiment --help`.
const EXPERIMENT_HELP: &str = "\
The claims, each measured under load on every runtime configuration:
  1. a blocking handler stalls everyone on its worker (/healthz beside /block/sleep vs /coop/sleep)
  2. IO-bound work scales with concurrency, blocking work stops at workers ÷ 50 ms
  3. nothing is parallel on current_thread; parallelism needs workers (/fanout/spawn)
  4. join! is concurrent, sequential awaits are not (/fanout/join vs /fanout/sequential)
  5. spawn_blocking takes CPU work off the workers (/healthz beside /block/cpu vs /offload/cpu)
  6. a free worker is not enough: /healthz stranded during a one-worker stall,
     with and without stall.wake_idle_worker (multi_thread with 2+ workers)

Each verdict is decided by fixed bounds (src/experiment/claims.rs): a claim this machine
contradicts is reported as contradicted, with its numbers. The servers run in this process with
OTLP and tokio-console off; nothing listens beyond 127.0.0.1. A progress bar goes to stderr,
the table to stdout. --quick takes under a minute on 2 cores, the full run under 5 minutes.";

#[derive(Debug, Clone, Args)]
#[command(after_long_help = EXPERIMENT_HELP)]
pub(crate) struct ExperimentArgs {
    /// Shorter runs and fewer points (under a minute on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Where report.md, report.json and the charts go (created if missing).
    #[arg(long, value_name = "DIR", default_value = "stall-lab-report")]
    pub out: PathBuf,
}

/// `stall-lab experiment`.
pub(crate) fn main(args: ExperimentArgs) -> ExitCode {
    // The generator's runtime. The servers build their own, one at a time.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("load")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("stall-lab experiment: cannot build a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Plan::new(args.quick), &args.out)) {
        Ok(report) => {
            print!("{}", report.table());
            println!(
                "\nwritten: {} (and report.json, {})",
                args.out.join("report.md").display(),
                report.charts.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stall-lab experiment: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Measures everything in `plan` and writes the report into `out`.
pub(crate) async fn run(plan: Plan, out: &Path) -> anyhow::Result<ExperimentReport> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let started = Instant::now();
    let loadavg_start = loadavg();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let setups = claims::setups(cores);
    let woken_setups: Vec<&RuntimeSetup> = setups.iter().filter(|s| s.workers >= 2).collect();
    let steps = setups.len() as u64 * (2 + 2 * plan.concurrencies.len() as u64 + 1 + 1 + 2)
        + woken_setups.len() as u64 * 2 * plan.stalls as u64;
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );

    let mut rows: Vec<Row> = Vec::new();
    let (mut beside_sleep, mut beside_cpu) = (Vec::new(), Vec::new());
    let (mut throughput, mut fanout, mut stranding) = (Vec::new(), Vec::new(), Vec::new());
    for setup in &setups {
        let server = start(setup, false)?;
        let url = server.app_url.clone();
        let label = setup.label.as_str();

        for (claim, into) in [
            (&claims::CLAIM_1, &mut beside_sleep),
            (&claims::CLAIM_5, &mut beside_cpu),
        ] {
            let mut sides = Vec::new();
            for background in [claim.blocking, claim.fixed] {
                bar.set_message(format!("{label}: /healthz beside {background}"));
                let report = load(
                    &url,
                    &claim.mix(background),
                    Mode::Open { rate: claim.rate() },
                    plan.run,
                )
                .await?;
                sides.push(BesideRoutes::beside(claim, label, background, &report));
                bar.inc(1);
            }
            rows.push(claim.row(label, &sides[0], &sides[1]));
            into.extend(sides);
        }

        let mut points = Vec::new();
        for route in [claims::COOP_50, claims::BLOCK_50] {
            for &concurrency in &plan.concurrencies {
                bar.set_message(format!("{label}: {route} with {concurrency} connection(s)"));
                let duration = claims::point_duration(&plan, route, concurrency, setup.workers);
                let report = load(&url, route, Mode::Closed { concurrency }, duration).await?;
                points.push(ThroughputPoint {
                    configuration: label.to_owned(),
                    route: route.to_owned(),
                    concurrency,
                    throughput: report.overall.throughput,
                    p50_ms: report.overall.latency_ms.p50,
                    not_ok: report.overall.answered - report.overall.ok,
                });
                bar.inc(1);
            }
        }
        rows.push(claims::throughput_row(setup, &points));
        throughput.extend(points);

        bar.set_message(format!("{label}: {}", claims::FANOUT));
        let report = load(
            &url,
            claims::FANOUT,
            Mode::Closed { concurrency: 1 },
            plan.fanout,
        )
        .await?;
        let point = FanoutPoint {
            configuration: label.to_owned(),
            workers: setup.workers,
            p50_ms: report.overall.latency_ms.p50,
            expected_ms: claims::fanout_expected(setup.workers),
            answered: report.overall.ok,
        };
        rows.push(claims::fanout_row(&point));
        fanout.push(point);
        bar.inc(1);

        bar.set_message(format!("{label}: join! vs sequential"));
        let report = load(
            &url,
            &format!("{}:1,{}:1", claims::JOIN, claims::SEQUENTIAL),
            Mode::Open {
                rate: 2.0 * claims::JOIN_RATE,
            },
            plan.run,
        )
        .await?;
        rows.push(claims::join_row(label, &report));
        bar.inc(1);

        stop(server).await;
    }

    for setup in woken_setups {
        for wake in [false, true] {
            let server = start(setup, wake)?;
            let s = strand(&server.app_url, &setup.label, wake, plan.stalls, &bar).await?;
            rows.push(claims::stranding_row(&s));
            stranding.push(s);
            stop(server).await;
        }
    }
    bar.finish_and_clear();
    // One table, claim by claim (rows were made runtime by runtime).
    rows.sort_by_key(|r| r.claim);

    let mut charts = Vec::new();
    let draw = [
        (
            charts::LATENCY,
            charts::latency(&out.join(charts::LATENCY), &setups, &beside_sleep),
        ),
        (
            charts::THROUGHPUT,
            charts::throughput(&out.join(charts::THROUGHPUT), &setups, &throughput),
        ),
        (
            charts::FANOUT,
            charts::fanout(&out.join(charts::FANOUT), &fanout),
        ),
    ];
    for (name, drawn) in draw {
        match drawn {
            Ok(()) => charts.push(name),
            Err(e) => eprintln!("stall-lab experiment: chart {name} not drawn: {e}"),
        }
    }
    let report = ExperimentReport {
        stall_lab_version: env!("CARGO_PKG_VERSION"),
        cores,
        plan,
        elapsed_s: started.elapsed().as_secs_f64(),
        loadavg: [loadavg_start, loadavg()],
        setups,
        rows,
        beside_sleep,
        throughput,
        fanout,
        beside_cpu,
        stranding,
        charts,
    };
    std::fs::write(out.join("report.md"), report.markdown())
        .with_context(|| format!("cannot write {}", out.join("report.md").display()))?;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )
    .with_context(|| format!("cannot write {}", out.join("report.json").display()))?;
    Ok(report)
}

/// The machine's 1-minute load average (`/proc/loadavg`), for the report:
/// on a shared machine it says how much else was running.
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn start(setup: &RuntimeSetup, wake: bool) -> anyhow::Result<server::RunningServer> {
    let overrides = Overrides {
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        flavor: Some(setup.flavor),
        workers: Some(setup.workers),
        no_otlp: true,
        no_console: true,
        ..Overrides::default()
    };
    // No file and no environment: the experiment measures the built-in
    // configuration, whatever the shell has set.
    let mut config = crate::config::load(None, std::iter::empty(), &overrides)?.config;
    config.stall.wake_idle_worker = wake;
    server::spawn_server(config).with_context(|| format!("cannot start {}", setup.label))
}

async fn stop(server: server::RunningServer) {
    // Joining the server's thread blocks: not on a generator worker.
    let _ = tokio::task::spawn_blocking(move || server.stop()).await;
}

fn target(app_url: &str) -> anyhow::Result<Target> {
    let authority = app_url.trim_start_matches("http://").to_owned();
    Ok(Target {
        addr: authority.parse().context("the server's address")?,
        authority,
    })
}

/// One load run against `app_url`, then a wait until the server is idle.
async fn load(
    app_url: &str,
    mix: &str,
    mode: Mode,
    duration: Duration,
) -> anyhow::Result<crate::load::stats::Report> {
    let spec = Spec {
        url: app_url.to_owned(),
        target: target(app_url)?,
        mix: Mix::parse(mix)?,
        mode,
        duration,
        max_connections: 1024,
    };
    let report = crate::load::run(&spec, false).await;
    settle(&spec.target).await;
    Ok(report)
}

/// Waits (up to 5 s) until a `/healthz` on a new connection answers within
/// 10 ms: the requests the last run left in the server are done.
async fn settle(target: &Target) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let asked = Instant::now();
        let quick = match Conn::open(target).await {
            Ok(mut conn) => conn.get(target, "/healthz").await.is_ok(),
            Err(_) => false,
        };
        if quick && asked.elapsed() < Duration::from_millis(10) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The longest claim 6 waits for any one answer: the experiment always
/// ends, whatever the server does.
const BOUND: Duration = Duration::from_secs(10);

/// Claim 6: `stalls` times, a [`claims::STALL`] on a keep-alive connection,
/// and during it a `/healthz` on a new connection at each of
/// [`claims::PROBE_OFFSETS_MS`]. Counts the probes that waited for the
/// stall.
async fn strand(
    app_url: &str,
    label: &str,
    wake: bool,
    stalls: usize,
    bar: &ProgressBar,
) -> anyhow::Result<Stranding> {
    let target = target(app_url)?;
    // The keep-alive connection: one request first, so the server's
    // connection task exists and waits for the next request on it, as a
    // browser's or a proxy's would.
    let mut keep_alive = Conn::open(&target)
        .await
        .map_err(|e| anyhow::anyhow!(e.label()))?;
    keep_alive
        .get(&target, "/healthz")
        .await
        .map_err(|e| anyhow::anyhow!(e.label()))?;
    let mut result = Stranding {
        configuration: label.to_owned(),
        wake_idle_worker: wake,
        probes: 0,
        stranded: 0,
        failed: 0,
        probe_ms: Vec::new(),
    };
    for _ in 0..stalls {
        bar.set_message(format!(
            "{label}: one-worker stall, wake_idle_worker = {wake}"
        ));
        let begun = tokio::time::Instant::now();
        let stall_target = target.clone();
        let stall = tokio::spawn(async move {
            let status = keep_alive.get(&stall_target, claims::STALL).await;
            (keep_alive, status)
        });
        let mut probes = Vec::new();
        for offset in claims::PROBE_OFFSETS_MS {
            tokio::time::sleep_until(begun + Duration::from_millis(offset)).await;
            let target = target.clone();
            probes.push(tokio::spawn(async move {
                let sent = Instant::now();
                let answered = tokio::time::timeout(BOUND, async {
                    let mut conn = Conn::open(&target).await?;
                    conn.get(&target, "/healthz").await
                })
                .await;
                match answered {
                    Ok(Ok(_)) => Some(sent.elapsed()),
                    _ => None,
                }
            }));
        }
        for probe in probes {
            match probe.await? {
                Some(latency) => {
                    result.probes += 1;
                    let ms = latency.as_secs_f64() * 1000.0;
                    if ms >= claims::STRANDED_MS {
                        result.stranded += 1;
                    }
                    result.probe_ms.push(ms);
                }
                None => result.failed += 1,
            }
        }
        let (conn, status) = tokio::time::timeout(BOUND, stall)
            .await
            .context("the stall's request got no answer within 10 s")??;
        status.map_err(|e| anyhow::anyhow!("the stall's request failed: {}", e.label()))?;
        keep_alive = conn;
        bar.inc(1);
    }
    Ok(result)
}
