//! How many tasks tokio-console may record: a token bucket in front of the
//! console layer.
//!
//! console-subscriber keeps two histograms for every task it records (poll
//! times and scheduling delays) and keeps a *finished* task for the whole
//! retention, so that `tokio-console` can still show it. stall-lab makes a
//! task per request: without a bound, the console's memory grows with
//! requests/s × retention.
//!
//! The budget bounds it. The console records at most `budget` tasks up
//! front, then `budget` more per retention window (the bucket refills at
//! budget ÷ retention tasks per second), so it never holds more than about
//! 2 × budget finished tasks. A task it does not record still runs, is
//! traced, counted in `/debug/runtime` and watched for stalls; it only is not
//! in the console. Firing scenarios by hand never reaches the default budget.
//!
//! The decision is taken once per task, when tokio creates the task's
//! `runtime.spawn` span (at spawn, with `--cfg tokio_unstable`). A refused
//! span must not exist at all: then tokio attaches no tracing id to the task
//! and emits none of its per-poll and per-wake events. A per-layer filter
//! cannot ensure that: tracing-subscriber 0.3 still creates a span that a
//! filter refused *per call* (interest "sometimes"), unless every per-layer
//! filter is set. So the budget is spent by [`ConsoleGate`], a wrapper around
//! the whole subscriber that answers "disabled" for a refused task before any
//! layer is asked; the console layer's own filter is a static
//! `tokio=trace,runtime=trace`. Only the console ever wants these spans (the
//! OpenTelemetry layer drops `runtime.*`, the logs take events only).
//!
//! The resources a task creates (tokio's `runtime.resource` spans: a `Sleep`,
//! a oneshot, a semaphore) and their async operations are retained by the
//! console too. They follow their task: one is recorded only if it is
//! created while the console is recording something: inside a recorded task
//! (by tokio's task id), or outside any task (`block_on`). Inside a refused
//! task the resource gets no span either.

use std::any::TypeId;
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Metadata, Subscriber, span};
use tracing_core::span::Current;
use tracing_subscriber::filter::LevelFilter;

/// The span tokio creates for every task it spawns (also `spawn_blocking`
/// and `block_on`, with another `kind`).
fn is_task_span(meta: &Metadata<'_>) -> bool {
    meta.is_span() && meta.name() == "runtime.spawn"
}

/// The target of tokio's `runtime.spawn` span for `spawn_blocking` work,
/// which includes the worker threads themselves.
const BLOCKING_TASK_TARGET: &str = "tokio::task::blocking";

/// `runtime.resource`, `runtime.resource.async_op` and
/// `runtime.resource.async_op.poll`.
fn is_resource_span(meta: &Metadata<'_>) -> bool {
    meta.is_span() && meta.name().starts_with("runtime.resource")
}

/// The budget and its counters. Shared by `ConsoleGate` (which spends it)
/// and the places that report on it.
#[derive(Debug)]
pub struct ConsoleBudget {
    /// Tasks per retention window; 0 means no limit.
    budget: u64,
    retention: Duration,
    bucket: Mutex<Bucket>,
    /// Until when (ns after `epoch`) the bucket holds no whole token: a task
    /// asking before then is refused without taking the lock. Under load
    /// that is every task, from two or more workers at once.
    empty_until_ns: AtomicU64,
    epoch: Instant,
    recorded: AtomicU64,
    not_recorded: AtomicU64,
    /// Set when the first task is turned away, until someone logs it.
    notice_pending: AtomicBool,
    notice_given: AtomicBool,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

/// What `/debug/runtime` shows under `console`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BudgetSnapshot {
    /// `telemetry.console_task_budget`; 0 = unlimited.
    pub task_budget: u64,
    pub retention_secs: u64,
    /// Tasks the budget lets the console record per second, once the first
    /// `task_budget` are spent.
    pub refill_per_sec: f64,
    pub tasks_recorded: u64,
    pub tasks_not_recorded: u64,
}

impl ConsoleBudget {
    pub fn new(budget: u64, retention: Duration) -> Self {
        let epoch = Instant::now();
        Self {
            budget,
            retention,
            bucket: Mutex::new(Bucket {
                tokens: budget as f64,
                refilled_at: epoch,
            }),
            empty_until_ns: AtomicU64::new(0),
            epoch,
            recorded: AtomicU64::new(0),
            not_recorded: AtomicU64::new(0),
            notice_pending: AtomicBool::new(false),
            notice_given: AtomicBool::new(false),
        }
    }

