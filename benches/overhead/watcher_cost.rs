//! What the stall watcher adds to one request, measured in process.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::time::Instant;

use crate::in_process::{StallLab, app_runtime, register_and_unregister};

/// What the stall watcher adds to one request, measured without the noise of
/// a loaded 2-core machine: the poll hooks' cost per poll (a current_thread
/// runtime polling a yielding task millions of times, with and without the
/// hooks, best of several runs), times the polls a `/healthz` request takes
/// (counted by tokio's metrics on an in-process stall-lab server), plus
/// registering and unregistering the request task as a culprit.
pub(crate) struct WatcherCost {
    pub(crate) hooks_ns_per_poll: f64,
    pub(crate) polls_per_request: f64,
    pub(crate) registry_ns_per_request: f64,
}

impl WatcherCost {
    pub(crate) fn ns_per_request(&self) -> f64 {
        self.hooks_ns_per_poll * self.polls_per_request + self.registry_ns_per_request
    }
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

pub(crate) fn measure_watcher_cost() -> WatcherCost {
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
    let (runtime, monitor) = app_runtime(true);
    let monitor = monitor.expect("watcher on");
    let registry_ns = runtime.block_on(async {
        let id = tokio::spawn(async {}).id();
        let n = 200_000u32;
        let mut best = f64::MAX;
        for _ in 0..RUNS {
            best = best.min(register_and_unregister(&monitor, id, n));
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
    let server = StallLab::start(&runtime, monitor);
    let addr = server.addr;
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
    server.stop(&runtime);
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
