//! Where stack capture is not implemented (not Linux x86_64 or aarch64): the
//! same API, and every call says [`StackError::Unsupported`].

use std::sync::Arc;
use std::time::Duration;

use super::{Frame, RawStack, StackError};

/// Captures nothing; see the module docs.
pub(crate) struct Sampler;

impl Sampler {
    /// Always [`StackError::Unsupported`].
    pub(crate) fn new(
        _workers: usize,
        _stack_bytes: usize,
        _poll_seq: Arc<dyn Fn(usize) -> u64 + Send + Sync>,
    ) -> Result<Sampler, StackError> {
        Err(StackError::Unsupported)
    }

    /// No signal.
    pub(crate) fn signal(&self) -> i32 {
        0
    }

    /// Nothing allocated.
    pub(crate) fn buffer_bytes_per_worker(&self) -> usize {
        0
    }

    /// Does nothing.
    pub(crate) fn register_current_thread(&self, _worker: usize) {}

    #[cfg(test)]
    /// None.
    pub(crate) fn registered_tid(&self, _worker: usize) -> Option<i32> {
        None
    }

    /// Always [`StackError::Unsupported`].
    pub(crate) fn capture(
        &self,
        _worker: usize,
        _expected_seq: u64,
        _timeout: Duration,
    ) -> Result<RawStack, StackError> {
        Err(StackError::Unsupported)
    }

    /// Does nothing: no unit indexed.
    pub(crate) fn prepare(&self) -> usize {
        0
    }

    /// Nothing to index.
    pub(crate) fn index_step(&self) -> bool {
        false
    }

    /// No index.
    pub(crate) fn index_bytes(&self) -> usize {
        0
    }

    /// Nothing cached.
    pub(crate) fn cached_addresses(&self) -> usize {
        0
    }

    /// No frames.
    pub(crate) fn symbolize(&self, _raw: &RawStack) -> Vec<Frame> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Sampler, StackError};

    #[test]
    fn a_sampler_says_unsupported() {
        let sampler = Sampler::new(1, 4096, Arc::new(|_| 0));
        assert_eq!(sampler.err(), Some(StackError::Unsupported));
    }
}
