//! stall-lab's library API, in one place: the bench's only calls into it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stall_watch::{Culprit, Watch};

/// stall-lab's app runtime as its config would build it: `current_thread`,
/// with the stall watcher's hooks when `watch`.
pub(crate) fn app_runtime(watch: bool) -> (tokio::runtime::Runtime, Option<Watch>) {
    let config = stall_lab::config::RuntimeConfig {
        flavor: stall_lab::config::Flavor::CurrentThread,
        worker_threads: 1,
        max_blocking_threads: 1,
        offload_nice: 0,
    };
    let w = watch.then(|| {
        Watch::new(
            stall_watch::Config::default()
                .threshold(Duration::from_millis(20))
                .history(16),
        )
    });
    (
        stall_lab::runtime::build(&config, w.as_ref()).expect("runtime builds"),
        w,
    )
}

/// Nanoseconds per culprit registration and removal of task `id`, what
/// stall-lab does per request when the watcher runs; over `n` of them.
pub(crate) fn register_and_unregister(watch: &Watch, id: tokio::task::Id, n: u32) -> f64 {
    let culprit = Arc::new(Culprit::new("GET /healthz"));
    let start = Instant::now();
    for _ in 0..n {
        drop(watch.track(id, culprit.clone()));
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

/// A stall-lab app server with the default configuration, served by
/// `runtime` until [`stop`](Self::stop).
pub(crate) struct StallLab {
    pub(crate) addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl StallLab {
    pub(crate) fn start(runtime: &tokio::runtime::Runtime, watch: Option<Watch>) -> Self {
        let config =
            stall_lab::config::load(None, Vec::new(), &stall_lab::config::Overrides::default())
                .expect("default config")
                .config;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = stall_lab::state::AppState::new(
            &config,
            format!("http://{addr}"),
            watch,
            None,
            stall_lab::scenarios::ALL.iter().map(|s| s.route),
        );
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = runtime.spawn(stall_lab::server::run(
            listener,
            state,
            async {
                let _ = stop_rx.await;
            },
            Duration::from_millis(100),
        ));
        Self { addr, stop, server }
    }

    pub(crate) fn stop(self, runtime: &tokio::runtime::Runtime) {
        let _ = self.stop.send(());
        let _ = runtime.block_on(self.server);
    }
}
