//! The integration tests: one binary, one module per area. Each test starts
//! the real `stall-lab` binary on 127.0.0.1:0 (see `helpers::spawn_app`).
//! Set `TEST_LOG=1` to see the servers' logs.

// Helpers are `pub` for the sibling modules; the crate is a test binary.
#![allow(unreachable_pub)]

mod clients;
mod compose;
mod config;
mod experiment;
mod faults;
mod helpers;
mod input;
mod lessons;
mod load;
mod otlp_support;
mod scenarios;
mod shutdown;
mod stacks;
mod stalls;
mod telemetry;
