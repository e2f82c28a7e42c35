//! Who holds a worker: the culprit registry, task id → [`Culprit`].
//!
//! Registered once per task (by [`crate::Watch::track`] or the tower layer),
//! looked up only when a stall is found, so the per-poll hooks never touch
//! it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Who a task is: what a stall names as its culprit.
///
/// Cheap to share: the route and task name are `Arc<str>`, so a service can
/// make one culprit per route at startup and hand out clones of its `Arc`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct Culprit {
    /// What the task serves, e.g. `GET /orders/{id}`: method and route
    /// template, never the concrete path.
    pub route: Arc<str>,
    /// The task's name (tokio-console shows the same name when the task was
    /// spawned with `tokio::task::Builder::name`).
    pub task: Arc<str>,
    /// Hex trace id of the request, when it is traced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Hex span id of the request's span.
    #[serde(skip)]
    pub span_id: Option<String>,
    /// The request's `tracing` span: the `executor.stall` span follows from
    /// it, which OpenTelemetry layers export as a span link.
    #[serde(skip)]
    pub span: Option<tracing::Id>,
}

impl Culprit {
    /// A culprit named `route`, whose task has the same name.
    pub fn new(route: impl Into<Arc<str>>) -> Culprit {
        let route = route.into();
        Culprit {
            task: route.clone(),
            route,
            trace_id: None,
            span_id: None,
            span: None,
        }
    }

    /// Names the task differently from the route.
    pub fn with_task(mut self, task: impl Into<Arc<str>>) -> Culprit {
        self.task = task.into();
        self
    }

    /// The request's trace and span ids (hex), for links into a tracing
    /// backend.
    pub fn with_trace(mut self, trace_id: String, span_id: String) -> Culprit {
        self.trace_id = Some(trace_id);
        self.span_id = Some(span_id);
        self
    }

    /// The request's `tracing` span, which the `executor.stall` span will
    /// follow from.
    pub fn with_span(mut self, span: &tracing::Span) -> Culprit {
        self.span = span.id();
        self
    }
}

/// How long a culprit stays findable after its guard is dropped: a guard
/// may drop inside the very poll that stalled (a request's future finishing
/// in that poll), and the after-poll hook looks the culprit up after it.
pub(crate) const RETIRED_FOR: Duration = Duration::from_secs(1);

/// Task id → culprit, for live tasks and for those retired in the last
/// [`RETIRED_FOR`].
#[derive(Debug, Default)]
pub(crate) struct Culprits {
    inner: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    live: HashMap<u64, Arc<Culprit>>,
    /// Retired culprits, oldest first, with when they retired. A queue, not
    /// a map: every request retires one, and only a long poll or a stall
    /// looks one up, so retiring is a push (no hashing, no rehashing of a
    /// map that holds a second's worth of requests) and the rare lookup
    /// scans from the newest.
    retired: VecDeque<(Instant, u64, Arc<Culprit>)>,
}

impl Culprits {
    pub(crate) fn register(&self, task: u64, culprit: Arc<Culprit>) {
        self.inner
            .lock()
            .expect("culprits lock")
            .live
            .insert(task, culprit);
    }

    /// The task no longer runs on behalf of its culprit; it stays findable
    /// for [`RETIRED_FOR`] (see there).
    pub(crate) fn unregister(&self, task: u64) {
        let now = Instant::now();
        let mut registry = self.inner.lock().expect("culprits lock");
        if let Some(culprit) = registry.live.remove(&task) {
            registry.retired.push_back((now, task, culprit));
        }
    }

    pub(crate) fn get(&self, task: u64) -> Option<Arc<Culprit>> {
        let registry = self.inner.lock().expect("culprits lock");
        registry
            .live
            .get(&task)
            .or_else(|| {
                registry
                    .retired
                    .iter()
                    .rev()
                    .find(|(_, id, _)| *id == task)
                    .map(|(_, _, culprit)| culprit)
            })
            .cloned()
    }

    /// Forgets culprits retired longer than [`RETIRED_FOR`] ago (the
    /// watcher calls it every tick).
    pub(crate) fn purge(&self) {
        // One clock read for the whole purge, not one per entry.
        let now = Instant::now();
        let mut registry = self.inner.lock().expect("culprits lock");
        while let Some((at, _, _)) = registry.retired.front() {
            if now.saturating_duration_since(*at) < RETIRED_FOR {
                break;
            }
            registry.retired.pop_front();
        }
    }
}

/// tokio's task ids are opaque: no accessor gives the number. But `Id`
/// derives `Hash` over its `NonZeroU64`, so a hasher that keeps the one `u64`
/// it is fed recovers it without the allocation of `to_string()`; this runs
/// in the poll hooks, on every poll.
pub fn task_id(id: tokio::task::Id) -> u64 {
    use std::hash::{Hash, Hasher};

    #[derive(Default)]
    struct Capture(u64);
    impl Hasher for Capture {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            // Not reached for `Id` today; a fold keeps it well-defined if
            // tokio ever hashes differently.
            for b in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(*b);
            }
        }
        fn write_u64(&mut self, n: u64) {
            self.0 = n;
        }
    }
    let mut capture = Capture::default();
    id.hash(&mut capture);
    capture.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_culprit_stays_findable_for_a_while() {
        let culprits = Culprits::default();
        culprits.register(7, Arc::new(Culprit::new("GET /x")));
        culprits.unregister(7);
        assert_eq!(
            culprits.get(7).map(|c| c.route.clone()),
            Some("GET /x".into())
        );
        culprits.purge();
        assert!(culprits.get(7).is_some(), "purged too early");
        std::thread::sleep(RETIRED_FOR + Duration::from_millis(20));
        culprits.purge();
        assert!(culprits.get(7).is_none());
    }

    #[tokio::test]
    async fn task_ids_match_tokios_own_numbers() {
        let handle = tokio::spawn(async {});
        let id = handle.id();
        assert_eq!(task_id(id).to_string(), id.to_string());
        handle.await.unwrap();
    }
}
