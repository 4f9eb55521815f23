//! The tracing subscriber, built once: filtered by `RUST_LOG` (default `info`),
//! written to standard error, never carrying passwords or tokens (no handler
//! records them as fields).

use std::io::IsTerminal as _;

use tracing_subscriber::{EnvFilter, fmt};

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A second call (tests) keeps the first subscriber.
    let _ = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(true)
        .try_init();
}
