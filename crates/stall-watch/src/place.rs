//! Where code runs: on an application worker, or off the workers.

use std::fmt;

/// Where a piece of code ran, as answers and logs name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Place {
    /// Worker thread `N` of the watched runtime (`tokio::runtime::worker_index`).
    Worker(usize),
    /// Anywhere else: a `spawn_blocking` thread, or a thread outside the
    /// runtime.
    BlockingPool,
}

impl Place {
    /// Where the calling code runs now.
    pub fn current() -> Place {
        match tokio::runtime::worker_index() {
            Some(index) => Place::Worker(index),
            None => Place::BlockingPool,
        }
    }

    /// The worker index, if this is a worker.
    pub fn worker(self) -> Option<usize> {
        match self {
            Place::Worker(index) => Some(index),
            Place::BlockingPool => None,
        }
    }
}

impl fmt::Display for Place {
    /// `worker N` or `blocking pool`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Worker(index) => write!(f, "worker {index}"),
            Place::BlockingPool => f.write_str("blocking pool"),
        }
    }
}

impl serde::Serialize for Place {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}