    fn limited(&self) -> bool {
        self.budget > 0
    }

    fn refill_per_sec(&self) -> f64 {
        if !self.limited() {
            return f64::INFINITY;
        }
        // A retention of 0 keeps nothing, so nothing needs bounding.
        self.budget as f64 / self.retention.as_secs_f64().max(1e-3)
    }

    /// Spends one task of the budget, if there is one left at `now`.
    fn admit_at(&self, now: Instant) -> bool {
        let now_ns =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let admitted = !self.limited()
            || (now_ns >= self.empty_until_ns.load(Ordering::Relaxed) && {
                let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
                let elapsed = now.saturating_duration_since(b.refilled_at).as_secs_f64();
                b.tokens = (b.tokens + elapsed * self.refill_per_sec()).min(self.budget as f64);
                b.refilled_at = now;
                let admitted = b.tokens >= 1.0;
                if admitted {
                    b.tokens -= 1.0;
                }
                if b.tokens < 1.0 {
                    // When the next whole token will be there.
                    let wait = (1.0 - b.tokens) / self.refill_per_sec();
                    let wait_ns = (wait * 1e9).min(u64::MAX as f64) as u64;
                    self.empty_until_ns
                        .store(now_ns.saturating_add(wait_ns), Ordering::Relaxed);
                }
                admitted
            });
        if admitted {
            self.recorded.fetch_add(1, Ordering::Relaxed);
        } else {
            self.not_recorded.fetch_add(1, Ordering::Relaxed);
            if !self.notice_given.load(Ordering::Relaxed) {
                self.notice_pending.store(true, Ordering::Relaxed);
            }
        }
        admitted
    }

    /// The warning to log, the first time the budget turned a task away;
    /// `None` before that and ever after. It cannot be logged from inside the
    /// filter (an event emitted while the subscriber is deciding about a span
    /// would reenter it), so request handling asks here afterwards: an atomic
    /// load per request.
    pub fn take_notice(&self) -> Option<String> {
        if !self.notice_pending.load(Ordering::Relaxed)
            || self.notice_given.swap(true, Ordering::Relaxed)
        {
            return None;
        }
        Some(format!(
            "tokio-console: task budget used up ({} tasks per {} s retention, \
             telemetry.console_task_budget); new tasks are left out of the console \
             until it refills ({:.1} tasks/s). They still run, are traced and watched \
             for stalls; /debug/runtime counts them. Each recorded task holds ~50 KB for \
             the retention. For load runs use --no-console, or shorten TOKIO_CONSOLE_RETENTION",
            self.budget,
            self.retention.as_secs(),
            self.refill_per_sec()
        ))
    }

    pub fn snapshot(&self) -> BudgetSnapshot {
        BudgetSnapshot {
            task_budget: self.budget,
            retention_secs: self.retention.as_secs(),
            refill_per_sec: if self.limited() {
                self.refill_per_sec()
            } else {
                0.0
            },
            tasks_recorded: self.recorded.load(Ordering::Relaxed),
            tasks_not_recorded: self.not_recorded.load(Ordering::Relaxed),
        }
    }
}

thread_local! {
    /// Set on a thread whose tokio tasks are plumbing (the admin server's):
    /// [`ConsoleGate`] gives the tasks spawned and the resources created on
    /// it no span, so they stay out of tokio-console and its budget.
    static PLUMBING_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Keeps the tokio tasks spawned on the calling thread, and the resources
/// created on it, out of tokio-console. For a side runtime's own thread: its
/// tasks would pass for the application's and spend the console's budget.
///
/// (A thread-local flag, not a subscriber of the thread's own: a span made
/// under one subscriber and dropped on a thread whose default is another
/// makes tracing-subscriber close its parent in the wrong registry, which
/// panics, "tried to drop a ref to Id(8), but no such span exists!". That is
/// what the admin thread did at every shutdown while it had one.)
pub fn keep_this_thread_out_of_the_console() {
    PLUMBING_THREAD.set(true);
}

/// Runs `f` with nothing it spawns or creates (tasks, timers, channels)
/// recorded by tokio-console: for plumbing made *inside* a recorded task
/// over and over, such as hyper's per-request header timer in a connection
/// task, which the console would otherwise keep, one resource per request,
/// for the whole retention.
pub fn out_of_the_console<T>(f: impl FnOnce() -> T) -> T {
    /// Puts the flag back as it was, also if `f` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            PLUMBING_THREAD.set(self.0);
        }
    }
    let _restore = Restore(PLUMBING_THREAD.replace(true));
    f()
}

