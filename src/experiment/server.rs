//! The experiment's servers: stall-lab in this process, one configuration at
//! a time.
//!
//! The only place the experiment touches the server's internals; everything
//! else reaches it over HTTP, like any client. Each server gets its own
//! runtime on its own thread (built by [`crate::runtime::build`], stall
//! watcher on, exactly as `stall-lab serve` builds it), so the experiment's
//! load generator, on *its* runtime, keeps its schedule while the server's
//! workers are blocked.
//!
//! Telemetry is not initialized: the subscriber is process-global and there
//! are several servers in a row. No OTLP, no tokio-console, no log lines;
//! with no subscriber, request spans are disabled and cost nothing, which
//! is what `--no-otlp --no-console` measures too.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::state::AppState;

/// A server running on its own thread, until [`RunningServer::stop`].
pub(crate) struct RunningServer {
    /// `http://127.0.0.1:PORT` of the application server.
    pub app_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts stall-lab with `config` (its `server.listen` should be port 0).
pub(crate) fn spawn_server(config: Config) -> anyhow::Result<RunningServer> {
    let watch = config
        .stall
        .watch
        .then(|| stall_watch::Watch::new(crate::server::watch_config(&config)));
    let runtime = crate::runtime::build(&config.runtime, watch.as_ref()).context("runtime")?;
    if let Some(watch) = &watch {
        watch.attach(runtime.handle());
    }
    let (listener, addr) = crate::net::bind(config.server.listen, "server.listen")?;
    let app_url = format!("http://{addr}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = Arc::new(config);
    let url = app_url.clone();
    let thread = std::thread::Builder::new()
        .name("experiment-server".into())
        .spawn(move || {
            // block_on on this thread: for current_thread, this thread *is*
            // the one worker.
            let _ = runtime.block_on(async {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let state = AppState::new(
                    &config,
                    url,
                    watch,
                    None,
                    crate::scenarios::ALL.iter().map(|s| s.route),
                );
                crate::server::run(
                    listener,
                    state,
                    async {
                        let _ = stopped.await;
                    },
                    Duration::from_millis(500),
                )
                .await
            });
            // A blocking job still running must not hold the experiment up.
            runtime.shutdown_timeout(Duration::from_secs(1));
        })?;
    Ok(RunningServer {
        app_url,
        stop: Some(stop),
        thread: Some(thread),
    })
}

impl RunningServer {
    /// Stops the server and waits for its thread.
    pub(crate) fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}
