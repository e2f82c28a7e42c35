//! What to watch for, in plain Rust: no file format imposed.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::culprit::Culprit;

/// How a [`crate::Watch`] detects and keeps stalls.
///
/// ```
/// use std::time::Duration;
/// let config = stall_watch::Config::default()
///     .threshold(Duration::from_millis(50))
///     .history(64);
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) threshold: Duration,
    pub(crate) history: usize,
    pub(crate) wake_idle_worker: bool,
    pub(crate) max_workers: usize,
    pub(crate) trace_url: Option<String>,
    pub(crate) stacks: bool,
    pub(crate) link_stall_span: Option<StallSpanLink>,
}

/// The hook [`Config::link_stall_span`] takes.
type LinkFn = dyn Fn(&tracing::Span, &Culprit) + Send + Sync;

/// What [`Config::link_stall_span`] set.
#[derive(Clone)]
pub(crate) struct StallSpanLink(pub(crate) Arc<LinkFn>);

impl fmt::Debug for StallSpanLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StallSpanLink(..)")
    }
}

impl Config {
    /// A poll longer than this is a stall.
    pub const DEFAULT_THRESHOLD: Duration = Duration::from_millis(20);
    /// Finished stalls kept in memory.
    pub const DEFAULT_HISTORY: usize = 256;
    /// Workers the watcher can tell apart.
    pub const DEFAULT_MAX_WORKERS: usize = 256;

    /// A poll that holds a worker longer than `threshold` is a stall.
    ///
    /// By default, this is [`Config::DEFAULT_THRESHOLD`] (20 ms): long
    /// enough that scheduling noise does not count, short enough that a
    /// person notices it in a latency chart.
    pub fn threshold(mut self, threshold: Duration) -> Config {
        self.threshold = threshold;
        self
    }

    /// How many finished stalls are kept for [`crate::Watch::stalls`] and
    /// `/debug/stalls` (older ones are dropped).
    ///
    /// By default, this is [`Config::DEFAULT_HISTORY`].
    pub fn history(mut self, history: usize) -> Config {
        self.history = history.max(1);
        self
    }

    /// When a stall begins, spawn an empty task from the watcher thread
    /// (multi_thread runtimes only).
    ///
    /// With one worker held, the other workers may all be asleep while no
    /// one polls the I/O driver (tokio-rs/tokio#4730), so new connections
    /// wait for the whole stall although a worker is free. A task arriving
    /// from outside the runtime wakes one, which then takes the driver over.
    /// The task is named `stall watcher: wake an idle worker`.
    ///
    /// By default, this is off: the runtime behaves as it would unwatched.
    pub fn wake_idle_worker(mut self, wake: bool) -> Config {
        self.wake_idle_worker = wake;
        self
    }

    /// Worker threads the watcher has room for; workers past it are not
    /// watched.
    ///
    /// By default, this is [`Config::DEFAULT_MAX_WORKERS`].
    pub fn max_workers(mut self, max_workers: usize) -> Config {
        self.max_workers = max_workers.max(1);
        self
    }

    /// Base URL of a trace viewer; a stall whose culprit has a trace id gets
    /// the link `{url}/trace/{trace_id}` (Jaeger's form).
    ///
    /// By default, there is none.
    pub fn trace_url(mut self, url: impl Into<String>) -> Config {
        self.trace_url = Some(url.into().trim_end_matches('/').to_owned());
        self
    }

    /// Capture the held worker's stack while a stall is in progress (Linux
    /// x86_64 and aarch64; elsewhere this setting does nothing and stalls
    /// report `"stacks": "unsupported"`).
    ///
    /// By default, this is on where supported.
    pub fn stacks(mut self, stacks: bool) -> Config {
        self.stacks = stacks;
        self
    }

    /// Called on the watcher thread with each `executor.stall` span as it
    /// opens and the stalled task's culprit: the place to link the span to
    /// the culprit's request when that request's span is not a `tracing`
    /// span (one made with the OpenTelemetry SDK, whose ids the culprit
    /// carries in [`Culprit::trace_id`] and [`Culprit::span_id`]), e.g. with
    /// tracing-opentelemetry's `OpenTelemetrySpanExt::add_link`. A culprit
    /// made [`with_span`](Culprit::with_span) is linked without it
    /// (`follows_from`). Not called for a stall without a culprit, nor when
    /// no subscriber takes the span.
    ///
    /// By default, there is none.
    pub fn link_stall_span(
        mut self,
        link: impl Fn(&tracing::Span, &Culprit) + Send + Sync + 'static,
    ) -> Config {
        self.link_stall_span = Some(StallSpanLink(Arc::new(link)));
        self
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            threshold: Config::DEFAULT_THRESHOLD,
            history: Config::DEFAULT_HISTORY,
            wake_idle_worker: false,
            max_workers: Config::DEFAULT_MAX_WORKERS,
            trace_url: None,
            stacks: true,
            link_stall_span: None,
        }
    }
}
