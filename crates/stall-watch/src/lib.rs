//! stall-watch: live stall detection for tokio runtimes (work in progress).
mod stack;
