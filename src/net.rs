//! Binding a listener before the runtime that serves it exists.

use std::net::{SocketAddr, TcpListener};

use anyhow::Context;

/// Binds `addr` and returns the listener, non-blocking as
/// `tokio::net::TcpListener::from_std` requires, with the address it got
/// (port 0 resolved). Binding first makes a busy port an error here rather
/// than on the thread that serves it.
///
/// The accept queue is as long as the system allows (`SOMAXCONN`), not
/// std's 128.
///
/// An error reads "cannot listen on ADDR (KEY): …", `key` naming the setting
/// that chose the address.
pub(crate) fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let context = || format!("cannot listen on {addr} ({key})");
    let listener = TcpListener::bind(addr).with_context(context)?;
    // std listens with a backlog of 128: a burst of new connections past it
    // (500 slow clients at once) overflows the accept queue, and a dropped
    // SYN costs its client a 1 s retransmit. Listening again only raises it
    // (capped by net.core.somaxconn), as tokio's own `bind` does.
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::MAXCONN)
        .with_context(context)?;
    listener.set_nonblocking(true).with_context(context)?;
    let local = listener.local_addr().with_context(context)?;
    Ok((listener, local))
}
