//! The subscriber: its layers, each with its own filter, and the console's
//! gate around all of them.

use std::sync::Arc;

use opentelemetry_sdk::trace::Tracer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use super::TelemetryError;
use super::console_budget::{ConsoleBudget, ConsoleGate};

pub(super) type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The subscriber's layers, the switched-off ones left out.
///
/// A `Vec` of boxed layers rather than `Option` layers: an absent `Option`
/// layer answers "always interested" for every callsite, so with it the
/// registry created every span in the process (tokio's per-task
/// `runtime.spawn` spans and every request span) with all telemetry off.
pub(super) fn stack(
    console: Option<BoxedLayer>,
    otel: Option<BoxedLayer>,
    fmt_filter: impl tracing_subscriber::layer::Filter<Registry> + Send + Sync + 'static,
) -> Vec<BoxedLayer> {
    let fmt: BoxedLayer = tracing_subscriber::fmt::layer()
        // Logs on stderr; stdout carries only the `listening:` lines.
        .with_writer(std::io::stderr)
        .with_filter(fmt_filter)
        .boxed();
    console.into_iter().chain(otel).chain([fmt]).collect()
}

/// The OpenTelemetry layer, exporting through `tracer`.
pub(super) fn otel_layer(
    tracer: Tracer,
    filter: impl tracing_subscriber::layer::Filter<Registry> + Send + Sync + 'static,
) -> BoxedLayer {
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Not worth their cost on every span: busy/idle timing (two clock
        // reads and an extension lookup per enter and exit; the request
        // span carries stall-lab's own poll statistics instead) and the
        // thread's name and id (the `workers` attribute says where the
        // request ran).
        .with_tracked_inactivity(false)
        .with_threads(false)
        // Nor is making each span the current OpenTelemetry context on
        // every enter (a context clone and a thread-local push per poll
        // of the request task): nothing here reads
        // `opentelemetry::Context::current()`; parents come from the
        // tracing span tree, and outbound propagation uses
        // `Span::context()`.
        .with_context_activation(false)
        // `target` repeats `code.module.name`; the location (file and
        // line of the span) stays: it points a learner at the code
        // that blocked.
        .with_target(false)
        .with_filter(filter)
        .boxed()
}

/// Installs `layers` as the global subscriber, behind the console's gate.
pub(super) fn install(
    layers: Vec<BoxedLayer>,
    console_budget: Option<Arc<ConsoleBudget>>,
) -> Result<(), TelemetryError> {
    ConsoleGate::new(tracing_subscriber::registry().with(layers), console_budget).try_init()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;
    use std::time::Duration;

    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::filter::{self, FilterExt};

    use crate::telemetry::filters::CONSOLE_DIRECTIVES;
    use crate::telemetry::keep_this_thread_out_of_the_console;
    use crate::telemetry::lean_filter::LeanEnvFilter;

    /// Tests that install a subscriber take turns: a callsite's interest is
    /// combined over every live subscriber, so one test's console gate
    /// ("ask me per call") would change what another test's stack is asked.
    static ONE_SUBSCRIBER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn with_every_exporter_off_no_span_is_created() {
        let _turn = ONE_SUBSCRIBER_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // The fmt layer as init builds it (events only), at its most verbose.
        let fmt_filter = EnvFilter::new("trace").and(filter::filter_fn(|m| m.is_event()));
        let subscriber = tracing_subscriber::registry().with(stack(None, None, fmt_filter));
        tracing::subscriber::with_default(subscriber, || {
            assert!(tracing::info_span!("request").is_disabled());
            assert!(tracing::trace_span!(target: "tokio::task", "runtime.spawn").is_disabled());
            assert!(tracing::event_enabled!(tracing::Level::INFO));
        });
    }

    /// The subscriber as `init` builds it with the console on and OTLP off,
    /// `console` standing in for the console layer.
    fn with_console(
        console: impl Layer<Registry> + Send + Sync + 'static,
        budget: &Arc<ConsoleBudget>,
    ) -> impl tracing::Subscriber + Send + Sync + 'static {
        let console = console
            .with_filter(LeanEnvFilter::new(CONSOLE_DIRECTIVES))
            .boxed();
        let fmt_filter = EnvFilter::new("info").and(filter::filter_fn(|m| m.is_event()));
        let layers = stack(Some(console), None, fmt_filter);
        ConsoleGate::new(
            tracing_subscriber::registry().with(layers),
            Some(Arc::clone(budget)),
        )
    }

    /// A task the console's budget refuses has no span at all, for any
    /// layer: tokio then attaches no id to it and traces none of its polls
    /// and wakes. A resource (here a timer) is recorded only inside a task
    /// the console records. The gate wakes no other callsite up.
    #[test]
    fn a_task_the_console_budget_refuses_has_no_span() {
        use std::sync::Mutex;
        let _turn = ONE_SUBSCRIBER_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        /// Stands in for the console layer: notes each span it is given,
        /// with the task it was created in (or, for a task's own span, that
        /// task).
        type Notes = Arc<Mutex<Vec<(&'static str, Option<String>)>>>;
        struct Seen(Notes);
        impl<S: tracing::Subscriber> Layer<S> for Seen {
            fn on_new_span(
                &self,
                attrs: &tracing::span::Attributes<'_>,
                _: &tracing::span::Id,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                struct TaskId(Option<String>);
                impl tracing::field::Visit for TaskId {
                    fn record_u64(&mut self, f: &tracing::field::Field, v: u64) {
                        if f.name() == "task.id" {
                            self.0 = Some(v.to_string());
                        }
                    }
                    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn fmt::Debug) {}
                }
                let task = if attrs.metadata().name() == "runtime.spawn" {
                    let mut id = TaskId(None);
                    attrs.record(&mut id);
                    id.0
                } else {
                    tokio::task::try_id().map(|id| id.to_string())
                };
                self.0.lock().unwrap().push((attrs.metadata().name(), task));
            }
        }
        let seen = Notes::default();
        // Three tasks: `block_on`'s own, then one spawned task.
        let budget = Arc::new(ConsoleBudget::new(2, Duration::from_secs(600)));
        let subscriber = with_console(Seen(Arc::clone(&seen)), &budget);
        tracing::subscriber::with_default(subscriber, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let (recorded, refused) = rt.block_on(async {
                let task = || {
                    tokio::spawn(async {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        tracing::Span::current().metadata().map(|m| m.name())
                    })
                };
                let (recorded, refused) = (task(), task());
                let ids = (recorded.id().to_string(), refused.id().to_string());
                let current = (recorded.await.unwrap(), refused.await.unwrap());
                assert_eq!(
                    current,
                    (Some("runtime.spawn"), None),
                    "polled inside its own span if recorded; a refused one has none"
                );
                ids
            });
            let s = budget.snapshot();
            assert_eq!((s.tasks_recorded, s.tasks_not_recorded), (2, 1));
            let seen = seen.lock().unwrap().clone();
            let tasks: Vec<_> = seen.iter().filter(|(n, _)| *n == "runtime.spawn").collect();
            assert_eq!(tasks.len(), 2, "block_on and one task: {seen:?}");
            assert!(tasks.iter().any(|(_, t)| t.as_ref() == Some(&recorded)));
            let timers_in = |task: &String| {
                seen.iter()
                    .filter(|(n, t)| *n == "runtime.resource" && t.as_ref() == Some(task))
                    .count()
            };
            assert_eq!(
                timers_in(&recorded),
                1,
                "the recorded task's timer: {seen:?}"
            );
            assert_eq!(
                timers_in(&refused),
                0,
                "no timer of the refused task: {seen:?}"
            );

            assert!(
                !tracing::event_enabled!(target: "hyper::proto::h1::conn", tracing::Level::TRACE),
                "a disabled trace! elsewhere stays disabled"
            );
            assert!(
                tracing::event_enabled!(tracing::Level::INFO),
                "logs still flow"
            );
            assert!(
                tracing::info_span!("request").is_disabled(),
                "no span for a layer that is off"
            );
        });
    }

    /// The admin runtime's tasks and timers stay out of the console and
    /// its budget (and nothing else changes for them).

    #[test]
    fn a_plumbing_threads_tasks_get_no_span() {
        let _turn = ONE_SUBSCRIBER_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let budget = Arc::new(ConsoleBudget::new(0, Duration::from_secs(600)));
        let subscriber = with_console(tracing_subscriber::layer::Identity::new(), &budget);
        tracing::subscriber::with_default(subscriber, || {
            // (libtest runs each test on a thread of its own.)
            keep_this_thread_out_of_the_console();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let current = rt.block_on(async {
                tokio::spawn(async {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    tracing::Span::current().is_none()
                })
                .await
                .unwrap()
            });
            assert!(current, "the task ran without a span of its own");
            assert!(
                tracing::trace_span!(target: "runtime::resource", "runtime.resource").is_disabled()
            );
            let s = budget.snapshot();
            assert_eq!((s.tasks_recorded, s.tasks_not_recorded), (0, 0));
            assert!(
                tracing::event_enabled!(tracing::Level::INFO),
                "logs still flow"
            );
        });
    }
}
