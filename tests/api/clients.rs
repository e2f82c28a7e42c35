//! Careless and hostile clients: oversized heads, bodies nobody reads, slow
//! clients, too many connections, idle keep-alive connections at shutdown,
//! and listeners that stay on loopback unless configured otherwise.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, fresh_client, run_to_end, spawn_app};

/// `host:port` of a listener URL (`http://127.0.0.1:PORT`).
fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

/// Sends `head` whole on a new connection, then reads the answer's status.
async fn status_of_whole_head(addr: &str, head: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    read_status(&mut stream, Duration::from_secs(5)).await
}

/// The status code of the first response on `stream`, or `None` if the
/// connection closed (or reset) before one came.
async fn read_status(stream: &mut TcpStream, timeout: Duration) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        return;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(timeout, read).await;
    let head = String::from_utf8_lossy(&buf);
    head.split(' ').nth(1)?.parse().ok()
}

/// Writes `head` then up to `extra` bytes of `filler`, stopping at the first
/// failed write (the server closed). Returns the bytes written.
async fn write_until_refused(
    stream: &mut TcpStream,
    head: &[u8],
    filler: u8,
    extra: usize,
) -> usize {
    let mut written = 0;
    if stream.write_all(head).await.is_err() {
        return 0;
    }
    written += head.len();
    let chunk = vec![filler; 64 * 1024];
    while written < head.len() + extra {
        match tokio::time::timeout(Duration::from_secs(5), stream.write_all(&chunk)).await {
            Ok(Ok(())) => written += chunk.len(),
            // Refused (reset, broken pipe), or the server stopped reading
            // and the socket buffers are full.
            _ => break,
        }
    }
    written
}

#[tokio::test]
async fn oversized_request_lines_and_headers_are_refused_without_being_read_whole() {
    let app = spawn_app(&[], &[]);
    let addr = addr_of(&app.listeners["app"]);
    // Offered: 64 MB of request line, then 64 MB of one header. The server
    // must answer 414/431 and close after about `server.max_header_bytes`
    // (16 KB): what the client manages to write is then bounded by the
    // socket buffers (a few MB on loopback), far below 64 MB.
    const OFFERED: usize = 64 * 1024 * 1024;
    for (what, head, filler) in [
        ("request line", &b"GET /healthz?pad="[..], b'a'),
        (
            "header",
            &b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: "[..],
            b'b',
        ),
    ] {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let written = write_until_refused(&mut stream, head, filler, OFFERED).await;
        let status = read_status(&mut stream, Duration::from_secs(5)).await;
        assert!(
            written < OFFERED / 2,
            "{what}: the server read {written} bytes of an endless head"
        );
        // The answer may be lost to a reset if the client was still
        // writing when the server closed; when it arrives, it is 431/414.
        if let Some(status) = status {
            assert!(matches!(status, 414 | 431), "{what}: answered {status}");
        }
    }
    // A head under the limit but larger than one read takes (4 KiB): 200.
    let pad = "d".repeat(10 * 1024);
    let head = format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: {pad}\r\n\r\n");
    assert_eq!(status_of_whole_head(&addr, &head).await, Some(200));
    // A head just over the limit, sent whole before reading: 431.
    let pad = "c".repeat(20 * 1024);
    let head = format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: {pad}\r\n\r\n");
    assert_eq!(status_of_whole_head(&addr, &head).await, Some(431));
    // 200 headers (hyper's limit is 100): 431.
    let many: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let head = format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{many}\r\n");
    assert_eq!(status_of_whole_head(&addr, &head).await, Some(431));
    // And the server is fine.
    assert_eq!(app.get("/healthz").await.status(), 200);
    app.assert_no_panic_so_far();
}