/// The whole subscriber, with the console's budget in front of it.
///
/// - A task span the budget refuses is disabled before any layer is asked,
///   so it is never created (see the module doc for why a per-layer filter
///   cannot do this).
/// - A resource span is enabled only inside a task the console records, or
///   outside any task (`block_on`): inside a refused task it is not created
///   either.
/// - Neither is created on a thread marked with
///   [`keep_this_thread_out_of_the_console`].
///
/// Everything else passes through untouched.
pub(super) struct ConsoleGate<S> {
    inner: S,
    /// The budget, when the console is on.
    budget: Option<Arc<ConsoleBudget>>,
    recorded: Mutex<Recorded>,
}

/// The tasks the console records, by tokio task id (the `task.id` field of
/// their span), and which span is which task's, to forget a task when its
/// span closes. Blocking tasks are left out: tokio runs each worker thread
/// as one, so being "inside" one says nothing.
#[derive(Default)]
struct Recorded {
    tasks: HashSet<u64>,
    by_span: HashMap<span::Id, u64>,
}

impl<S> ConsoleGate<S> {
    pub(super) fn new(inner: S, budget: Option<Arc<ConsoleBudget>>) -> Self {
        Self {
            inner,
            budget,
            recorded: Mutex::new(Recorded::default()),
        }
    }

    fn gates(&self, meta: &Metadata<'_>) -> bool {
        self.budget.is_some() && (is_task_span(meta) || is_resource_span(meta))
    }

    /// Whether recorded tasks are tracked, for the resource rule: only
    /// under a limited budget (without one, every task is recorded).
    fn tracks_tasks(&self) -> bool {
        self.budget.as_ref().is_some_and(|b| b.limited())
    }

    fn recorded(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a resource created here belongs to a task the console records.
    fn in_recorded_task(&self) -> bool {
        match tokio::task::try_id() {
            Some(id) => task_number(id).is_some_and(|n| self.recorded().tasks.contains(&n)),
            // Not in a task: `block_on`, or a thread of its own.
            None => true,
        }
    }
}

/// A tokio task id as the number its `runtime.spawn` span records as
/// `task.id`. `tokio::task::Id` has no public integer accessor; its
/// `Display` is that number.
fn task_number(id: tokio::task::Id) -> Option<u64> {
    use std::fmt::Write;
    /// Parses digits as they are written, without allocating.
    struct Digits(Option<u64>);
    impl Write for Digits {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            for b in s.bytes() {
                self.0 = self.0.and_then(|n| {
                    let digit = char::from(b).to_digit(10)?;
                    n.checked_mul(10)?.checked_add(u64::from(digit))
                });
            }
            Ok(())
        }
    }
    let mut digits = Digits(Some(0));
    write!(digits, "{id}").ok()?;
    digits.0
}

/// Reads the `task.id` field of a `runtime.spawn` span.
struct TaskIdField(Option<u64>);

impl tracing::field::Visit for TaskIdField {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "task.id" {
            self.0 = Some(value);
        }
    }
    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

impl<S: Subscriber> Subscriber for ConsoleGate<S> {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        let interest = self.inner.register_callsite(meta);
        // Decided per span, so they must be asked per call.
        if self.gates(meta) && interest.is_always() {
            Interest::sometimes()
        } else {
            interest
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        // Decided before the layers' filters run: refusing *after* them would
        // leave their per-call verdicts behind for the next callsite.
        if let Some(budget) = &self.budget
            && self.gates(meta)
        {
            let refused = if PLUMBING_THREAD.get() {
                true
            } else if is_task_span(meta) {
                !budget.admit_at(Instant::now())
            } else {
                budget.limited() && !self.in_recorded_task()
            };
            if refused {
                return false;
            }
        }
        self.inner.enabled(meta)
    }

