//! One HTTP/1.1 connection of the load generator, and what can go wrong on it.
//!
//! hyper's low-level client (`client::conn::http1`) rather than reqwest or
//! hyper-util's pooled client: the generator must know, and say, how many
//! connections it holds and which request went on which. A pooled client
//! decides that for us (and may queue a request behind a busy connection
//! without telling). Here a [`Conn`] carries one request at a time
//! (HTTP/1.1 without pipelining), and the caller owns it.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Where requests go: the resolved address, and the `Host` header.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub addr: SocketAddr,
    pub authority: String,
}

/// An open keep-alive connection, ready for its next request.
pub(crate) struct Conn {
    sender: SendRequest<Empty<Bytes>>,
}

/// Why a request got no HTTP answer. Counted by [`Failure::label`], apart
/// from answers with an error status (those are answers).
#[derive(Debug)]
pub(crate) enum Failure {
    /// The TCP connection could not be opened.
    Connect(std::io::Error),
    /// The connection broke before the whole answer arrived.
    Http(hyper::Error),
}

impl Failure {
    /// A short, stable label to count failures by: `connect: connection
    /// refused`, `closed before the answer`, …
    pub(crate) fn label(&self) -> String {
        match self {
            Failure::Connect(e) => format!("connect: {}", e.kind()),
            Failure::Http(e) if e.is_incomplete_message() => "closed before the answer".to_owned(),
            Failure::Http(e) if e.is_closed() || e.is_canceled() => "connection closed".to_owned(),
            Failure::Http(e) if e.is_timeout() => "timeout".to_owned(),
            Failure::Http(e) => {
                // hyper's Display is short ("connection error"); the source
                // says which (reset, broken pipe).
                match std::error::Error::source(e) {
                    Some(source) => format!("http: {e}: {source}"),
                    None => format!("http: {e}"),
                }
            }
        }
    }
}

impl Conn {
    /// Opens a connection. The connection's own I/O runs in a task spawned
    /// here, on the generator's runtime, never on the server's.
    pub(crate) async fn open(target: &Target) -> Result<Conn, Failure> {
        let stream = TcpStream::connect(target.addr)
            .await
            .map_err(Failure::Connect)?;
        // Requests are tiny and latency is what we measure: no Nagle delay.
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(Failure::Http)?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the peer closes; its error,
            // if any, is also the error of the request in flight, counted
            // there.
            let _ = connection.await;
        });
        Ok(Conn { sender })
    }

    /// Sends `GET path` and reads the whole body (so the connection can carry
    /// the next request). Returns the status; on `Err` the connection is
    /// unusable and must be dropped.
    pub(crate) async fn get(&mut self, target: &Target, path: &str) -> Result<StatusCode, Failure> {
        self.sender.ready().await.map_err(Failure::Http)?;
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, &target.authority)
            .body(Empty::new())
            .expect("the mix checked the path");
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(Failure::Http)?;
        let status = response.status();
        response
            .into_body()
            .collect()
            .await
            .map_err(Failure::Http)?;
        Ok(status)
    }

    /// Whether the server closed it (e.g. after `Connection: close`).
    pub(crate) fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}
