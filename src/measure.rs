//! Measuring what happened to a future: how often it was polled, how long the
//! polls took, how long it waited between being woken and being polled, and
//! which threads polled it.
//!
//! [`Measured`] wraps a future. Every `poll` is timed, and the waker handed to
//! the inner future is wrapped so the moment of every wake-up is stamped.
//! From those two clocks come the figures every scenario answers with:
//!
//! - `busy`: the sum of the poll durations, i.e. how long the future *held a
//!   thread*. A handler that calls `std::thread::sleep(200ms)` is busy for
//!   200 ms; one that awaits `tokio::time::sleep(200ms)` is busy for a few
//!   microseconds, although both take 200 ms of wall time.
//! - `longest_poll`: the longest stretch without yielding. This is what hurts
//!   other tasks: nothing else runs on that worker meanwhile.
//! - `sched_delay`: wake-to-poll time summed over polls, plus spawn-to-first-
//!   poll. A task that is ready but not polled is waiting for a worker, usually
//!   because someone else holds it.
//!
//! The figures are measured, never the requested `ms` echoed back.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use serde::Serialize;
use stall_watch::Place;

/// Shared, thread-safe poll statistics of one measured future.
///
/// Cloning is cheap (an `Arc`); the handler holds one clone to read a
/// [`Snapshot`] while the wrapper holds another to record.
#[derive(Clone, Debug)]
pub(crate) struct PollStats {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    created: Instant,
    /// Nanoseconds since `created` of the first wake since the last poll,
    /// or `NOT_WOKEN`. Written from whichever thread wakes us (a timer, the
    /// blocking pool, another worker), hence an atomic and not the mutex.
    woken_at: AtomicU64,
    state: Mutex<State>,
    /// Set once, before the first poll: see [`Snapshot::queued_ms`].
    queued: std::sync::OnceLock<Duration>,
}

const NOT_WOKEN: u64 = u64::MAX;

#[derive(Debug, Default)]
struct State {
    polls: u64,
    busy: Duration,
    longest: Duration,
    sched_delay: Duration,
    /// Start of the poll in progress, if any: a handler reading its own
    /// statistics does so from inside its last poll.
    in_poll_since: Option<Instant>,
    /// Bit N set: worker N polled the future (workers past 63 share bit 63).
    /// A bitmask, not a set of names: this is updated on every poll.
    workers: u64,
    /// Polled outside any worker (a blocking-pool thread).
    off_worker: bool,
}

impl State {
    fn places(&self) -> Vec<Place> {
        let mut places: Vec<Place> = (0..64)
            .filter(|bit| self.workers & (1 << bit) != 0)
            .map(Place::Worker)
            .collect();
        if self.off_worker {
            places.push(Place::BlockingPool);
        }
        places
    }
}

/// A point-in-time copy of [`PollStats`], in milliseconds, as the scenarios
/// answer it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Snapshot {
    pub wall_ms: f64,
    pub polls: u64,
    pub busy_ms: f64,
    pub longest_poll_ms: f64,
    pub sched_delay_ms: f64,
    /// How long the request's bytes waited in the socket before its handler
    /// started: the kernel's receive timestamp to the request task's birth
    /// (see [`crate::arrival`]). Absent where the kernel gives no timestamp.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued_ms: Option<f64>,
    /// `"worker N"` for each application worker that polled the future, or
    /// `"blocking pool"`.
    pub workers: Vec<Place>,
}

impl Default for PollStats {
    fn default() -> Self {
        Self::new()
    }
}

