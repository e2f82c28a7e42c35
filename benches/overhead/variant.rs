//! The variants measured, and results kept per variant.

use std::ops::{Index, IndexMut};

/// One server setup the bench measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    Bare,
    Off,
    Otlp,
    Console,
    All,
    AllNoWatcher,
    OffNoWatcher,
    Naive,
    BareTask,
}

impl Variant {
    pub(crate) const EVERY: [Self; 9] = [
        Self::Bare,
        Self::Off,
        Self::Otlp,
        Self::Console,
        Self::All,
        Self::AllNoWatcher,
        Self::OffNoWatcher,
        Self::Naive,
        Self::BareTask,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Bare => "bare axum",
            Self::Off => "stall-lab, telemetry off",
            Self::Otlp => "stall-lab, OTLP only",
            Self::Console => "stall-lab, console only",
            Self::All => "stall-lab, everything on",
            Self::AllNoWatcher => "stall-lab, everything on, stall watcher off",
            Self::OffNoWatcher => "stall-lab, telemetry off, stall watcher off",
            Self::Naive => "naive axum: TraceLayer + OTLP + console",
            Self::BareTask => "bare axum + a task per request",
        }
    }

    /// The name `OVERHEAD_VARIANTS` uses.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Self::Bare => "bare",
            Self::Off => "off",
            Self::Otlp => "otlp",
            Self::Console => "console",
            Self::All => "all",
            Self::AllNoWatcher => "all-no-watcher",
            Self::OffNoWatcher => "off-no-watcher",
            Self::Naive => "naive",
            Self::BareTask => "bare-task",
        }
    }

    pub(crate) fn exports_otlp(self) -> bool {
        matches!(
            self,
            Self::Otlp | Self::All | Self::AllNoWatcher | Self::Naive
        )
    }
}

/// One `T` per [`Variant`], indexed by variant.
pub(crate) struct ByVariant<T>([T; Variant::EVERY.len()]);

// `variant as usize` is the variant's place in `EVERY`.
const _: () = {
    let mut i = 0;
    while i < Variant::EVERY.len() {
        assert!(
            Variant::EVERY[i] as usize == i,
            "EVERY is in declaration order"
        );
        i += 1;
    }
};

impl<T: Default> Default for ByVariant<T> {
    fn default() -> Self {
        Self(std::array::from_fn(|_| T::default()))
    }
}

impl<T> ByVariant<T> {
    /// Every variant with its value, in [`Variant::EVERY`] order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Variant, &T)> {
        Variant::EVERY.into_iter().zip(&self.0)
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }
}

impl<T> Index<Variant> for ByVariant<T> {
    type Output = T;
    fn index(&self, variant: Variant) -> &T {
        &self.0[variant as usize]
    }
}

impl<T> IndexMut<Variant> for ByVariant<T> {
    fn index_mut(&mut self, variant: Variant) -> &mut T {
        &mut self.0[variant as usize]
    }
}