    fn new_span(&self, attrs: &span::Attributes<'_>) -> span::Id {
        let id = self.inner.new_span(attrs);
        let meta = attrs.metadata();
        if self.tracks_tasks() && is_task_span(meta) && meta.target() != BLOCKING_TASK_TARGET {
            let mut task = TaskIdField(None);
            attrs.record(&mut task);
            if let Some(task) = task.0 {
                let mut recorded = self.recorded();
                recorded.tasks.insert(task);
                recorded.by_span.insert(id.clone(), task);
            }
        }
        id
    }

    fn try_close(&self, id: span::Id) -> bool {
        let closed = self.inner.try_close(id.clone());
        if closed && self.tracks_tasks() {
            let mut recorded = self.recorded();
            if let Some(task) = recorded.by_span.remove(&id) {
                recorded.tasks.remove(&task);
            }
        }
        closed
    }

    // The rest passes through.
    fn on_register_dispatch(&self, dispatch: &Dispatch) {
        self.inner.on_register_dispatch(dispatch);
    }
    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.inner.max_level_hint()
    }
    fn record(&self, span: &span::Id, values: &span::Record<'_>) {
        self.inner.record(span, values);
    }
    fn record_follows_from(&self, span: &span::Id, follows: &span::Id) {
        self.inner.record_follows_from(span, follows);
    }
    fn event_enabled(&self, event: &Event<'_>) -> bool {
        self.inner.event_enabled(event)
    }
    fn event(&self, event: &Event<'_>) {
        self.inner.event(event);
    }
    fn enter(&self, span: &span::Id) {
        self.inner.enter(span);
    }
    fn exit(&self, span: &span::Id) {
        self.inner.exit(span);
    }
    fn clone_span(&self, id: &span::Id) -> span::Id {
        self.inner.clone_span(id)
    }
    #[allow(deprecated)]
    fn drop_span(&self, id: span::Id) {
        self.inner.drop_span(id);
    }
    fn current_span(&self) -> Current {
        self.inner.current_span()
    }

    // Downcasts reach the inner subscriber: tracing-opentelemetry finds its
    // layer (for a span's trace id) by downcasting the dispatcher.
    #[allow(unsafe_code)]
    unsafe fn downcast_raw(&self, id: TypeId) -> Option<*const ()> {
        if id == TypeId::of::<Self>() {
            return Some(self as *const Self as *const ());
        }
        // SAFETY: the inner subscriber's own answer, for a type it says it
        // is or contains; it lives exactly as long as `self`.
        unsafe { self.inner.downcast_raw(id) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spends_the_budget_then_refills_at_budget_per_retention() {
        let budget = ConsoleBudget::new(10, Duration::from_secs(100));
        let t0 = budget.bucket.lock().unwrap().refilled_at;
        let admitted = (0..25).filter(|_| budget.admit_at(t0)).count();
        assert_eq!(admitted, 10);
        // 10 tasks per 100 s: one more every 10 s.
        assert!(!budget.admit_at(t0 + Duration::from_secs(9)));
        assert!(budget.admit_at(t0 + Duration::from_secs(11)));
        assert!(!budget.admit_at(t0 + Duration::from_secs(12)));
        // Never more than the budget at once, however long it rested.
        let later = t0 + Duration::from_secs(10_000);
        assert_eq!((0..25).filter(|_| budget.admit_at(later)).count(), 10);
        let s = budget.snapshot();
        assert_eq!((s.tasks_recorded, s.tasks_not_recorded), (21, 32));
        assert!((s.refill_per_sec - 0.1).abs() < 1e-9);
    }

    #[test]
    fn warns_once_and_only_after_a_task_was_turned_away() {
        let budget = ConsoleBudget::new(1, Duration::from_secs(600));
        let now = Instant::now();
        assert!(budget.admit_at(now));
        assert_eq!(budget.take_notice(), None);
        assert!(!budget.admit_at(now));
        let notice = budget
            .take_notice()
            .expect("a notice after the first refusal");
        assert!(notice.contains("telemetry.console_task_budget"), "{notice}");
        assert!(!budget.admit_at(now));
        assert_eq!(budget.take_notice(), None);
    }

    #[test]
    fn zero_means_unlimited() {
        let budget = ConsoleBudget::new(0, Duration::from_secs(600));
        let now = Instant::now();
        assert!((0..10_000).all(|_| budget.admit_at(now)));
        assert_eq!(budget.take_notice(), None);
        assert_eq!(budget.snapshot().tasks_not_recorded, 0);
    }
}
