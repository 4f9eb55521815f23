//! Integration tests: one binary; each module exercises one service through a
//! real tonic client against the real server on a random port, on SQLite and
//! (with `TEST_POSTGRES_URL`) on PostgreSQL, a fresh database per test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Tests time a real server with the wall clock (`Instant::now`); the rules
// under test take their time from the server's clock (`app.state.clock`).
#![allow(clippy::disallowed_methods)]

#[macro_use]
mod helpers;
mod auth;
mod cli;
mod crash;
mod errors;
mod event_bus;
mod faults;
mod fuzz;
mod grpc_web;
mod hardening;
mod keys;
mod logs;
mod message;
mod message_log;
mod metrics;
mod outage;
mod platform;
mod rest;
mod revocations;
mod session;
mod user_admin;
mod verifier;
