//! The only module that touches the tracing subscriber stack.
//!
//! For now: human-readable logs on stderr, filtered by `RUST_LOG` (default
//! `info`). The listening lines go to stdout separately (see
//! [`crate::server::announce`]) so scripts can read them without parsing logs.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber. Call once, before building the runtime.
pub fn init_logging(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .try_init();
}

use tracing_subscriber::Layer as _;
