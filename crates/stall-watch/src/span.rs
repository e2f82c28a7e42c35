//! The `executor.stall` span: one per stall, through `tracing`, so whatever
//! subscriber the service has (an OpenTelemetry layer, a log) receives it.
//!
//! The watcher opens the span when it sees the stall cross the threshold and
//! closes it when the poll ends, so a trace viewer shows it live-ish and
//! about `threshold` shorter than the stall; `duration_ms` is exact. The span
//! follows from the culprit's request span, which OpenTelemetry layers
//! export as a span link. `code.*` attributes name the top frame in the
//! user's own code when a stack was captured (OpenTelemetry semantic
//! conventions).

use tracing::field::Empty;

use crate::config::StallSpanLink;
use crate::culprit::Culprit;
use crate::monitor::StallRecord;

/// The target of the span and of the watcher's log events.
pub(crate) const TARGET: &str = "stall_watch";

/// Opens the span of a stall on `worker` by `culprit` (task `task`), linked
/// to the culprit's span by `follows_from` and by `link`, if given.
pub(crate) fn open(
    worker: usize,
    task: u64,
    culprit: Option<&Culprit>,
    link: Option<&StallSpanLink>,
) -> tracing::Span {
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "executor.stall",
        otel.kind = "internal",
        worker,
        task.id = task,
        duration_ms = Empty,
        on_cpu_ms = Empty,
        cpu = Empty,
        culprit.route = culprit.map(|c| &*c.route),
        culprit.task = culprit.map(|c| &*c.task),
        culprit.trace_id = culprit.and_then(|c| c.trace_id.as_deref()),
        code.function.name = Empty,
        code.file.path = Empty,
        code.line.number = Empty,
        code.stacktrace = Empty,
    );
    if let Some(follows) = culprit.and_then(|c| c.span.clone()) {
        span.follows_from(follows);
    }
    if let (Some(link), Some(culprit)) = (link, culprit)
        && !span.is_disabled()
    {
        (link.0)(&span, culprit);
    }
    span
}

/// Records how the stall ended on its span; dropping the span closes it.
pub(crate) fn close(span: &tracing::Span, record: &StallRecord) {
    span.record("duration_ms", record.duration_ms);
    span.record("cpu", record.cpu);
    if let Some(on_cpu) = record.on_cpu_ms {
        span.record("on_cpu_ms", on_cpu);
    }
    // The top frame in the service's own code: where to look.
    if let Some(top) = record.stack.iter().find(|f| f.user_code) {
        span.record("code.function.name", top.function.as_str());
        if let Some(file) = &top.file {
            span.record("code.file.path", file.as_str());
        }
        if let Some(line) = top.line {
            span.record("code.line.number", line);
        }
    }
    if !record.stack.is_empty() {
        span.record(
            "code.stacktrace",
            crate::stack::render(&record.stack).as_str(),
        );
    }
}
