//! `spawn_app`: runs the real binary as a child process on port 0, so every
//! test gets its own runtime flavor, configuration and process-wide
//! telemetry, and exercises the same `listening: …` contract scripts use.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// Variables from the test's own environment that would redirect the
/// servers' telemetry; removed so a developer's shell cannot change results.
const OTEL_ENV: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
    "OTEL_BSP_SCHEDULE_DELAY",
    "TOKIO_CONSOLE_BIND",
];

pub const BIN: &str = env!("CARGO_BIN_EXE_stall-lab");

/// The server binary the tests start: [`BIN`], the build cargo made for the
/// tests, unless `STALL_LAB_TEST_BIN` names another (the release build, for
/// figures of the product as users run it).
pub fn server_bin() -> std::ffi::OsString {
    std::env::var_os("STALL_LAB_TEST_BIN").unwrap_or_else(|| BIN.into())
}

/// How long a server may take to print its listening lines. Generous: CI
/// machines are shared and may be busy compiling.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct TestApp {
    child: Child,
    /// `http://127.0.0.1:PORT` per listener name (`app`, …).
    pub listeners: HashMap<String, String>,
    pub client: reqwest::Client,
    /// Every line the server printed on stdout so far.
    #[allow(dead_code)]
    pub stdout: Arc<Mutex<Vec<String>>>,
    /// Every log line the server printed on stderr so far.
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// Set once the server's stderr is closed: every line is in `stderr`.
    stderr_closed: Arc<std::sync::atomic::AtomicBool>,
}

