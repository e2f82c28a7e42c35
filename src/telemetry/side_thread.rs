//! A side thread with its own runtime: telemetry's plumbing (the gRPC
//! exporter, the console server) keeps running when every app worker is
//! blocked, and never shows up in its own output.

use std::future::Future;

use tracing::subscriber::NoSubscriber;

use super::TelemetryError;

/// A current-thread runtime driven by an OS thread of its own until the
/// value is dropped. Tasks spawned through [`handle`](Self::handle) from any
/// thread run on that OS thread.
///
/// Nothing on the thread is traced: its tasks are plumbing, and tracing them
/// would put them in every layer (and in tokio-console).
pub(super) struct SideRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SideRuntime {
    /// Starts thread `name` and runs `main` on it until `main` ends or the
    /// value is dropped. An `Err` from `main` is logged, outside the thread's
    /// silence. Returns once the runtime is up.
    pub(super) fn start<F>(name: &'static str, main: F) -> Result<Self, TelemetryError>
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let result = {
                    let _quiet = tracing::subscriber::set_default(NoSubscriber::default());
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(rt.handle().clone()));
                    rt.block_on(async {
                        tokio::select! {
                            r = main => r,
                            _ = stop_rx => Ok(()),
                        }
                    })
                };
                if let Err(e) = result {
                    tracing::error!("{e}");
                }
            })
            .map_err(|source| TelemetryError::Io {
                what: format!("spawning the {name} thread"),
                source,
            })?;
        let handle = ready_rx
            .recv()
            .map_err(|_| TelemetryError::Io {
                what: format!("{name} thread died during start-up"),
                source: std::io::Error::other("thread exited"),
            })?
            .map_err(|source| TelemetryError::Io {
                what: format!("building the {name} runtime"),
                source,
            })?;
        Ok(Self {
            handle,
            stop: Some(stop_tx),
        })
    }

    /// The runtime, to spawn onto or to enter.
    pub(super) fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
