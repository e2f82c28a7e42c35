//! The load: a closed-loop, keep-alive HTTP/1.1 client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) ok: AtomicU64,
    pub(crate) not_ok: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) stop: AtomicBool,
}

pub(crate) struct Load {
    pub(crate) counters: Arc<Counters>,
    pub(crate) tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub(crate) fn start(
        runtime: &tokio::runtime::Runtime,
        addr: SocketAddr,
        connections: usize,
    ) -> Self {
        let counters = Arc::new(Counters::default());
        let tasks = (0..connections)
            .map(|_| runtime.spawn(connection(addr, Arc::clone(&counters))))
            .collect();
        Self { counters, tasks }
    }

    pub(crate) fn stop(self, runtime: &tokio::runtime::Runtime) {
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
