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
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, SockaddrStorage, sockopt};
use nix::sys::time::TimeSpec;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A TCP listener whose connections remember when their latest bytes
/// arrived.
pub struct ArrivalListener {
    inner: TcpListener,
}

impl ArrivalListener {
    /// Wraps `inner`, turning on receive timestamps. Where the kernel refuses
    /// them, connections still work; they just never report an arrival.
    pub fn new(inner: TcpListener) -> ArrivalListener {
        if let Err(e) = socket::setsockopt(&inner, sockopt::ReceiveTimestampns, &true) {
            tracing::warn!("no kernel receive timestamps ({e}): queued_ms will be absent");
        }
        ArrivalListener { inner }
    }
}

/// What the middleware learns about a request's connection: its peer, and
/// the kernel timestamp (Unix ns) of the newest bytes read from it.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub peer: SocketAddr,
    last_rx_unix_ns: Arc<AtomicU64>,
}

impl Arrival {
    /// How long ago the newest bytes of this connection reached the socket,
    /// if the kernel said.
    pub fn age(&self) -> Option<Duration> {
        let at = self.last_rx_unix_ns.load(Ordering::Acquire);
        if at == 0 {
            return None;
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
        Some(now.saturating_sub(Duration::from_nanos(at)))
    }
}

impl Connected<IncomingStream<'_, ArrivalListener>> for Arrival {
    fn connect_info(stream: IncomingStream<'_, ArrivalListener>) -> Self {
        stream.remote_addr().clone()
    }
}

impl axum::serve::Listener for ArrivalListener {
    type Io = ArrivalStream;
    type Addr = Arrival;

    async fn accept(&mut self) -> (ArrivalStream, Arrival) {
        loop {
            match self.inner.accept().await {
                Ok((stream, peer)) => {
                    let last_rx = Arc::new(AtomicU64::new(0));
                    let arrival = Arrival {
                        peer,
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
        Ok(Arrival {
            peer: self.inner.local_addr()?,
            last_rx_unix_ns: Arc::default(),
        })
    }
}

/// A TCP stream that reads with `recvmsg` to keep the kernel's timestamp of
/// the newest bytes it read.
pub struct ArrivalStream {
    inner: TcpStream,
    last_rx: Arc<AtomicU64>,
}

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
            let unfilled = buf.initialize_unfilled();
            let mut cmsg = [0u8; CMSG_SPACE];
            let read = this.inner.try_io(Interest::READABLE, || {
                let mut iov = [io::IoSliceMut::new(&mut *unfilled)];
                let msg = socket::recvmsg::<SockaddrStorage>(
                    fd,
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::empty(),
                )
                .map_err(io::Error::from)?;
                let mut stamp = None;
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmTimestampns(ts) = c {
                            stamp = Some(ts);
                        }
                    }
                }
                Ok((msg.bytes, stamp))
            });
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
