//! A free worker is not enough: on a multi-thread runtime, one blocked
//! worker can keep a request waiting although another worker is idle.
//!
//! Run with: `cargo run --release --example free_worker`
//!
//! A 2-worker runtime serves a tiny TCP protocol: a connection sends one
//! byte, `B` makes the handler block its worker for 300 ms
//! (`std::thread::sleep`), anything else is answered at once. Each round
//! opens a `B` connection, waits 50 ms, then times an `H` connection. With a
//! worker free, `H` should take well under a millisecond.
//!
//! It often takes the rest of the block instead. A multi-thread runtime has
//! one I/O driver (sockets and timers). An idle worker that finds it free
//! parks on it; the other idle workers sleep on a condition variable. The
//! `B` connection's readiness wakes the worker parked on the driver; it
//! releases the driver, runs the accept loop and then the connection's
//! task, and blocks in the handler. Nothing wakes a sleeping worker to take
//! the driver over (tokio wakes a sibling when a task arrives from outside
//! the runtime or queues up behind another, not when the driving worker is
//! woken by I/O: tokio-rs/tokio#4730), so nobody polls the sockets until the
//! handler returns. Here the accept loop is a spawned task, which makes it
//! happen nearly every time; stall-lab runs axum's accept loop in `block_on`
//! on the main thread, as `#[tokio::main]` does, and sees it less often.
//!
//! The second pass is the counter-experiment that names the cause: a plain
//! thread spawns an empty task every 10 ms. Spawning from outside the
//! runtime wakes a sleeping worker, which finds the driver free and parks
//! on it, and the `H` connection is answered during the block.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUNDS: usize = 20;
const BLOCK: Duration = Duration::from_millis(300);

fn main() -> std::io::Result<()> {
    for nudge in [false, true] {
        let waited = run(nudge)?;
        let slow = waited.iter().filter(|d| **d > BLOCK / 3).count();
        let median = {
            let mut sorted = waited.clone();
            sorted.sort();
            sorted[sorted.len() / 2]
        };
        println!(
            "{:<50} {slow:>2}/{ROUNDS} probes waited for the blocked worker (median {:.1} ms)",
            if nudge {
                "with a thread waking an idle worker every 10 ms:"
            } else {
                "one worker blocked, one idle:"
            },
            median.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}

/// One pass of [`ROUNDS`] rounds on a fresh runtime; the probes' latencies.
fn run(nudge: bool) -> std::io::Result<Vec<Duration>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    runtime.spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                if socket.read_exact(&mut byte).await.is_err() {
                    return;
                }
                if byte[0] == b'B' {
                    // The mistake on purpose: a blocking call on a worker.
                    std::thread::sleep(BLOCK);
                }
                let _ = socket.write_all(b"k").await;
            });
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let nudger = nudge.then(|| {
        let (handle, stop) = (runtime.handle().clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
                handle.spawn(async {});
            }
        })
    });

    let mut waited = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let blocker = std::thread::spawn(move || exchange(addr, b'B'));
        std::thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        exchange(addr, b'H')?;
        waited.push(start.elapsed());
        blocker.join().expect("blocker thread")?;
        // Let both workers go idle again before the next round.
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(nudger) = nudger {
        nudger.join().expect("nudger thread");
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(waited)
}

/// Sends one byte on a new connection and waits for the answer.
fn exchange(addr: SocketAddr, byte: u8) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    stream.write_all(&[byte])?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer)
}
