//! The core on a bare tokio runtime (no axum): a stall is seen while it
//! lasts, named after the task's culprit, filed with its CPU class, and
//! reported as an `executor.stall` span that follows from the culprit's
//! span (or is linked to it by `Config::link_stall_span`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stall_watch::{Config, Culprit, Watch};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// Waits up to 5 s for `check` to give a value.
fn wait_for<T>(mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn one_worker(watch: &Watch) -> tokio::runtime::Runtime {
    watch
        .install(&mut tokio::runtime::Builder::new_multi_thread())
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_stall_is_named_while_it_lasts_then_filed_with_its_cpu_class() {
    let watch = Watch::new(Config::default().threshold(Duration::from_millis(20)));
    let runtime = one_worker(&watch);
    let tracker = watch.clone();
    runtime.spawn(async move {
        let _named = tracker.track_current(Arc::new(Culprit::new("job: nightly report")));
        std::thread::sleep(Duration::from_millis(300));
    });
    let live = wait_for(|| watch.stalls(10).in_progress.into_iter().next());
    assert_eq!(live.worker, 0);
    assert_eq!(&*live.culprit.expect("named").route, "job: nightly report");
    assert_eq!(watch.workers()[0].state, "stalled");

    let filed = wait_for(|| watch.stalls(10).recent.into_iter().next());
    assert!(filed.duration_ms >= 290.0, "{filed:?}");
    assert_eq!(filed.cpu, "off-cpu", "{filed:?}");
    assert_eq!(&*filed.culprit.expect("named").route, "job: nightly report");

    // A busy loop is on-CPU (or, on a machine too loaded to give it a
    // core, preempted: never off-CPU).
    runtime.spawn(async {
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(200) {
            std::hint::black_box(0u64);
        }
    });
    let busy = wait_for(|| {
        let stalls = watch.stalls(10);
        (stalls.total >= 2).then(|| stalls.recent[0].clone())
    });
    assert!(matches!(busy.cpu, "on-cpu" | "preempted"), "{busy:?}");
    assert!(busy.culprit.is_none(), "an untracked task has no culprit");
}

#[test]
fn short_polls_are_not_stalls() {
    let watch = Watch::new(Config::default().threshold(Duration::from_millis(50)));
    let runtime = one_worker(&watch);
    runtime.block_on(async {
        for _ in 0..20 {
            tokio::spawn(async { std::thread::sleep(Duration::from_millis(2)) })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(watch.stalls(10).total, 0);
}

/// `block_in_place` hands the worker to a new thread. When the first
/// thread's poll finally ends, its after-poll hook must leave alone the
/// worker's slot, where the new thread is stalling meanwhile.
#[test]
fn a_poll_that_gave_its_worker_away_does_not_end_the_next_stall_on_it() {
    let watch = Watch::new(
        Config::default()
            .threshold(Duration::from_millis(20))
            .stacks(false),
    );
    let runtime = one_worker(&watch);
    runtime.spawn(async {
        tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(150)));
    });
    let tracker = watch.clone();
    runtime.spawn(async move {
        // By now the worker runs on the thread that took it over.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let _named = tracker.track_current(Arc::new(Culprit::new("after the hand-over")));
        std::thread::sleep(Duration::from_millis(400));
    });
    let filed = wait_for(|| {
        watch.stalls(10).recent.into_iter().find(|s| {
            s.culprit
                .as_ref()
                .is_some_and(|c| &*c.route == "after the hand-over")
        })
    });
    assert!(filed.duration_ms >= 390.0, "{filed:?}");
}

/// Spans named `executor.stall`, and what each follows from.
#[derive(Default, Clone)]
struct Recorder {
    stalls: Arc<Mutex<Vec<Id>>>,
    follows: Arc<Mutex<Vec<(Id, Id)>>>,
    closed: Arc<Mutex<Vec<Id>>>,
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() == "executor.stall" {
            self.stalls.lock().unwrap().push(id.clone());
        }
    }
    fn on_follows_from(&self, span: &Id, follows: &Id, _: Context<'_, S>) {
        self.follows
            .lock()
            .unwrap()
            .push((span.clone(), follows.clone()));
    }
    fn on_close(&self, id: Id, _: Context<'_, S>) {
        self.closed.lock().unwrap().push(id);
    }
}

#[test]
fn the_stall_span_follows_from_the_culprits_span_or_is_linked_by_the_hook_and_closes() {
    let recorder = Recorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    // Global: the watcher thread emits the span.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let watch = Watch::new(Config::default().threshold(Duration::from_millis(20)));
    let runtime = one_worker(&watch);
    let request = tracing::info_span!("GET /slow");
    let request_id = request.id().expect("a recorded span");
    let tracker = watch.clone();
    runtime.spawn(async move {
        let _named = tracker.track_current(Arc::new(Culprit::new("GET /slow").with_span(&request)));
        std::thread::sleep(Duration::from_millis(200));
        drop(request);
    });
    let stall = wait_for(|| recorder.stalls.lock().unwrap().first().cloned());
    assert!(
        recorder
            .follows
            .lock()
            .unwrap()
            .contains(&(stall.clone(), request_id)),
        "the stall span should follow from the request's span"
    );
    // Open while the stall lasts, closed once it is filed.
    assert!(watch.stalls(1).in_progress.len() == 1 || watch.stalls(1).total == 1);
    wait_for(|| {
        recorder
            .closed
            .lock()
            .unwrap()
            .contains(&stall)
            .then_some(())
    });
    assert_eq!(watch.stalls(1).total, 1);

    // A culprit whose request span is not a `tracing` span (one made with
    // the OpenTelemetry SDK) is linked through the hook, by its ids.
    let linked = Arc::new(Mutex::new(Vec::new()));
    let sink = linked.clone();
    let watch = Watch::new(
        Config::default()
            .threshold(Duration::from_millis(20))
            .link_stall_span(move |span, culprit| {
                sink.lock().unwrap().push((
                    span.id(),
                    culprit.trace_id.clone(),
                    culprit.span_id.clone(),
                ));
            }),
    );
    let runtime = one_worker(&watch);
    let tracker = watch.clone();
    runtime.spawn(async move {
        let culprit = Culprit::new("GET /sdk").with_trace(
            "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
            "00f067aa0ba902b7".to_owned(),
        );
        let _named = tracker.track_current(Arc::new(culprit));
        std::thread::sleep(Duration::from_millis(100));
    });
    let (span, trace, span_id) = wait_for(|| linked.lock().unwrap().first().cloned());
    let span = span.expect("the stall span, recorded");
    assert!(recorder.stalls.lock().unwrap().contains(&span));
    assert_eq!(trace.as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    assert_eq!(span_id.as_deref(), Some("00f067aa0ba902b7"));
    wait_for(|| (watch.stalls(1).total == 1).then_some(()));
    assert_eq!(linked.lock().unwrap().len(), 1, "once per stall");
}

/// The live stack of the stall on worker 0, once captured.
fn live_stack(watch: &Watch) -> Vec<stall_watch::Frame> {
    wait_for(|| {
        watch
            .stalls(0)
            .in_progress
            .into_iter()
            .find(|s| !s.stack.is_empty())
            .map(|s| s.stack)
    })
}

fn shows(stack: &[stall_watch::Frame], needle: &str) -> bool {
    stack.iter().any(|f| f.function.contains(needle))
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
#[test]
fn a_mutex_wait_is_captured_where_it_waits_and_still_gets_the_lock() {
    let watch = Watch::new(Config::default());
    let runtime = one_worker(&watch);
    let shared = Arc::new(Mutex::new(0u32));
    let holder = shared.lock().unwrap();
    let waiter = {
        let shared = shared.clone();
        runtime.spawn(async move { waits_for_the_lock(&shared) })
    };
    let stack = live_stack(&watch);
    assert!(shows(&stack, "waits_for_the_lock"), "{stack:#?}");
    assert!(
        shows(&stack, "Mutex") || shows(&stack, "futex"),
        "{stack:#?}"
    );
    std::thread::sleep(Duration::from_millis(100));
    let mut holder = holder;
    *holder = 42;
    drop(holder);
    assert_eq!(runtime.block_on(waiter).unwrap(), 42);
}

#[inline(never)]
fn waits_for_the_lock(shared: &Mutex<u32>) -> u32 {
    *shared.lock().unwrap()
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
#[test]
fn a_blocking_socket_read_is_captured_and_still_returns_its_data() {
    use std::io::{Read, Write};
    let watch = Watch::new(Config::default());
    let runtime = one_worker(&watch);
    let (mut writer, reader) = std::os::unix::net::UnixStream::pair().unwrap();
    let read = runtime.spawn(async move { reads_a_socket(reader) });
    let stack = live_stack(&watch);
    assert!(shows(&stack, "reads_a_socket"), "{stack:#?}");
    assert!(shows(&stack, "read"), "{stack:#?}");
    // Captured again and again while it waits: the read is not interrupted.
    std::thread::sleep(Duration::from_millis(1200));
    writer.write_all(b"hello").unwrap();
    assert_eq!(runtime.block_on(read).unwrap(), b"hello");
    let stalls = watch.stalls(1);
    assert!(stalls.stack_capture.expect("stats").captures >= 2);

    #[inline(never)]
    fn reads_a_socket(mut reader: std::os::unix::net::UnixStream) -> Vec<u8> {
        let mut buf = [0u8; 5];
        reader.read_exact(&mut buf).unwrap();
        buf.to_vec()
    }
}

/// The namer thread indexes the binary's debug information in the
/// background as it starts; a stall's stack is then named while the stall
/// lasts, and the costs say how soon after the threshold it was there.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
#[test]
fn the_namer_indexes_in_the_background_and_says_when_a_stack_was_ready() {
    let watch = Watch::new(Config::default().threshold(Duration::from_millis(20)));
    let runtime = one_worker(&watch);
    // About 0.4 s of CPU for this test binary in a debug build; allow for
    // a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stats = loop {
        if let Some(stats) = watch.stalls(0).stack_capture
            && stats.index_bytes > 0
        {
            break stats;
        }
        assert!(Instant::now() < deadline, "the index was not built");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        stats.indexed_units > 0 && stats.prepare_ms > 0.0,
        "{stats:?}"
    );
    assert!(stats.index_ms > 0.0, "{stats:?}");

    runtime.spawn(async { std::thread::sleep(Duration::from_millis(400)) });
    let stack = live_stack(&watch);
    assert!(shows(&stack, "sleep"), "{stack:#?}");
    // Recorded just after the stack is attached.
    let stats = wait_for(|| {
        watch
            .stalls(0)
            .stack_capture
            .filter(|s| s.stack_ready_ms_last > 0.0)
    });
    assert!(stats.captures >= 1, "{stats:?}");
    assert!(stats.stack_ready_ms_last < 400.0, "{stats:?}");
}
