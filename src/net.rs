//! Binding a listener before the runtime that serves it exists.

use std::net::{SocketAddr, TcpListener};

use anyhow::Context;

/// Binds `addr` and returns the listener, non-blocking as
/// `tokio::net::TcpListener::from_std` requires, with the address it got
/// (port 0 resolved). Binding first makes a busy port an error here rather
/// than on the thread that serves it.
///
/// An error reads "cannot listen on ADDR (KEY): …", `key` naming the setting
/// that chose the address.
pub(crate) fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let context = || format!("cannot listen on {addr} ({key})");
    let listener = TcpListener::bind(addr).with_context(context)?;
    listener.set_nonblocking(true).with_context(context)?;
    let local = listener.local_addr().with_context(context)?;
    Ok((listener, local))
}
