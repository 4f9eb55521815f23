//! The gRPC protocol layer: one thin adapter per service. Every RPC reads the
//! same: caller from the extensions, request parsed into domain values, one
//! storage call, errors mapped by `AppError -> Status`, result converted.

pub mod auth;
mod convert;
pub mod health;
pub mod http;
pub mod message;
pub mod middleware;
pub mod reflection;
pub mod revocations;
pub mod session;
pub mod user_admin;

use std::{net::IpAddr, sync::Arc};

use ipnet::IpNet;
use tokio::sync::watch;
use tonic::Request;

pub use crate::auth::Caller;

use crate::{
    auth::{
        Authenticator, BearerOutcome, PasswordHasher, TokenService, cache::SessionCache,
        throttle::Throttle,
    },
    config::Config,
    domain::Clock,
    error::AppError,
    events::EventHub,
    storage::{Database, UserProfile, batch::MessageWriter},
};

/// Runs `task` at once and then every `period` until `stop` turns true; a
/// run that overruns the period delays the next rather than piling up.
/// The background sweeps and the text indexer share it.
pub async fn every<F, Fut>(
    period: std::time::Duration,
    mut stop: watch::Receiver<bool>,
    mut task: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => task().await,
            _ = stop.changed() => break,
        }
    }
}

/// The RPCs callable without a bearer token (every other one refuses a call
/// without one), as full method names.
const WITHOUT_BEARER: [&str; 6] = [
    "aimessage.v1.AuthService.Register",
    "aimessage.v1.AuthService.Login",
    "aimessage.v1.AuthService.RefreshToken",
    "aimessage.v1.AuthService.ValidateToken",
    "aimessage.v1.AuthService.ValidateTokens",
    "aimessage.v1.AuthService.GetJwks",
];

/// Whether the RPC `full_name` (`aimessage.v1.AuthService.GetMe`) needs a
/// bearer token; the OpenAPI document says so per route.
pub fn needs_bearer(full_name: &str) -> bool {
    !WITHOUT_BEARER.contains(&full_name)
}

/// Everything the handlers share, built once at startup.
pub struct AppState {
    pub db: Arc<dyn Database>,
    pub tokens: Arc<TokenService>,
    pub hasher: Arc<PasswordHasher>,
    pub throttle: Throttle,
    pub events: Arc<EventHub>,
    /// Live sessions recently read, shared with `events` for invalidation.
    pub sessions: Arc<SessionCache>,
    /// Checks the session behind every authenticated call.
    pub auth: Authenticator,
    /// Where every rule's "now" comes from.
    pub clock: Arc<dyn Clock>,
    /// Group commit for SendMessage.
    pub message_writer: MessageWriter,
    pub config: Config,
    /// The bound on unary calls in flight (`AI_MESSAGE_MAX_CONCURRENT_CALLS`).
    pub call_slots: middleware::CallSlots,
    /// Turns true when the server begins to shut down; open streams end.
    pub shutdown: watch::Receiver<bool>,
    /// Whether the health probe last reached the database (calls fail fast when not).
    pub readiness: Arc<health::Readiness>,
    /// The Prometheus series.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl AppState {
    /// The caller of this request (see `Authenticator::authenticate`).
    pub async fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, AppError> {
        self.auth
            .authenticate(
                request.extensions().get::<BearerOutcome>(),
                client_address(request, &self.config.trusted_proxies),
                self.clock.now(),
            )
            .await
    }

    /// The caller of this request, who must be a superuser right now.
    pub async fn authenticate_superuser<T>(
        &self,
        request: &Request<T>,
    ) -> Result<Caller, AppError> {
        Authenticator::require_superuser(self.authenticate(request).await?)
    }

    /// The caller as the protocol shows them (roles as of this call).
    pub fn caller_proto(&self, caller: &Caller) -> crate::proto::User {
        convert::user_to_proto(&caller.user, caller.roles.clone())
    }

    /// The user as the protocol shows it, with their current role names.
    pub async fn user_proto(&self, user: &UserProfile) -> Result<crate::proto::User, AppError> {
        let roles = self.db.role_names(user.id).await?;
        Ok(convert::user_to_proto(user, roles))
    }
}

/// The client's address: the TCP peer, or, when the peer is a trusted proxy,
/// the rightmost `x-forwarded-for` entry that is not itself a trusted proxy.
pub fn client_address<T>(request: &Request<T>, trusted_proxies: &[IpNet]) -> Option<IpAddr> {
    let peer = request.remote_addr()?.ip();
    let is_trusted = |ip: &IpAddr| trusted_proxies.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let forwarded: Vec<IpAddr> = request
        .metadata()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|item| item.trim().parse().ok())
        .collect();
    Some(
        forwarded
            .into_iter()
            .rev()
            .find(|ip| !is_trusted(ip))
            .unwrap_or(peer),
    )
}
