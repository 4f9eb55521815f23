//! ai-message: accounts, sessions and messages as a gRPC service.
//!
//! Layout, outside in:
//! - [`services`]: the gRPC protocol layer, one thin adapter per service;
//! - [`auth`] and [`domain`]: the rules (tokens, passwords, validated values);
//! - [`storage`]: SQL behind repository traits, one implementation per backend.
//!
//! [`startup`] wires them together; [`config`] and [`cli`] are the outside world.

pub mod auth;
pub mod cli;
pub mod config;
pub mod connections;
pub mod domain;
pub mod error;
pub mod events;
pub mod metrics;
pub mod proto;
pub mod services;
pub mod startup;
pub mod storage;
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod testing;