#[tokio::test]
async fn request_bodies_are_not_buffered() {
    let app = spawn_app(&[], &[]);
    let addr = addr_of(&app.listeners["app"]);
    // Announces a 1 GB body and sends 64 KB of it: the answer comes at once,
    // without the server waiting for (or keeping) the rest.
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let head = b"GET /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000000\r\n\r\n";
    stream.write_all(head).await.unwrap();
    stream.write_all(&vec![b'z'; 64 * 1024]).await.unwrap();
    let start = Instant::now();
    assert_eq!(
        read_status(&mut stream, Duration::from_secs(5)).await,
        Some(200)
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // A POST with a body to a GET route: 405, same.
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let head = b"POST /block/sleep?ms=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000000\r\n\r\n";
    stream.write_all(head).await.unwrap();
    assert_eq!(
        read_status(&mut stream, Duration::from_secs(5)).await,
        Some(405)
    );
    app.assert_no_panic_so_far();
}

/// Opens `n` connections to `addr` that each send one byte of a request
/// head per second, for `secs` seconds. Returns how many the server had
/// closed by the end (a write or read saw the close).
async fn slow_clients(addr: String, n: usize, secs: u64) -> usize {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        streams.push(TcpStream::connect(&addr).await.expect("connect"));
    }
    let head = b"GET /healthz HTTP/1.1\r\nhost: slow\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = vec![false; n];
    for second in 0..secs as usize {
        for (i, stream) in streams.iter_mut().enumerate() {
            if closed[i] {
                continue;
            }
            let byte = head[second % head.len()];
            if stream.write_all(&[byte]).await.is_err() {
                closed[i] = true;
                continue;
            }
            // A closed connection shows as EOF (or a reset) on read.
            let mut probe = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => closed[i] = true,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    closed.iter().filter(|c| **c).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_do_not_stop_healthz_or_the_admin_server() {
    let _exclusive = crate::helpers::exclusive().await;
    const SLOW: usize = 500;
    const HEADER_TIMEOUT_MS: u64 = 2000;
    const SECONDS: u64 = 6;
    let app = spawn_app(
        &[],
        &[(
            "STALL_LAB__SERVER__HEADER_READ_TIMEOUT_MS",
            &HEADER_TIMEOUT_MS.to_string(),
        )],
    );
    let slow = tokio::spawn(slow_clients(addr_of(&app.listeners["app"]), SLOW, SECONDS));
    // Probes on fresh connections while the slow clients dribble.
    let client = fresh_client();
    let mut worst = Duration::ZERO;
    let mut probes = 0;
    let until = Instant::now() + Duration::from_secs(SECONDS - 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    while Instant::now() < until {
        for url in [app.url("/healthz"), app.admin_url("/healthz")] {
            let start = Instant::now();
            let response = tokio::time::timeout(Duration::from_secs(5), client.get(&url).send())
                .await
                .unwrap_or_else(|_| panic!("{url} did not answer within 5 s"))
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(response.status(), 200, "{url}");
            worst = worst.max(start.elapsed());
            probes += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed = slow.await.unwrap();
    eprintln!(
        "slow clients: {SLOW} connections, {closed} closed by the server's \
         {HEADER_TIMEOUT_MS} ms header timeout within {SECONDS} s; {probes} probes, slowest {worst:?}"
    );
    assert!(worst < Duration::from_secs(1), "slowest probe {worst:?}");
    assert!(
        closed >= SLOW * 9 / 10,
        "only {closed} of {SLOW} slow connections were closed by the header read timeout"
    );
    app.assert_no_panic_so_far();
}

#[tokio::test]
async fn past_the_connection_cap_new_connections_wait_for_a_free_one() {
    let app = spawn_app(&[], &[("STALL_LAB__SERVER__MAX_CONNECTIONS", "4")]);
    let addr = addr_of(&app.listeners["app"]);
    // Four silent connections take every slot.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let url = app.url("/healthz");
    let waiting = tokio::spawn(async move {
        let start = Instant::now();
        let status = fresh_client().get(url).send().await.map(|r| r.status());
        (status, start.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a fifth connection was served at the cap"
    );
    held.pop();
    let (status, took) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert_eq!(status.unwrap(), 200);
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(
        app.logs().contains("server.max_connections"),
        "{}",
        app.logs()
    );
    app.assert_no_panic_so_far();
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connections_do_not_hold_shutdown() {
    // A long header timeout, so it is shutdown that closes them.
    let mut app = spawn_app(
        &[],
        &[("STALL_LAB__SERVER__HEADER_READ_TIMEOUT_MS", "60000")],
    );
    // Ten connections, each served once and kept alive, idle.
    let mut idle = Vec::new();
    for _ in 0..10 {
        let mut stream = TcpStream::connect(addr_of(&app.listeners["app"]))
            .await
            .unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_status(&mut stream, Duration::from_secs(5)).await,
            Some(200)
        );
        idle.push(stream);
    }
    let start = Instant::now();
    let status = tokio::task::block_in_place(|| app.terminate(Duration::from_secs(15)));
    let took = start.elapsed();
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    // The grace is 5 s; idle connections must not use it.
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    let logs = app.logs_at_exit();
    assert!(logs.contains("all connections closed"), "{logs}");
}

#[test]
fn the_connection_limits_are_checked_at_startup() {
    for (key, bad) in [
        ("STALL_LAB__SERVER__MAX_HEADER_BYTES", "100"),
        ("STALL_LAB__SERVER__MAX_CONNECTIONS", "0"),
        ("STALL_LAB__SERVER__HEADER_READ_TIMEOUT_MS", "0"),
    ] {
        let output = run_to_end(&["serve"], &[(key, bad)]);
        assert_eq!(output.status.code(), Some(2), "{key}={bad}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(key), "{key}={bad}: {stderr}");
    }
}

#[test]
fn every_listener_binds_loopback_by_default() {
    // The built-in defaults, with nothing overriding the addresses.
    let output = run_to_end(
        &["serve", "--print-config"],
        &[
            ("STALL_LAB__TELEMETRY__CONSOLE_LISTEN", "127.0.0.1:6669"),
            ("STALL_LAB__ADMIN__LISTEN", "127.0.0.1:3001"),
        ],
    );
    assert!(output.status.success());
    let effective: toml::Table = String::from_utf8(output.stdout).unwrap().parse().unwrap();
    let defaults: toml::Table = include_str!("../../config/default.toml").parse().unwrap();
    for (section, key) in [
        ("server", "listen"),
        ("admin", "listen"),
        ("telemetry", "console_listen"),
    ] {
        for table in [&effective, &defaults] {
            let addr: std::net::SocketAddr = table[section][key].as_str().unwrap().parse().unwrap();
            assert!(addr.ip().is_loopback(), "{section}.{key} = {addr}");
        }
    }
}

#[tokio::test]
async fn every_listening_line_is_loopback() {
    // The harness gives every listener port 0 on 127.0.0.1 (the default
    // ports may be taken; the default hosts are checked above): each line
    // names the address actually bound, console included.
    let app = spawn_app(&[], &[]);
    let names: Vec<_> = app.listeners.keys().cloned().collect();
    for name in ["app", "admin", "console"] {
        assert!(
            app.listeners.contains_key(name),
            "no `listening: {name}` line: {names:?}"
        );
    }
    for (name, url) in &app.listeners {
        let addr: std::net::SocketAddr = addr_of(url).parse().unwrap();
        assert!(addr.ip().is_loopback(), "listening: {name} {url}");
    }
    app.assert_no_panic_so_far();
}

impl TestApp {
    /// For a server still running: no thread has panicked so far.
    fn assert_no_panic_so_far(&self) {
        let logs = self.logs();
        assert!(!logs.contains("panicked"), "a thread panicked:\n{logs}");
    }
}
