//! The gRPC protocol layer: one thin adapter per service. Every RPC reads the
//! same: caller from the extensions, request parsed into domain values, one
//! storage call, errors mapped by `AppError -> Status`, result converted.

pub mod auth;
mod convert;
pub mod health;
pub mod message;
pub mod middleware;
pub mod session;
pub mod user_admin;

use std::{net::IpAddr, sync::Arc};

use ipnet::IpNet;
use tokio::sync::watch;
use tonic::Request;

use crate::{
    auth::{
        BearerOutcome, PasswordHasher, TokenService,
        cache::{CachedSession, SessionCache},
        interceptor,
        throttle::Throttle,
    },
    config::Config,
    domain::Timestamp,
    error::AppError,
    events::{EventHub, HubEvent},
    storage::{Database, UserRecord, batch::MessageWriter},
};

/// Everything the handlers share, built once at startup.
pub struct AppState {
    pub db: Arc<dyn Database>,
    pub tokens: Arc<TokenService>,
    pub hasher: Arc<PasswordHasher>,
    pub throttle: Throttle,
    pub events: Arc<EventHub>,
    /// Live sessions recently read, shared with `events` for invalidation.
    pub sessions: Arc<SessionCache>,
    /// Group commit for SendMessage.
    pub message_writer: MessageWriter,
    pub config: Config,
    /// The bound on unary calls in flight (`AI_MESSAGE_MAX_CONCURRENT_CALLS`).
    pub call_slots: middleware::CallSlots,
    /// Turns true when the server begins to shut down; open streams end.
    pub shutdown: watch::Receiver<bool>,
    /// Whether the health probe last reached the database (calls fail fast when not).
    pub readiness: Arc<health::Readiness>,
}

/// `last_used_at` is written at most this often per session (one minute), so
/// that authenticated calls do not each cost a database write.
pub const LAST_USED_PRECISION_MICROS: i64 = 60_000_000;

/// The authenticated caller of one RPC: a live session of an active user.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: UserRecord,
    /// The user's role names, as of this call.
    pub roles: Vec<String>,
    pub session_id: i64,
    /// The session's absolute end (microseconds).
    pub session_expires_at: i64,
    /// The client's address (see `client_address`), for audit events.
    pub peer: Option<IpAddr>,
}

impl AppState {
    /// Turns the interceptor's verdict into a caller, checking on every call
    /// that the session is still live and the user active. This database read
    /// is what makes revocation immediate on every instance sharing the database.
    pub async fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, AppError> {
        let access = match request.extensions().get::<BearerOutcome>() {
            Some(BearerOutcome::Verified(access)) => *access,
            Some(BearerOutcome::Rejected) => {
                return Err(AppError::Unauthenticated(interceptor::INVALID_TOKEN));
            }
            Some(BearerOutcome::Missing) | None => {
                return Err(AppError::Unauthenticated(interceptor::MISSING_TOKEN));
            }
        };
        let now = Timestamp::now().micros();
        let cached = self
            .live_session(access.session_id, access.user_id, now)
            .await?
            .ok_or(AppError::Unauthenticated(
                "the session has ended; log in again",
            ))?;
        if now - cached.live.last_used_at >= LAST_USED_PRECISION_MICROS {
            self.mark_session_used(access.session_id, now);
        }
        Ok(Caller {
            user: cached.live.user,
            roles: cached.roles,
            session_id: access.session_id,
            session_expires_at: cached.live.expires_at,
            peer: client_address(request, &self.config.trusted_proxies),
        })
    }

    /// The live session with its user and roles: from the cache while fresh,
    /// else from the database (two reads), then cached.
    pub async fn live_session(
        &self,
        session_id: i64,
        user_id: i64,
        now: i64,
    ) -> Result<Option<CachedSession>, AppError> {
        if let Some(cached) = self.sessions.get(session_id, user_id, now) {
            return Ok(Some(cached));
        }
        let generation = self.sessions.generation();
        let Some(live) = self.db.find_live_session(session_id, user_id, now).await? else {
            return Ok(None);
        };
        let roles = self.db.role_names(user_id).await?;
        let entry = CachedSession::fresh(live, roles);
        self.sessions.insert(session_id, entry.clone(), generation);
        Ok(Some(entry))
    }

    /// Records use of a session in the background: the call does not wait
    /// for the write, and a failure only leaves `last_used_at` a little older.
    fn mark_session_used(&self, session_id: i64, now: i64) {
        self.sessions.mark_used(session_id, now);
        let db = Arc::clone(&self.db);
        tokio::spawn(async move {
            if let Err(error) = db.touch_session(session_id, now).await {
                tracing::debug!(session_id, error = %error, "could not update last_used_at");
            }
        });
    }

    /// Call after any write that changes a user, their sessions or their
    /// roles: this instance forgets the user at once, other instances as
    /// soon as the event reaches them, and open streams re-check their session.
    pub async fn user_changed(&self, user_id: i64) {
        self.sessions.invalidate_user(user_id);
        self.events.publish(HubEvent::UserChanged { user_id }).await;
    }

    /// Like `user_changed`, for a change that touches many users.
    pub async fn all_users_changed(&self) {
        self.sessions.clear();
        self.events.publish(HubEvent::AllUsersChanged).await;
    }

    /// True while the session is live and its user active.
    pub async fn session_is_live(&self, session_id: i64, user_id: i64) -> Result<bool, AppError> {
        Ok(self
            .db
            .find_live_session(session_id, user_id, Timestamp::now().micros())
            .await?
            .is_some())
    }

    /// The caller as the protocol shows them (roles as of this call).
    pub fn caller_proto(&self, caller: &Caller) -> crate::proto::User {
        convert::user_to_proto(&caller.user, caller.roles.clone())
    }

    /// The user as the protocol shows it, with their current role names.
    pub async fn user_proto(&self, user: &UserRecord) -> Result<crate::proto::User, AppError> {
        let roles = self.db.role_names(user.id).await?;
        Ok(convert::user_to_proto(user, roles))
    }

    /// The caller, who must be a superuser right now (read from the database
    /// on this call, never from the token).
    pub async fn authenticate_superuser<T>(
        &self,
        request: &Request<T>,
    ) -> Result<Caller, AppError> {
        let caller = self.authenticate(request).await?;
        if !caller.user.is_superuser {
            return Err(AppError::PermissionDenied("only superusers may do this"));
        }
        Ok(caller)
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