impl PollStats {
    /// Starts the clocks. Being created counts as being woken: the time until
    /// the first poll is scheduling delay too.
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(Shared {
                created: Instant::now(),
                woken_at: AtomicU64::new(0),
                state: Mutex::new(State::default()),
                queued: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The statistics so far. Called from inside the measured future, the
    /// poll in progress counts as a poll whose busy time runs until now.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let state = self.inner.state.lock().expect("poll stats lock");
        let mut busy = state.busy;
        let mut longest = state.longest;
        if let Some(since) = state.in_poll_since {
            let current = now - since;
            busy += current;
            longest = longest.max(current);
        }
        Snapshot {
            wall_ms: ms(now - self.inner.created),
            polls: state.polls,
            busy_ms: ms(busy),
            longest_poll_ms: ms(longest),
            sched_delay_ms: ms(state.sched_delay),
            queued_ms: self.inner.queued.get().copied().map(ms),
            workers: state.places(),
        }
    }

    /// When the clocks started: the request task's creation.
    pub(crate) fn created(&self) -> Instant {
        self.inner.created
    }

    /// Records how long the request waited to be read (once; later calls
    /// are ignored).
    pub(crate) fn set_queued(&self, queued: Duration) {
        let _ = self.inner.queued.set(queued);
    }

    /// Wraps `future` so that its polls are recorded here.
    pub(crate) fn measure<F: Future>(&self, future: F) -> Measured<F> {
        Measured {
            inner: Box::pin(future),
            stats: self.clone(),
            waker_cache: None,
            long_poll: None,
        }
    }

    fn since_created(&self, at: Instant) -> u64 {
        u64::try_from((at - self.inner.created).as_nanos()).unwrap_or(NOT_WOKEN - 1)
    }
}

/// Converts a duration to fractional milliseconds, rounded to microseconds so
/// the JSON stays readable.
pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// A future whose polls are recorded in a [`PollStats`].
///
/// The inner future is boxed so `Measured` is `Unpin` without any `unsafe`
/// pin projection; one allocation per request is noise next to the syscalls
/// a request costs.
pub(crate) struct Measured<F> {
    inner: Pin<Box<F>>,
    stats: PollStats,
    /// The last waker we were given and our wrapper around it. Tasks are
    /// usually polled with the same waker, so the wrapper is built once, not
    /// on every poll.
    waker_cache: Option<(Waker, Waker)>,
    /// Polls at least this long emit an event ("GET /block/sleep held
    /// worker 1 for 203 ms without yielding") on the current span: the
    /// request's server span.
    long_poll: Option<(Duration, std::sync::Arc<str>)>,
}

impl<F> Measured<F> {
    /// Emits an event for every poll of at least `threshold`, naming the
    /// future `label` (e.g. `GET /block/sleep`).
    pub(crate) fn report_polls_over(
        mut self,
        threshold: Duration,
        label: std::sync::Arc<str>,
    ) -> Self {
        self.long_poll = Some((threshold, label));
        self
    }
}

impl<F: Future> Future for Measured<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let start = Instant::now();
        {
            let woken = this.stats.inner.woken_at.swap(NOT_WOKEN, Ordering::AcqRel);
            let mut state = this.stats.inner.state.lock().expect("poll stats lock");
            if woken != NOT_WOKEN {
                let woken_at = this.stats.inner.created + Duration::from_nanos(woken);
                state.sched_delay += start.saturating_duration_since(woken_at);
            }
            state.polls += 1;
            state.in_poll_since = Some(start);
            match tokio::runtime::worker_index() {
                Some(index) => state.workers |= 1 << index.min(63),
                None => state.off_worker = true,
            }
        }

        let waker = match &this.waker_cache {
            Some((original, wrapped)) if original.will_wake(cx.waker()) => wrapped.clone(),
            _ => {
                let wrapped = Waker::from(Arc::new(StampingWaker {
                    inner: cx.waker().clone(),
                    stats: this.stats.clone(),
                }));
                this.waker_cache = Some((cx.waker().clone(), wrapped.clone()));
                wrapped
            }
        };
        let result = this.inner.as_mut().poll(&mut Context::from_waker(&waker));

        let took = start.elapsed();
        {
            let mut state = this.stats.inner.state.lock().expect("poll stats lock");
            state.busy += took;
            state.longest = state.longest.max(took);
            state.in_poll_since = None;
        }
        if let Some((threshold, label)) = &this.long_poll
            && took >= *threshold
        {
            let place = Place::current();
            // An event on the request's span, for Jaeger ("held worker 0
            // for 300 ms without yielding"); not logged: the stall watcher
            // logs the same stall.
            crate::telemetry::add_event(
                format!(
                    "held {place} for {:.0} ms without yielding",
                    took.as_secs_f64() * 1000.0
                ),
                vec![
                    opentelemetry::KeyValue::new("poll_ms", ms(took)),
                    opentelemetry::KeyValue::new("task", label.to_string()),
                ],
            );
        }
        result
    }
}

/// Stamps the first wake-up after each poll, then forwards to the real waker.
struct StampingWaker {
    inner: Waker,
    stats: PollStats,
}

impl StampingWaker {
    fn stamp(&self) {
        let now = self.stats.since_created(Instant::now());
        // Only the *first* wake since the last poll counts: the task has been
        // ready since then, however many more wake-ups pile up.
        let _ = self.stats.inner.woken_at.compare_exchange(
            NOT_WOKEN,
            now,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

impl Wake for StampingWaker {
    fn wake(self: Arc<Self>) {
        self.stamp();
        self.inner.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.stamp();
        self.inner.wake_by_ref();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real time, not `start_paused`: the statistics use `std::time::Instant`,
    // which tokio's paused clock does not move.
    #[tokio::test(flavor = "current_thread")]
    async fn a_timer_wait_is_polled_twice_and_barely_busy() {
        let stats = PollStats::new();
        stats
            .measure(tokio::time::sleep(Duration::from_millis(50)))
            .await;
        let s = stats.snapshot();
        assert_eq!(s.polls, 2, "{s:?}");
        assert!(s.wall_ms >= 50.0, "{s:?}");
        assert!(s.busy_ms < 20.0, "{s:?}");
        assert_eq!(s.workers, vec![Place::Worker(0)]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_blocking_future_is_one_long_poll() {
        let stats = PollStats::new();
        stats
            .measure(async { std::thread::sleep(Duration::from_millis(50)) })
            .await;
        let s = stats.snapshot();
        assert_eq!(s.polls, 1, "{s:?}");
        assert!(s.busy_ms >= 45.0, "{s:?}");
        assert!(s.longest_poll_ms >= 45.0, "{s:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_poll_in_progress_counts_in_a_snapshot() {
        let stats = PollStats::new();
        let inner = stats.clone();
        let s = stats
            .measure(async move {
                std::thread::sleep(Duration::from_millis(30));
                inner.snapshot()
            })
            .await;
        assert_eq!(s.polls, 1);
        assert!(s.busy_ms >= 25.0, "{s:?}");
    }
}
