//! When a request *arrived*: the kernel's receive timestamp of its bytes.
//!
//! A request's own task can only measure what happens once it exists. But
//! when every worker is blocked, a new request is not even read: its bytes
//! wait in the socket until some worker is free to run the connection task,
//! and the request task that is finally spawned sees no delay at all. The
//! victim of a total stall would look perfectly healthy.
//!
//! The kernel knows better. With `SO_TIMESTAMPNS` set on the listening socket
//! (accepted sockets inherit it), every `recvmsg` on a connection returns the
//! time its newest bytes reached the socket. [`ArrivalListener`] accepts
//! connections whose reads go through `recvmsg` and keep that timestamp; the
//! request middleware turns it into `queued_ms`: from the request's bytes
//! arriving to its handler starting, time no thread could spare for it.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, sockopt};
use nix::sys::time::TimeSpec;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A TCP listener whose connections remember when their latest bytes
/// arrived.
pub(crate) struct ArrivalListener {
    inner: TcpListener,
}

impl ArrivalListener {
    /// Wraps `inner`, turning on receive timestamps. Where the kernel refuses
    /// them, connections still work; they just never report an arrival.
    pub(crate) fn new(inner: TcpListener) -> ArrivalListener {
        if let Err(e) = socket::setsockopt(&inner, sockopt::ReceiveTimestampns, &true) {
            tracing::warn!("no kernel receive timestamps ({e}): queued_ms will be absent");
        }
        ArrivalListener { inner }
    }
}

/// What the middleware learns about a request's connection: the kernel
/// timestamp (Unix ns) of the newest bytes read from it.
#[derive(Clone, Debug)]
pub(crate) struct Arrival {
    last_rx_unix_ns: Arc<AtomicU64>,
}

impl Arrival {
    /// How long ago the newest bytes of this connection reached the socket,
    /// if the kernel said.
    pub(crate) fn age(&self) -> Option<Duration> {
        let at = self.last_rx_unix_ns.load(Ordering::Acquire);
        if at == 0 {
            return None;
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
        Some(now.saturating_sub(Duration::from_nanos(at)))
    }
}

impl axum::serve::Listener for ArrivalListener {
    type Io = ArrivalStream;
    type Addr = Arrival;

    async fn accept(&mut self) -> (ArrivalStream, Arrival) {
        loop {
            match self.inner.accept().await {
                Ok((stream, _peer)) => {
                    let last_rx = Arc::new(AtomicU64::new(0));
                    let arrival = Arrival {
                        last_rx_unix_ns: last_rx.clone(),
                    };
                    return (
                        ArrivalStream {
                            inner: stream,
                            last_rx,
                        },
                        arrival,
                    );
                }
                // Like axum's own listener: out of file descriptors or a
                // connection reset before accept; back off briefly, go on.
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Arrival> {
        // The listener's own address is not a connection: no bytes yet.
        let _ = self.inner.local_addr()?;
        Ok(Arrival {
            last_rx_unix_ns: Arc::default(),
        })
    }
}

/// A TCP stream that reads with `recvmsg` to keep the kernel's timestamp of
/// the newest bytes it read.
pub(crate) struct ArrivalStream {
    inner: TcpStream,
    last_rx: Arc<AtomicU64>,
}

/// The most one read takes: what is zeroed before each `recvmsg`.
const READ_CHUNK: usize = 4096;

/// Room for one `SCM_TIMESTAMPNS` control message.
const CMSG_SPACE: usize = socket::cmsg_space::<TimeSpec>();

impl AsyncRead for ArrivalStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let fd = this.inner.as_raw_fd();
            // Safe code can only read into initialized bytes, and hyper
            // hands over its buffer's spare room uninitialized on every
            // read: zeroing all of it (8 KiB or more) cost more than the
            // head it receives. A request head fits in READ_CHUNK; a larger
            // one takes more reads.
            let chunk = buf.remaining().min(READ_CHUNK);
            let unfilled = buf.initialize_unfilled_to(chunk);
            let wanted = unfilled.len();
            let mut cmsg = [0u8; CMSG_SPACE];
            let mut short_read = None;
            let read = this.inner.try_io(Interest::READABLE, || {
                let mut iov = [io::IoSliceMut::new(&mut *unfilled)];
                let msg = socket::recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
                    .map_err(io::Error::from)?;
                let mut stamp = None;
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmTimestampns(ts) = c {
                            stamp = Some(ts);
                        }
                    }
                }
                if msg.bytes > 0 && msg.bytes < wanted {
                    // A short read drained the socket, so the next read
                    // would only find EAGAIN: one wasted syscall per
                    // request. tokio's own TcpStream clears readiness here;
                    // `try_io` only does so on WouldBlock, so say that and
                    // keep the bytes aside. (Readiness that arrived after
                    // our read is not lost: tokio only clears the readiness
                    // event this read started from.)
                    short_read = Some((msg.bytes, stamp));
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok((msg.bytes, stamp))
            });
            let read = match (read, short_read) {
                (_, Some(got)) => Ok(got),
                (read, None) => read,
            };
            match read {
                Ok((n, stamp)) => {
                    if let Some(ts) = stamp {
                        let ns = u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
                            + u64::try_from(ts.tv_nsec()).unwrap_or(0);
                        this.last_rx.store(ns, Ordering::Release);
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale: `try_io` cleared it; wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for ArrivalStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A short read clears readiness (to save the EAGAIN read); bytes that
    /// arrive afterwards must still wake the reader.
    #[tokio::test]
    async fn bytes_arriving_after_a_short_read_are_still_read() {
        let mut listener =
            ArrivalListener::new(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
        let addr = listener.inner.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(b"GET /").await.expect("write");
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.write_all(b"healthz").await.expect("write");
            c
        });
        let (mut stream, arrival) = listener.accept().await;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while got.len() < 12 {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("the second write must wake the reader")
                .expect("read");
            assert!(n > 0, "unexpected EOF after {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"GET /healthz");
        assert!(arrival.age().is_some(), "the kernel stamped the bytes");
        drop(client.await);
    }
}
