//! [`LeanEnvFilter`]: an `EnvFilter` for a layer, minus the per-span work
//! its directives do not need.

use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber, span};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{LevelFilter, ParseError};
use tracing_subscriber::layer::{Context, Filter};

/// An `EnvFilter` as a per-layer filter, without EnvFilter's per-span
/// bookkeeping when its directives cannot need it.
///
/// EnvFilter keeps a table of spans for directives on span names and fields
/// (`target[span{field=value}]=level`), and updates it behind a process-wide
/// `RwLock` on every span's creation, enter, exit, record and close, even
/// when it has no such directive: two workers then take turns on one cache
/// line several times per request. Target-and-level directives are decided
/// per callsite, so only `enabled` and `callsite_enabled` are forwarded;
/// directives with a `[` (span directives) keep the whole EnvFilter.
pub(super) struct LeanEnvFilter {
    inner: EnvFilter,
    span_directives: bool,
}

impl LeanEnvFilter {
    pub(super) fn try_new(directives: &str) -> Result<Self, ParseError> {
        Ok(Self {
            inner: EnvFilter::try_new(directives)?,
            span_directives: directives.contains('['),
        })
    }

    pub(super) fn new(directives: &'static str) -> Self {
        Self::try_new(directives).expect("a valid built-in directive")
    }
}

impl<S: Subscriber> Filter<S> for LeanEnvFilter {
    fn enabled(&self, meta: &Metadata<'_>, cx: &Context<'_, S>) -> bool {
        Filter::<S>::enabled(&self.inner, meta, cx)
    }
    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        Filter::<S>::callsite_enabled(&self.inner, meta)
    }
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Filter::<S>::max_level_hint(&self.inner)
    }
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, cx: Context<'_, S>) {
        if self.span_directives {
            Filter::<S>::on_new_span(&self.inner, attrs, id, cx);
        }
    }
    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, cx: Context<'_, S>) {
        if self.span_directives {
            Filter::<S>::on_record(&self.inner, id, values, cx);
        }
    }
    fn on_enter(&self, id: &span::Id, cx: Context<'_, S>) {
        if self.span_directives {
            Filter::<S>::on_enter(&self.inner, id, cx);
        }
    }
    fn on_exit(&self, id: &span::Id, cx: Context<'_, S>) {
        if self.span_directives {
            Filter::<S>::on_exit(&self.inner, id, cx);
        }
    }
    fn on_close(&self, id: span::Id, cx: Context<'_, S>) {
        if self.span_directives {
            Filter::<S>::on_close(&self.inner, id, cx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_span_directives_keep_the_span_bookkeeping() {
        let lean = |d| LeanEnvFilter::try_new(d).unwrap().span_directives;
        assert!(!lean("info"));
        assert!(!lean("tokio=trace,runtime=trace"));
        assert!(lean("info,[request]=debug"));
        assert!(lean("stall_lab[request{http.route=/healthz}]=trace"));
        assert!(LeanEnvFilter::try_new("info,=bogus=").is_err());
    }
}
