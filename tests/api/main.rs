//! Integration tests: one binary; each module exercises one service through a
//! real tonic client against the real server on a random port, on SQLite and
//! (with `TEST_POSTGRES_URL`) on PostgreSQL, a fresh database per test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod helpers;
mod auth;
mod cli;
mod faults;
mod fuzz;
mod hardening;
mod logs;
mod message;
mod outage;
mod platform;
mod session;
mod user_admin;