impl TestApp {
    /// URL of `path` on the admin server.
    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{path}", self.listeners["admin"])
    }

    /// GET on the admin server, asserting 200, returning the JSON body.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let response = self
            .client
            .get(self.admin_url(path))
            .send()
            .await
            .expect("admin answers");
        assert_eq!(response.status(), 200, "admin GET {path}");
        response.json().await.expect("JSON body")
    }

    /// Waits until the stall watcher shows a `/block/*` request holding its
    /// worker (fired in the background), up to 10 s. Fixed sleeps are too
    /// short on a busy machine.
    pub async fn wait_for_stall(&self) {
        let app = self;
        let seen = wait_until(Duration::from_secs(10), || async move {
            let stalls = app.admin_json("/debug/stalls").await;
            // A `/block/*` request's own stall, 50 ms into it. On a loaded
            // machine the OS can preempt a worker mid-poll for over the
            // threshold, and that is a stall too: of another task, or of the
            // blocking request's first poll before it took its stall permit.
            let blocking = stalls["in_progress"].as_array().unwrap().iter().any(|s| {
                s["elapsed_ms"].as_f64().is_some_and(|ms| ms >= 50.0)
                    && s["culprit"]["route"]
                        .as_str()
                        .is_some_and(|r| r.starts_with("GET /block/"))
            });
            if blocking { Ok(()) } else { Err(stalls) }
        })
        .await;
        if let Err(stalls) = seen {
            panic!("no stall began: {stalls}");
        }
    }

    /// The tokio-console server's address.
    pub fn console_addr(&self) -> std::net::SocketAddr {
        self.listeners["console"]
            .trim_start_matches("http://")
            .parse()
            .expect("listening: console http://ADDR")
    }

    /// GET `path` on a fresh connection in a task of its own: a request
    /// still running while the test looks at something else.
    pub fn get_in_background(
        &self,
        path: &str,
    ) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
        get_in_background(self.url(path))
    }

    /// Base URL of the application server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.listeners["app"])
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request reaches the server")
    }

    /// GET, asserting 200, returning the JSON body.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self.get(path).await;
        let status = response.status();
        let body: serde_json::Value = response.json().await.expect("JSON body");
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// A GET with a fresh connection each time, timed by the client.
    pub async fn timed_get(&self, path: &str) -> (u16, Duration) {
        let client = fresh_client();
        let start = Instant::now();
        let response = client
            .get(self.url(path))
            .send()
            .await
            .expect("request reaches the server");
        let status = response.status().as_u16();
        let _ = response.bytes().await;
        (status, start.elapsed())
    }

    /// The server's stderr so far, one string.
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// After the server exited: all of its stderr (waits up to 2 s for the
    /// last lines to be read), checked for panics in any thread, which do
    /// not change a process's exit status.
    pub fn logs_at_exit(&self) -> String {
        let closed = &self.stderr_closed;
        let _ = wait_until_blocking(Duration::from_secs(2), || {
            closed
                .load(std::sync::atomic::Ordering::Acquire)
                .then_some(())
                .ok_or(())
        });
        let logs = self.logs();
        assert!(!logs.contains("panicked"), "a thread panicked:\n{logs}");
        logs
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status (up to `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        self.wait(timeout)
    }

    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = &mut self.child;
        wait_until_blocking(timeout, || child.try_wait().expect("try_wait").ok_or(())).ok()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serializes the timing-sensitive tests: each of them measures latencies
/// or poll durations in tens of milliseconds, which a CPU-heavy test running
/// alongside on a 2-core machine would distort (the OS preempting a worker
/// mid-poll looks like a stall). Hold the guard for the whole test.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    EXCLUSIVE.lock().await
}

/// Calls `check` every 10 ms until it returns `Ok`, for up to `timeout`;
/// then returns its last `Err`: what it saw, for the failure message.
pub async fn wait_until<T, E, F>(timeout: Duration, mut check: impl FnMut() -> F) -> Result<T, E>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let seen = check().await;
        if seen.is_ok() || Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`wait_until`] for a plain thread.
pub fn wait_until_blocking<T, E>(
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = check();
        if seen.is_ok() || Instant::now() >= deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// GET `url` on a fresh connection in a task of its own.
pub fn get_in_background(
    url: String,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    tokio::spawn(async move { fresh_client().get(url).send().await })
}

/// A client that does not reuse connections, so each request is accepted
/// afresh (the probe tests want that).
pub fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Starts `stall-lab serve --listen 127.0.0.1:0 <args>` with `env` added,
/// and waits for its `listening: app` line.
pub fn spawn_app(args: &[&str], env: &[(&str, &str)]) -> TestApp {
    let mut command = stall_lab(env);
    command
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn stall-lab");
    let stderr_lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = stderr_lines.clone();
    let stderr_closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let closed = stderr_closed.clone();
    let echo = std::env::var_os("TEST_LOG").is_some();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("[stall-lab] {line}");
            }
            sink.lock().unwrap().push(line);
        }
        closed.store(true, std::sync::atomic::Ordering::Release);
    });
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    // Drain stdout for the child's whole life, so it never blocks on (or
    // fails writing to) a full or closed pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });

    let mut listeners = HashMap::new();
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while !(listeners.contains_key("app") && listeners.contains_key("admin")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("listening: ") {
                    let (name, url) = rest.split_once(' ').expect("listening: NAME URL");
                    listeners.insert(name.to_owned(), url.to_owned());
                }
            }
            Err(_) => {
                let status = child.try_wait().ok().flatten();
                panic!("stall-lab did not print its `listening:` lines (exit status: {status:?})");
            }
        }
    }
    TestApp {
        child,
        listeners,
        client: reqwest::Client::builder().no_proxy().build().unwrap(),
        stdout: lines,
        stderr: stderr_lines,
        stderr_closed,
    }
}

/// GET `url` with `client`, returning the JSON body whatever the status.
pub async fn fetch_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    let response = client
        .get(url)
        .send()
        .await
        .expect("request reaches the server");
    response.json().await.expect("JSON body")
}

/// Runs the binary to completion (for `--print-config` and startup errors).
pub fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    stall_lab(env).args(args).output().expect("run stall-lab")
}

/// The binary with `env` on top of the tests' defaults: tests never depend
/// on a collector, on a free port 6669 or 3001, nor on the developer's
/// `OTEL_*`, `TOKIO_CONSOLE_BIND` and `RUST_LOG`.
fn stall_lab(env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(server_bin());
    command
        .stdin(Stdio::null())
        .env("STALL_LAB__TELEMETRY__OTLP", "false")
        .env("STALL_LAB__TELEMETRY__CONSOLE_LISTEN", "127.0.0.1:0")
        .env("STALL_LAB__ADMIN__LISTEN", "127.0.0.1:0")
        .env_remove("RUST_LOG");
    for key in OTEL_ENV {
        command.env_remove(key);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

pub fn as_f64(body: &serde_json::Value, key: &str) -> f64 {
    body[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is a number in {body}"))
}
