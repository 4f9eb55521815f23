//! Who is calling: the interceptor's verdict on the bearer token, checked on
//! every call against the live session (is it active, unexpired, the user's,
//! and is the user active?). Reads come from the session cache while fresh,
//! else from the database; that read is what makes revocation immediate on
//! every instance sharing the database. Rights (superuser, roles) come from
//! the same read, never from the token.

use std::{net::IpAddr, sync::Arc};

use super::{
    BearerOutcome,
    cache::{CachedSession, SessionCache},
    interceptor,
};
use crate::{
    domain::Timestamp,
    error::{AppError, Reason},
    storage::{Database, UserProfile},
};

/// `last_used_at` is written at most this often per session (one minute), so
/// that authenticated calls do not each cost a database write.
pub const LAST_USED_PRECISION_MICROS: i64 = 60_000_000;

/// Why a well-formed token's call is refused once its session is gone.
pub const SESSION_ENDED: &str = "the session has ended; log in again";

/// The authenticated caller of one RPC: a live session of an active user.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user as of this call, without their password hash.
    pub user: UserProfile,
    /// The user's role names, as of this call.
    pub roles: Vec<String>,
    pub session_id: i64,
    /// The session's absolute end (microseconds).
    pub session_expires_at: i64,
    /// The client's address, for audit events.
    pub peer: Option<IpAddr>,
}

impl Caller {
    /// How long the caller's session has left at `now` (zero once past):
    /// a stream it opens ends then.
    pub fn session_time_left(&self, now: Timestamp) -> std::time::Duration {
        std::time::Duration::from_micros(
            u64::try_from(self.session_expires_at - now.micros()).unwrap_or(0),
        )
    }
}

pub struct Authenticator {
    db: Arc<dyn Database>,
    sessions: Arc<SessionCache>,
    /// `last_used_at` writes, made by one background task.
    touches: tokio::sync::mpsc::Sender<(i64, i64)>,
}

/// Touches waiting at most; beyond, one is skipped (it is retried a minute later).
const PENDING_TOUCHES: usize = 1024;

impl Authenticator {
    /// The authenticator and its task that writes `last_used_at`; the task
    /// writes what is queued and ends once `closing` turns true.
    pub fn new(
        db: Arc<dyn Database>,
        sessions: Arc<SessionCache>,
        closing: tokio::sync::watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (touches, queued) = tokio::sync::mpsc::channel(PENDING_TOUCHES);
        let task = tokio::spawn(touch_sessions(Arc::clone(&db), queued, closing));
        (
            Self {
                db,
                sessions,
                touches,
            },
            task,
        )
    }

    /// The caller behind `bearer` (the interceptor's verdict; `None` when no
    /// interceptor ran), if their session is live at `now`.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn authenticate(
        &self,
        bearer: Option<&BearerOutcome>,
        peer: Option<IpAddr>,
        now: Timestamp,
    ) -> Result<Caller, AppError> {
        let access = match bearer {
            Some(BearerOutcome::Verified(access)) => *access,
            Some(BearerOutcome::Rejected(reason)) => {
                return Err(AppError::refused(
                    *reason,
                    interceptor::rejection_text(*reason),
                ));
            }
            Some(BearerOutcome::Missing) | None => {
                return Err(AppError::refused(
                    Reason::TokenMissing,
                    interceptor::MISSING_TOKEN,
                ));
            }
        };
        let now = now.micros();
        let cached = self
            .live_session(access.session_id, access.user_id, now)
            .await?
            .ok_or(AppError::refused(Reason::SessionRevoked, SESSION_ENDED))?;
        if now - cached.live.last_used_at >= LAST_USED_PRECISION_MICROS {
            self.mark_session_used(access.session_id, now);
        }
        Ok(Caller {
            user: cached.live.user,
            roles: cached.roles,
            session_id: access.session_id,
            session_expires_at: cached.live.expires_at,
            peer,
        })
    }

    /// The caller, if they are a superuser as of this call (read with the
    /// session, never from the token).
    pub fn require_superuser(caller: Caller) -> Result<Caller, AppError> {
        if !caller.user.is_superuser {
            return Err(AppError::refused(
                Reason::SuperuserRequired,
                "only superusers may do this",
            ));
        }
        Ok(caller)
    }

    /// The live session with its user and roles: from the cache while fresh,
    /// else from the database (two reads: session with user, then roles),
    /// then cached.
    #[tracing::instrument(level = "debug", skip(self, now))]
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
        let entry = CachedSession::fresh(live, roles, now);
        self.sessions.insert(session_id, entry.clone(), generation);
        Ok(Some(entry))
    }

    /// True while the session is live and its user active (always read fresh).
    pub async fn session_is_live(
        &self,
        session_id: i64,
        user_id: i64,
        now: Timestamp,
    ) -> Result<bool, AppError> {
        Ok(self
            .db
            .find_live_session(session_id, user_id, now.micros())
            .await?
            .is_some())
    }

    /// Records use of a session in the background: the call does not wait
    /// for the write, and a failure only leaves `last_used_at` a little older.
    fn mark_session_used(&self, session_id: i64, now: i64) {
        self.sessions.mark_used(session_id, now);
        // A full queue skips this touch: the next call a minute on retries.
        let _ = self.touches.try_send((session_id, now));
    }
}

/// Writes queued `last_used_at` touches until `closing`, then the rest.
async fn touch_sessions(
    db: Arc<dyn Database>,
    mut queued: tokio::sync::mpsc::Receiver<(i64, i64)>,
    closing: tokio::sync::watch::Receiver<bool>,
) {
    let touch = |(session_id, now): (i64, i64)| {
        let db = Arc::clone(&db);
        async move {
            if let Err(error) = db.touch_session(session_id, now).await {
                tracing::debug!(session_id, error = %error, "could not update last_used_at");
            }
        }
    };
    let closing = crate::storage::batch::closing(closing);
    tokio::pin!(closing);
    loop {
        tokio::select! {
            next = queued.recv() => match next {
                Some(item) => touch(item).await,
                None => return,
            },
            () = &mut closing => {
                queued.close();
                while let Some(item) = queued.recv().await {
                    touch(item).await;
                }
                return;
            }
        }
    }
}
