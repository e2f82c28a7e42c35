//! `stall-lab load`: the load generator, as a command and as the engine of
//! `stall-lab experiment`.
//!
//! Two loops, because they answer two different questions:
//!
//! - **Open loop** (`--rate R`): request `n` is *due* at `start + n/R`,
//!   whatever happened to the ones before it, the way users arrive. A
//!   request is written on an idle connection, or on a new one if all are
//!   busy (up to `--max-connections`), and its latency is counted **from when
//!   it was due**. So when the server stalls for 200 ms, the requests that
//!   should have gone out during the stall are not silently sent late and
//!   timed from then (coordinated omission, Gil Tene's term): each one shows
//!   the wait it would really have had. This answers "what latency do users
//!   see at this load?", the experiment's question about `/healthz` beside
//!   blocking traffic.
//! - **Closed loop** (`--concurrency C`): C connections, each sending its
//!   next request as soon as the last one is answered. Throughput is then
//!   what the server can do with C requests in flight: "does it scale with
//!   concurrency?" Latency here is from when each request was written, since
//!   in a closed loop a request is due exactly when it is sent.
//!
//! How the others do it, and why this one is built this way:
//!
//! - wrk2 fixes the connections *and* the rate: each connection has its own
//!   schedule and measures from it (the original CO correction). Against a
//!   server that stalls, its N connections all sit behind the stall and the
//!   requests pile up inside the generator; the latency is right, but the
//!   server never sees the arrivals it would see from independent users.
//! - oha runs a fixed number of connections, and with `--latency-correction`
//!   measures rate-limited requests from their scheduled time; same trade.
//! - goose simulates users in a closed loop and back-fills the requests a
//!   slow answer delayed (`--co-mitigation`) with synthetic ones: the
//!   numbers are estimated, not measured.
//!
//! Here the open loop opens connections on demand instead, so the server
//! receives requests at the scheduled rate (a stalled worker gets the
//! arrivals it would get in production, which is the lesson) and the
//! correction is exact, from the schedule, with nothing synthesized. The
//! generator runs on its own runtime (`--threads`), apart from the server's,
//! and reports its own CPU, so one can see it is not the bottleneck.

mod cli;
pub(crate) mod client;
pub(crate) mod mix;
pub(crate) mod stats;

pub(crate) use cli::{LoadArgs, main};

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use client::{Conn, Failure, Target};
use mix::Mix;
use stats::{CpuUse, Head, Outcome, Report, Tally};

/// How requests are paced.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Mode {
    /// A fixed rate in requests per second, latency from the schedule.
    Open { rate: f64 },
    /// A fixed number of connections, each one request at a time.
    Closed { concurrency: usize },
}

/// One load run, checked and ready.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    /// The `--url` as given, for the report.
    pub url: String,
    pub target: Target,
    pub mix: Mix,
    pub mode: Mode,
    pub duration: Duration,
    /// The open loop's ceiling on connections; past it, due requests wait
    /// for one to free up (and that wait counts in their latency).
    pub max_connections: usize,
}

/// Counters the request tasks update and the progress line reads.
#[derive(Default)]
struct Shared {
    /// One tally per route. A std `Mutex`: it is held only to record one
    /// outcome, a few hundred nanoseconds, never across an `.await`, so a
    /// tokio mutex would only add overhead.
    tallies: Mutex<Vec<Tally>>,
    started: AtomicU64,
    finished: AtomicU64,
    failed: AtomicU64,
    connections: AtomicU64,
}

