//! What every handler can reach: the limits, the stall budget, and the
//! facts about the runtime it runs on.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::sync::Semaphore;

use crate::config::{Config, Flavor, LimitsConfig};

#[derive(Clone)]
pub struct AppState {
    pub limits: LimitsConfig,
    /// The stall budget: one semaphore shared by every stalling route, so it
    /// bounds them *together*. (A `ConcurrencyLimitLayer` on each route would
    /// not: every clone of that layer gets its own semaphore.)
    pub stall_budget: Arc<Semaphore>,
    pub flavor: Flavor,
    pub workers: usize,
    /// Base URL of this very server, for `/downstream` to call itself.
    pub self_url: String,
    /// HTTP client for `/downstream`; one per server so connections are reused.
    pub http: reqwest::Client,
    /// Requests currently being handled, for the shutdown log.
    pub in_flight: Arc<AtomicUsize>,
}

impl AppState {
    pub fn new(config: &Config, self_url: String) -> Self {
        AppState {
            limits: config.limits.clone(),
            stall_budget: Arc::new(Semaphore::new(config.limits.max_stalling_in_flight)),
            flavor: config.runtime.flavor,
            workers: config.runtime.effective_workers(),
            self_url,
            http: reqwest::Client::builder()
                // Only loopback is ever called; never route it via a proxy
                // picked up from the environment.
                .no_proxy()
                .build()
                .expect("a plain HTTP client builds"),
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }
}
