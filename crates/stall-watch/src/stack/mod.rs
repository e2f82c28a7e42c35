//! The held worker's stack (interim: capture lands with the sampler).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// Whether stack capture works on this platform.
pub(crate) const SUPPORTED: bool = false;

/// One frame of a captured stack.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Frame {
    /// The function, demangled, without its hash.
    pub function: String,
    /// Its source file, when line tables have it.
    pub file: Option<String>,
    /// Its line.
    pub line: Option<u32>,
    /// Whether the frame is in the service's own code (not std, not a
    /// dependency from the registry, not libc).
    pub user_code: bool,
}

impl std::fmt::Display for Frame {
    /// `at src/main.rs:12 in my_app::handler`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "at {file}:{line} in {}", self.function),
            (Some(file), None) => write!(f, "at {file} in {}", self.function),
            _ => write!(f, "in {}", self.function),
        }
    }
}

/// The first frame in the user's own code.
pub(crate) fn top_user_frame(stack: &[Frame]) -> Option<&Frame> {
    stack.iter().find(|f| f.user_code)
}

/// A stack as text, one frame a line (for `code.stacktrace`).
pub(crate) fn render(stack: &[Frame]) -> String {
    stack.iter().map(|f| format!("{f}\n")).collect::<String>()
}

/// Why a capture failed.
#[derive(Debug)]
pub(crate) enum StackError {
    Unsupported,
}

/// A capture, before unwinding.
pub(crate) struct RawStack;

/// Captures workers' stacks.
pub(crate) struct Sampler;

impl Sampler {
    pub(crate) fn new(
        _workers: usize,
        _stack_bytes: usize,
        _poll_seq: Arc<dyn Fn(usize) -> u64 + Send + Sync>,
    ) -> Result<Sampler, StackError> {
        Err(StackError::Unsupported)
    }

    pub(crate) fn register_current_thread(&self, _worker: usize) {}

    pub(crate) fn capture(
        &self,
        _worker: usize,
        _expected_seq: u64,
        _timeout: Duration,
    ) -> Result<RawStack, StackError> {
        Err(StackError::Unsupported)
    }

    pub(crate) fn symbolize(&self, _raw: &RawStack) -> Vec<Frame> {
        Vec::new()
    }
}