impl Shared {
    fn record(&self, route: usize, outcome: Outcome) {
        if matches!(outcome, Outcome::Failed { .. }) {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.tallies.lock().expect("no panics while recording")[route].record(&outcome);
        self.finished.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `spec` to completion on the current runtime and reports. Always
/// returns within about `spec.duration`: requests still waiting then are
/// counted as unfinished, with their wait so far.
pub(crate) async fn run(spec: &Spec, progress: bool) -> Report {
    let shared = Arc::new(Shared {
        tallies: Mutex::new(vec![Tally::default(); spec.mix.routes().len()]),
        ..Shared::default()
    });
    let cpu_before = process_cpu();
    let start = Instant::now();
    let deadline = start + spec.duration;
    let ticker = progress.then(|| tokio::spawn(progress_line(shared.clone(), start, spec.mode)));
    match spec.mode {
        Mode::Open { rate } => open_loop(spec, &shared, rate, start, deadline).await,
        Mode::Closed { concurrency } => closed_loop(spec, &shared, concurrency, deadline).await,
    }
    let elapsed = start.elapsed();
    if let Some(ticker) = ticker {
        ticker.abort();
        let _ = ticker.await;
        if std::io::stderr().is_terminal() {
            eprint!("\r\x1b[2K");
        }
    }
    let cpu = match (cpu_before, process_cpu()) {
        (Some((u0, s0)), Some((u1, s1))) => Some(CpuUse {
            user_s: u1 - u0,
            system_s: s1 - s0,
            cores: (u1 - u0 + s1 - s0) / elapsed.as_secs_f64(),
        }),
        _ => None,
    };
    let tallies = shared.tallies.lock().expect("no panics while recording");
    let (rate, concurrency, mode) = match spec.mode {
        Mode::Open { rate } => (Some(rate), None, "open"),
        Mode::Closed { concurrency } => (None, Some(concurrency), "closed"),
    };
    let paths: Vec<String> = spec.mix.routes().iter().map(|r| r.path.clone()).collect();
    Report::new(
        Head {
            url: spec.url.clone(),
            mode,
            rate,
            concurrency,
            connections: shared.connections.load(Ordering::Relaxed),
        },
        &paths,
        &tallies,
        elapsed,
        cpu,
    )
}

/// Idle keep-alive connections of the open loop, and a cap on how many
/// exist.
struct Pool {
    idle: Mutex<Vec<Conn>>,
    slots: Semaphore,
}

impl Pool {
    /// Sends `GET path` on an idle connection, or a new one. Returns the
    /// status and when the request was written.
    async fn request(
        &self,
        target: &Target,
        path: &str,
        shared: &Shared,
    ) -> Result<(hyper::StatusCode, Instant), Failure> {
        // Waits only if `max_connections` requests are already in flight.
        let _slot = self.slots.acquire().await.expect("the pool never closes");
        let idle = self.idle.lock().expect("no panics holding the pool").pop();
        let mut conn = match idle {
            Some(conn) if !conn.is_closed() => conn,
            _ => {
                shared.connections.fetch_add(1, Ordering::Relaxed);
                Conn::open(target).await?
            }
        };
        let written = Instant::now();
        // On error the connection is dropped here, not returned.
        let status = conn.get(target, path).await?;
        self.idle
            .lock()
            .expect("no panics holding the pool")
            .push(conn);
        Ok((status, written))
    }
}

async fn open_loop(
    spec: &Spec,
    shared: &Arc<Shared>,
    rate: f64,
    start: Instant,
    deadline: Instant,
) {
    let pool = Arc::new(Pool {
        idle: Mutex::new(Vec::new()),
        slots: Semaphore::new(spec.max_connections),
    });
    let mut tasks = JoinSet::new();
    for n in 0u64.. {
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        if due >= deadline {
            break;
        }
        // The schedule, not the answers, decides when the next request goes:
        // this loop never waits for a response. (tokio's timer has 1 ms
        // granularity, so at 1,000 req/s requests leave in per-millisecond
        // batches; each is still timed from its own due time.)
        tokio::time::sleep_until(due).await;
        let route = spec.mix.pick(n);
        let path = spec.mix.routes()[route].path.clone();
        let (pool, shared, target) = (pool.clone(), shared.clone(), spec.target.clone());
        shared.started.fetch_add(1, Ordering::Relaxed);
        // One task per request, so a slow answer holds up nothing but
        // itself; the task ends at the deadline at the latest.
        tasks.spawn(async move {
            let outcome = match tokio::time::timeout_at(
                deadline,
                pool.request(&target, &path, &shared),
            )
            .await
            {
                Ok(Ok((status, written))) => {
                    let now = Instant::now();
                    Outcome::Answered {
                        status: status.as_u16(),
                        latency: now - due,
                        service: now - written,
                    }
                }
                Ok(Err(failure)) => Outcome::Failed {
                    label: failure.label(),
                },
                Err(_) => Outcome::Unfinished {
                    waited: deadline.saturating_duration_since(due),
                },
            };
            shared.record(route, outcome);
        });
        // Reap finished tasks so the set stays as small as what is in flight.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

async fn closed_loop(spec: &Spec, shared: &Arc<Shared>, concurrency: usize, deadline: Instant) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (shared, next, mix, target) = (
            shared.clone(),
            next.clone(),
            spec.mix.clone(),
            spec.target.clone(),
        );
        // One task per connection: it sends its next request only when the
        // last one is answered. That is what makes the loop closed.
        tasks.spawn(async move {
            let mut conn: Option<Conn> = None;
            loop {
                let sent = Instant::now();
                if sent >= deadline {
                    break;
                }
                let route = mix.pick(next.fetch_add(1, Ordering::Relaxed));
                let path = &mix.routes()[route].path;
                shared.started.fetch_add(1, Ordering::Relaxed);
                let result = tokio::time::timeout_at(
                    deadline,
                    closed_request(&mut conn, &target, path, &shared),
                )
                .await;
                let outcome = match result {
                    Ok(Ok((status, written))) => {
                        let now = Instant::now();
                        Outcome::Answered {
                            status: status.as_u16(),
                            latency: now - sent,
                            service: now - written,
                        }
                    }
                    Ok(Err(failure)) => {
                        conn = None;
                        shared.record(
                            route,
                            Outcome::Failed {
                                label: failure.label(),
                            },
                        );
                        // Against a server that refuses connections, do not
                        // spin: try again in 10 ms.
                        tokio::time::sleep_until(deadline.min(Instant::now() + RETRY_PAUSE)).await;
                        continue;
                    }
                    Err(_) => Outcome::Unfinished {
                        waited: deadline.saturating_duration_since(sent),
                    },
                };
                shared.record(route, outcome);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// How long a closed-loop connection waits after a failure before retrying.
const RETRY_PAUSE: Duration = Duration::from_millis(10);

async fn closed_request(
    conn: &mut Option<Conn>,
    target: &Target,
    path: &str,
    shared: &Shared,
) -> Result<(hyper::StatusCode, Instant), Failure> {
    if conn.as_ref().is_none_or(Conn::is_closed) {
        shared.connections.fetch_add(1, Ordering::Relaxed);
        *conn = Some(Conn::open(target).await?);
    }
    let written = Instant::now();
    let conn = conn.as_mut().expect("opened above");
    let status = conn.get(target, path).await?;
    Ok((status, written))
}

/// Once a second on stderr: one line, rewritten in place on a terminal.
async fn progress_line(shared: Arc<Shared>, start: Instant, mode: Mode) {
    let terminal = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    let mut last = 0;
    loop {
        tick.tick().await;
        let started = shared.started.load(Ordering::Relaxed);
        let finished = shared.finished.load(Ordering::Relaxed);
        let failed = shared.failed.load(Ordering::Relaxed);
        let line = format!(
            "{:>5.1} s  {started} sent  {finished} done ({}/s)  {} in flight  {failed} without answer  {} connection(s){}",
            start.elapsed().as_secs_f64(),
            finished - last,
            started.saturating_sub(finished),
            shared.connections.load(Ordering::Relaxed),
            match mode {
                Mode::Open { rate } => format!("  target {rate}/s"),
                Mode::Closed { .. } => String::new(),
            }
        );
        last = finished;
        let mut err = std::io::stderr().lock();
        let _ = if terminal {
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
}

/// This process's (user, system) CPU seconds so far.
pub(crate) fn process_cpu() -> Option<(f64, f64)> {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).ok()?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Some((secs(usage.user_time()), secs(usage.system_time())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on its own thread and current_thread runtime whose 10th
    /// request blocks it for 500 ms.
    fn stalling_server() -> std::net::SocketAddr {
        use std::sync::atomic::AtomicUsize;
        static SEEN: AtomicUsize = AtomicUsize::new(0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let app = axum::Router::new().route(
                    "/x",
                    axum::routing::get(|| async {
                        if SEEN.fetch_add(1, Ordering::Relaxed) == 10 {
                            // Holds the only worker: nothing else is read.
                            std::thread::sleep(Duration::from_millis(500));
                        }
                        "ok"
                    }),
                );
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn latency_counts_from_when_a_request_was_due_not_when_it_was_sent() {
        let addr = stalling_server();
        // One connection, as wrk has: during the stall the requests that
        // fall due cannot be written, and wait in the generator.
        let spec = Spec {
            url: format!("http://{addr}/x"),
            target: Target {
                addr,
                authority: addr.to_string(),
            },
            mix: Mix::single("/x").unwrap(),
            mode: Mode::Open { rate: 100.0 },
            duration: Duration::from_millis(1500),
            max_connections: 1,
        };
        let report = run(&spec, false).await;
        let all = &report.overall;
        assert_eq!(all.requests, 150, "{all:?}");
        assert_eq!(all.ok + all.unfinished, 150, "{all:?}");
        // Sent-to-answered, only the one stalled request is slow: that is
        // what a generator without the correction would report.
        assert!(all.service_ms.max >= 450.0, "{all:?}");
        assert!(all.service_ms.p90 < 50.0, "{all:?}");
        // From when they were due, the ~50 requests that fell due during
        // the stall waited too: a third of them by more than 300 ms.
        assert!(all.latency_ms.p90 >= 150.0, "{all:?}");
        assert!(all.latency_ms.p90 >= 5.0 * all.service_ms.p90, "{all:?}");
    }
}
