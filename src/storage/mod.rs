//! Storage: repository traits, their records and errors. SQL only; no rules
//! and no protocol types live here (those belong to `auth`, `domain` and
//! `services`). Each backend implements every trait; `open` picks the backend
//! once, from the `DATABASE_URL` scheme.
//!
//! All times are microseconds since the Unix epoch (`i64`). Multi-step writes
//! are one method and one transaction.

pub mod batch;
pub mod page_cache;
#[macro_use]
mod sql;
mod postgres;
mod sqlite;
mod target;

use std::sync::Arc;

use async_trait::async_trait;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use target::{DatabaseTarget, redact_password};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A unique column already holds this value; names the request field.
    #[error("{0} already exists")]
    Conflict(&'static str),
    /// The row to change does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A message's recipient is disabled (or gone), so it cannot be sent.
    #[error("the recipient cannot receive messages")]
    RecipientDisabled,
    /// A `request_id` already used for a different message; names the field.
    #[error("{0} was used for a different message")]
    RequestMismatch(&'static str),
    /// The database cannot be reached (or is busy beyond its timeout).
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error")]
    Internal(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StorageError {
    fn from(error: sqlx::Error) -> Self {
        if is_unavailable(&error) {
            Self::Unavailable(error)
        } else {
            Self::Internal(error)
        }
    }
}

/// Failures a retry can resolve (the database unreachable, busy, out of space
/// or read-only), as opposed to bugs.
fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // Extended result codes; the primary code is the low byte.
                let primary = code.parse::<i32>().unwrap_or_default() & 0xff;
                return sqlite_unavailable(primary);
            }
            postgres_unavailable(&code)
        }
        _ => false,
    }
}

/// SQLite: BUSY (5), LOCKED (6), NOMEM (7), READONLY (8), IOERR (10),
/// FULL (13), CANTOPEN (14).
fn sqlite_unavailable(primary: i32) -> bool {
    matches!(primary, 5 | 6 | 7 | 8 | 10 | 13 | 14)
}

/// PostgreSQL: connection exceptions (08), insufficient resources such as a
/// full disk (53), shutdown and crash (57P), a read-only transaction (25006,
/// a standby), I/O errors (58030), deadlock (40P01) and serialization failure
/// (40001).
fn postgres_unavailable(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || matches!(code, "25006" | "58030" | "40P01" | "40001")
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// The current time in microseconds since the epoch, handed in by the caller
/// (storage reads no clock of its own).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// A user as stored: the profile and the password hash. Reads of profile
/// fields go through `Deref` (`user.id`, `user.username`, ...).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRecord {
    #[sqlx(flatten)]
    pub profile: UserProfile,
    pub password_hash: String,
}

impl std::ops::Deref for UserRecord {
    type Target = UserProfile;

    fn deref(&self) -> &UserProfile {
        &self.profile
    }
}

/// A user without their password hash: what an authenticated call carries
/// (and the session cache keeps), so that no handler holds a hash it does
/// not need.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserProfile {
    pub id: i64,
    pub username: String,
    pub email: String,
    pub full_name: Option<String>,
    pub bio: Option<String>,
    pub is_active: bool,
    pub is_superuser: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

pub struct NewUser {
    pub username: String,
    /// Already lower-cased.
    pub email: String,
    pub password_hash: String,
    pub full_name: Option<String>,
    pub is_superuser: bool,
    pub now: i64,
}

/// UpdateMe: `None` leaves a column as it is.
#[derive(Default)]
pub struct ProfileChanges {
    pub email: Option<String>,
    pub full_name: Option<String>,
    pub bio: Option<String>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRecord {
    pub id: i64,
    pub user_id: i64,
    pub device_info: Option<String>,
    pub ip_address: Option<String>,
    pub is_active: bool,
    pub created_at: i64,
    pub expires_at: i64,
    pub last_used_at: i64,
    /// When it was revoked (never for a session that simply expired).
    pub revoked_at: Option<i64>,
    /// Why it was revoked: an [`EndReason`] number.
    pub end_reason: Option<i32>,
}

/// The connection pools' state, for `ai_message_db_connections`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolState {
    pub idle: usize,
    pub in_use: usize,
}

/// Why a session ended; the numbers are the stored ones (and the API's
/// `SessionEndReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum EndReason {
    Logout = 1,
    LogoutAll = 2,
    SessionDeleted = 3,
    PasswordChanged = 4,
    UserDisabled = 5,
    UserDeleted = 6,
    RefreshTokenReused = 7,
    Expired = 8,
}

impl EndReason {
    /// The reason as metrics label it (`logout`, `logout_all`, ...).
    pub const fn label(self) -> &'static str {
        match self {
            Self::Logout => "logout",
            Self::LogoutAll => "logout_all",
            Self::SessionDeleted => "session_deleted",
            Self::PasswordChanged => "password_changed",
            Self::UserDisabled => "user_disabled",
            Self::UserDeleted => "user_deleted",
            Self::RefreshTokenReused => "refresh_token_reused",
            Self::Expired => "expired",
        }
    }
}

/// One row of the revocation log: a session that ended early.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RevocationRecord {
    /// Grows in commit order; the feed's cursor.
    pub id: i64,
    pub session_id: i64,
    pub user_id: i64,
    /// An [`EndReason`] number.
    pub reason: i32,
    pub revoked_at: i64,
}

pub struct NewSession {
    pub user_id: i64,
    pub device_info: Option<String>,
    pub ip_address: Option<String>,
    pub now: i64,
    /// Absolute end of the session (login time plus the refresh lifetime).
    pub expires_at: i64,
    /// SHA-256 of the session's first refresh token.
    pub refresh_token_hash: Vec<u8>,
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The token was live and is now spent; its replacement is stored.
    Rotated {
        user_id: i64,
        session_id: i64,
        session_expires_at: i64,
    },
    /// The token had been spent before: treated as theft, the session is revoked.
    /// `ended` is 1 if the session was still live.
    Reused {
        session_id: i64,
        user_id: i64,
        ended: u64,
    },
    /// Unknown token, or its session or user is no longer live.
    Invalid,
}

#[async_trait]
pub trait UserRepository: Send + Sync {
    /// Inserts a user with no roles. `Conflict("username" | "email")` when
    /// either is taken, compared case-insensitively by a unique index.
    async fn create_user(&self, user: NewUser) -> Result<UserRecord>;

    async fn find_user(&self, user_id: i64) -> Result<Option<UserRecord>>;

    /// By username or email, case-insensitively.
    async fn find_user_by_login(&self, login: &str) -> Result<Option<UserRecord>>;

    /// Applies the given changes and bumps `updated_at`; `NotFound("user")` for a
    /// missing user, `Conflict("email")` for a taken address.
    async fn update_profile(
        &self,
        user_id: i64,
        changes: ProfileChanges,
        now: i64,
    ) -> Result<UserRecord>;

    /// Replaces the password hash and, in the same transaction, revokes every
    /// other live session of the user; the session `keep_session_id` stays.
    /// Returns how many sessions ended.
    async fn change_password(
        &self,
        user_id: i64,
        password_hash: &str,
        keep_session_id: i64,
        now: i64,
    ) -> Result<u64>;

    /// The user's role names, sorted.
    async fn role_names(&self, user_id: i64) -> Result<Vec<String>>;

    /// One page of users ordered by id, after `after_id`, whose username or
    /// email contains `query` case-insensitively (every user for an empty query).
    async fn list_users(&self, query: &str, after_id: i64, limit: i64) -> Result<Vec<UserRecord>>;

    /// How many users `list_users` would return in all for `query`.
    async fn count_users(&self, query: &str) -> Result<i64>;

    /// Role names of every user whose id lies in `first_id..=last_id`, as
    /// `(user_id, name)` pairs sorted by name: one query fills a whole page.
    async fn role_names_in_id_range(
        &self,
        first_id: i64,
        last_id: i64,
    ) -> Result<Vec<(i64, String)>>;

    /// Deletes the user with their sessions, refresh tokens, role links and
    /// messages (sent and received), in one transaction, its live sessions
    /// logged in the revocation feed first. `NotFound("user")`.
    /// Returns how many live sessions ended with it.
    async fn delete_user(&self, user_id: i64, now: i64) -> Result<u64>;

    /// Sets `is_superuser` (idempotent). `NotFound("user")` for a missing user.
    async fn set_superuser(&self, user_id: i64, is_superuser: bool, now: i64)
    -> Result<UserRecord>;

    /// Enables or disables the user; disabling also revokes every session of
    /// the user, in the same transaction. `NotFound("user")` for a missing user.
    /// Returns the user and how many sessions ended.
    async fn set_user_active(
        &self,
        user_id: i64,
        active: bool,
        now: i64,
    ) -> Result<(UserRecord, u64)>;
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RoleRecord {
    pub id: i64,
    pub name: String,
    pub description: Option<String>,
    pub created_at: i64,
}

#[async_trait]
pub trait RoleRepository: Send + Sync {
    /// Every role, ordered by name.
    async fn list_roles(&self) -> Result<Vec<RoleRecord>>;

    /// `Conflict("name")` when a role of that name exists.
    async fn create_role(
        &self,
        name: &str,
        description: Option<&str>,
        now: i64,
    ) -> Result<RoleRecord>;

    /// Deletes the role and, by cascade, its links to users. `NotFound("role")`.
    async fn delete_role(&self, role_id: i64) -> Result<()>;

    /// The user's roles ordered by name; `NotFound("user")` for a missing user.
    async fn user_roles(&self, user_id: i64) -> Result<Vec<RoleRecord>>;

    /// Replaces the user's whole role set atomically. A missing user is
    /// `NotFound("user")`, an unknown role id `NotFound("role")`; either way
    /// nothing changes. Duplicate ids count once.
    async fn set_user_roles(&self, user_id: i64, role_ids: &[i64]) -> Result<Vec<RoleRecord>>;
}

/// A live session and its user, as the revocation check reads them.
#[derive(Debug, Clone)]
pub struct LiveSession {
    pub user: UserProfile,
    /// The session's absolute end.
    pub expires_at: i64,
    /// When the session was last marked used (written at most once a minute).
    pub last_used_at: i64,
}

#[async_trait]
pub trait SessionRepository: Send + Sync {
    /// Inserts the session and its first refresh token in one transaction.
    async fn create_session(&self, session: NewSession) -> Result<SessionRecord>;

    /// The session and its user, only while the session is active, unexpired
    /// at `now`, belongs to `user_id`, and the user is active.
    async fn find_live_session(
        &self,
        session_id: i64,
        user_id: i64,
        now: i64,
    ) -> Result<Option<LiveSession>>;

    /// Sets the session's `last_used_at`.
    async fn touch_session(&self, session_id: i64, now: i64) -> Result<()>;

    /// Spends the presented refresh token and stores its replacement, atomically:
    /// of concurrent calls with one token exactly one rotates. A token spent
    /// before revokes its session (committed even though the caller fails).
    async fn rotate_refresh_token(
        &self,
        presented_hash: &[u8],
        replacement_hash: &[u8],
        now: i64,
    ) -> Result<RefreshOutcome>;

    /// Revokes one session of the user for `reason`, logging it in the
    /// revocation feed in the same transaction; false when it was not live.
    async fn revoke_session(
        &self,
        session_id: i64,
        user_id: i64,
        reason: EndReason,
        now: i64,
    ) -> Result<bool>;

    /// Revokes every live session of the user (each logged); returns how many.
    async fn revoke_user_sessions(&self, user_id: i64, reason: EndReason, now: i64) -> Result<u64>;

    /// The user's sessions that ended (revoked, or expired) at or after
    /// `since`, newest first.
    async fn list_ended_sessions(
        &self,
        user_id: i64,
        since: i64,
        now: i64,
    ) -> Result<Vec<SessionRecord>>;

    /// Revocation log rows after `after_id`, oldest first, at most `limit`.
    async fn revocations_after(&self, after_id: i64, limit: i64) -> Result<Vec<RevocationRecord>>;

    /// Whether the log still holds the row `id` (a resumable cursor).
    async fn revocation_exists(&self, id: i64) -> Result<bool>;

    /// The newest row's id, 0 for an empty log.
    async fn latest_revocation_id(&self) -> Result<i64>;

    /// Deletes the rows revoked before `before`; returns how many.
    async fn sweep_revocations(&self, before: i64) -> Result<u64>;

    /// The user's active, unexpired sessions, newest first.
    async fn list_live_sessions(&self, user_id: i64, now: i64) -> Result<Vec<SessionRecord>>;
}

/// Applied and pending migrations, for `ai-message migrate status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationState {
    pub version: i64,
    pub description: String,
    pub applied: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
pub struct MessageRecord {
    pub id: i64,
    pub sender_id: i64,
    pub recipient_id: i64,
    pub content: String,
    pub is_read: bool,
    pub parent_id: Option<i64>,
    pub conversation_id: String,
    pub created_at: i64,
    pub read_at: Option<i64>,
    pub edited_at: Option<i64>,
    /// Direct replies that still exist.
    pub reply_count: i64,
}

impl MessageRecord {
    /// The users whose event logs record a change to this message (once
    /// each: a note to oneself has one).
    pub fn audience(&self) -> impl Iterator<Item = i64> + use<> {
        [
            Some(self.sender_id),
            (self.recipient_id != self.sender_id).then_some(self.recipient_id),
        ]
        .into_iter()
        .flatten()
    }
}

/// What happened to a message; the numbers are the stored ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(i32)]
pub enum MessageChange {
    Created = 1,
    Read = 2,
    Deleted = 3,
    Edited = 4,
}

impl MessageChange {
    fn from_stored(kind: i32) -> Option<Self> {
        Some(match kind {
            1 => Self::Created,
            2 => Self::Read,
            3 => Self::Deleted,
            4 => Self::Edited,
            _ => return None,
        })
    }
}

/// A committed change to a message with the id it got in each of its
/// audience's event logs, as `(user_id, event_id)`. No ids: nothing was
/// logged (an idempotent send answered from its first time).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoggedChange {
    pub change: MessageChange,
    pub message: MessageRecord,
    pub event_ids: Vec<(i64, i64)>,
}

impl LoggedChange {
    /// The event id this change has in `user_id`'s log.
    pub fn event_id_for(&self, user_id: i64) -> Option<i64> {
        self.event_ids
            .iter()
            .find(|(user, _)| *user == user_id)
            .map(|(_, event_id)| *event_id)
    }
}

/// One entry of a user's event log: the message as it was after the change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageEvent {
    pub event_id: i64,
    pub change: MessageChange,
    pub message: MessageRecord,
}

/// A send that is safe to retry: the sender's key and a digest of what was
/// asked, to tell a retry from a different message under the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKey {
    pub request_id: String,
    pub fingerprint: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct NewMessage {
    pub sender_id: i64,
    pub recipient_id: i64,
    pub content: String,
    pub parent_id: Option<i64>,
    pub conversation_id: String,
    pub now: i64,
    /// Set for an idempotent send.
    pub request: Option<RequestKey>,
}

/// How long a `request_id` identifies its first message.
pub const REQUEST_ID_LIFETIME_MICROS: i64 = 24 * 3600 * 1_000_000;

/// ListMessages filters, all optional.
#[derive(Debug, Clone, Default)]
pub struct MessageFilter {
    pub with_user_id: Option<i64>,
    pub conversation_id: Option<String>,
    pub unread_only: bool,
    /// Only the direct replies to this message.
    pub parent_id: Option<i64>,
}

/// A page of ListMessages and the user's newest event id when it was read
/// (every event up to it is reflected in the page).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessagePage {
    pub messages: Vec<MessageRecord>,
    pub last_event_id: i64,
}

/// Keyset position "newest first": items strictly older than `(created_at, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Before {
    pub created_at: i64,
    pub id: i64,
}

impl Before {
    /// Before everything: the first page.
    pub const START: Self = Self {
        created_at: i64::MAX,
        id: i64::MAX,
    };
}

/// One participant's view of a conversation.
#[derive(Debug, Clone)]
pub struct ConversationRecord {
    pub other_user_id: i64,
    pub unread_count: i64,
    pub last_message: MessageRecord,
}

#[async_trait]
pub trait MessageRepository: Send + Sync {
    /// Stores the message, as `insert_messages` does for one.
    async fn insert_message(&self, message: NewMessage) -> Result<LoggedChange>;

    /// Stores several messages in one transaction (group commit), answering
    /// for each in order. Each stored message updates both participants'
    /// conversation rows and its parent's reply count, and gets a `Created`
    /// event in its audience's logs, all in that transaction. A message
    /// whose recipient is missing (`NotFound("recipient")`) or disabled
    /// (`RecipientDisabled`), whose parent is gone (`NotFound("parent
    /// message")`), or whose `request` key was used for a different message
    /// (`RequestMismatch("request_id")`) is refused alone; a key used for the
    /// same message in the last 24 hours answers that message as it is now
    /// (no event ids; `NotFound("message")` if it was deleted), also between
    /// concurrent transactions. Any other failure fails the whole transaction.
    async fn insert_messages(&self, messages: Vec<NewMessage>)
    -> Result<Vec<Result<LoggedChange>>>;

    async fn find_message(&self, message_id: i64) -> Result<Option<MessageRecord>>;

    /// The messages `user_id` sent or received that match `filter`, newest
    /// first, strictly before `before`, at most `limit`, with the user's
    /// newest event id read before them.
    async fn list_messages(
        &self,
        user_id: i64,
        filter: &MessageFilter,
        before: Before,
        limit: i64,
    ) -> Result<MessagePage>;

    /// The user's conversations by newest activity, strictly before `before`
    /// (the last message's `created_at` and id).
    async fn list_conversations(
        &self,
        user_id: i64,
        before: Before,
        limit: i64,
    ) -> Result<Vec<ConversationRecord>>;

    /// Marks as read those of `message_ids` that `recipient_id` received and
    /// had not read, logging a `Read` event for each; returns them as they
    /// are now, by id. One transaction.
    async fn mark_read(
        &self,
        recipient_id: i64,
        message_ids: &[i64],
        now: i64,
    ) -> Result<Vec<LoggedChange>>;

    /// Marks as read every message `recipient_id` received from
    /// `other_user_id` in `conversation_id`, as `mark_read` does.
    async fn mark_conversation_read(
        &self,
        recipient_id: i64,
        other_user_id: i64,
        conversation_id: &str,
        now: i64,
    ) -> Result<Vec<LoggedChange>>;

    /// Deletes the message if `sender_id` sent it, logging a `Deleted` event;
    /// returns it as it was. Conversation rows and the parent's reply count
    /// are corrected in the same transaction.
    async fn delete_message(
        &self,
        message_id: i64,
        sender_id: i64,
        now: i64,
    ) -> Result<Option<LoggedChange>>;

    /// Replaces the content of the message if `sender_id` sent it, sets
    /// `edited_at` and logs an `Edited` event; returns it as it is now.
    async fn edit_message(
        &self,
        message_id: i64,
        sender_id: i64,
        content: &str,
        now: i64,
    ) -> Result<Option<LoggedChange>>;

    /// Messages the user received and has not read.
    async fn unread_count(&self, user_id: i64) -> Result<i64>;

    /// The user's sent and received messages whose content contains `query`
    /// ignoring ASCII case, newest first, strictly before `before`, at most
    /// `limit`, found through the database's text index.
    async fn search_messages(
        &self,
        user_id: i64,
        query: &str,
        before: Before,
        limit: i64,
    ) -> Result<Vec<MessageRecord>>;

    /// The database's plan for `search_messages` with these arguments, as
    /// text: operators (and a test) check that it uses the text index.
    async fn explain_search(&self, user_id: i64, query: &str) -> Result<String>;

    /// The user's newest event id, 0 before their first event.
    async fn latest_event_id(&self, user_id: i64) -> Result<i64>;

    /// Whether the user's log still holds `event_id`, logged at or after
    /// `retained_since`.
    async fn event_retained(
        &self,
        user_id: i64,
        event_id: i64,
        retained_since: i64,
    ) -> Result<bool>;

    /// The user's events after `after_event_id`, oldest first, at most `limit`.
    async fn events_after(
        &self,
        user_id: i64,
        after_event_id: i64,
        limit: i64,
    ) -> Result<Vec<MessageEvent>>;

    /// Deletes events logged before `events_before` and request keys used
    /// before `requests_before`; returns how many rows went.
    async fn sweep_message_log(&self, events_before: i64, requests_before: i64) -> Result<u64>;
}

/// Limits of the login throttle (see `ThrottleRepository`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleLimits {
    /// Consecutive failures of one account before its logins are delayed.
    pub account_failures: i64,
    /// First delay once throttled; each further failure adds as much again.
    pub account_delay_step: i64,
    /// Longest delay.
    pub account_delay_max: i64,
    /// Failures from one address within `address_window` before it is throttled.
    pub address_failures: i64,
    pub address_window: i64,
}

/// Failure counting that every instance shares. Reservations are pessimistic
/// and atomic: an attempt counts as a failure *before* its password is
/// checked, so parallel attempts can never exceed the limits; a success
/// then takes its count back.
#[async_trait]
pub trait ThrottleRepository: Send + Sync {
    /// Reserves one attempt for the address and then for the account (either
    /// may be `None`), in one transaction. When either is throttled nothing
    /// is counted, and the answer says which and until when.
    async fn reserve_attempt(
        &self,
        account_key: Option<&str>,
        address: Option<&str>,
        limits: ThrottleLimits,
        now: i64,
    ) -> Result<Reservation>;

    /// Takes back a reserved attempt that succeeded: the account's count
    /// resets, the address's count drops by one.
    async fn attempt_succeeded(
        &self,
        account_key: Option<&str>,
        address: Option<&str>,
    ) -> Result<()>;

    /// Deletes account rows with no failure since `forget_before` and no
    /// delay running at `now`, and address rows whose window has ended;
    /// returns how many rows went.
    async fn sweep_throttle(
        &self,
        now: i64,
        forget_before: i64,
        address_window: i64,
    ) -> Result<u64>;

    /// Until when the address is throttled, if it is (checked before Register).
    async fn address_throttled(
        &self,
        address: &str,
        limits: ThrottleLimits,
        now: i64,
    ) -> Result<Option<i64>>;
}

/// The outcome of [`ThrottleRepository::reserve_attempt`]; times in
/// microseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    Reserved,
    AddressThrottled { until: i64 },
    AccountThrottled { until: i64 },
}

/// Carries stream events between server instances sharing one database:
/// the database's own channel (PostgreSQL LISTEN/NOTIFY) or an event bus.
#[async_trait]
pub trait EventChannel: Send + Sync {
    /// Sends `payloads`, in order, to the listeners of every instance, this
    /// one included; `now` (microseconds) dates what is stored for them.
    async fn publish(&self, payloads: Vec<String>, now: i64) -> anyhow::Result<()>;

    /// Starts listening (connected and subscribed when this returns), then
    /// hands each payload to `deliver` until `stop` turns true. `connected`
    /// is kept current: false as soon as the listening connection is found
    /// broken or silent (events may have been missed), true again only once
    /// it is listening anew.
    async fn start_listener(
        &self,
        deliver: Arc<dyn Fn(String) + Send + Sync>,
        connected: tokio::sync::watch::Sender<bool>,
        now: Clock,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>>;
}

/// One backend: every repository plus the operational calls.
#[async_trait]
pub trait Database:
    UserRepository + RoleRepository + SessionRepository + MessageRepository + ThrottleRepository
{
    /// The cross-instance event channel, or `None` where one process owns the
    /// database (SQLite) and in-process delivery is enough.
    fn event_channel(&self) -> Option<Arc<dyn EventChannel>>;

    /// A cheap round trip, for health checks.
    async fn ping(&self) -> Result<()>;

    /// Whether the group-commit writer (`batch::MessageWriter`) should run
    /// on a thread of its own rather than on the shared runtime.
    fn writer_wants_own_thread(&self) -> bool {
        false
    }

    /// This database's id, taken at its first migration: it names the event
    /// bus subjects of the instances that share the database.
    async fn deployment_id(&self) -> Result<String>;

    /// Brings the text index of SearchMessages up to date with the stored
    /// messages, where it is kept apart from the writes (SQLite); returns
    /// how many messages it added. Searches are exact either way.
    async fn index_text(&self) -> Result<u64>;

    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), anyhow::Error>;

    /// Every migration in order, applied or pending.
    async fn migration_status(&self) -> Result<Vec<MigrationState>, anyhow::Error>;

    /// Reverts the latest applied migration; returns its version (`None` if none was applied).
    async fn revert_latest(&self) -> Result<Option<i64>, anyhow::Error>;

    /// Closes the pool, waiting for connections to be returned.
    async fn close(&self);

    /// How many connections are idle and in use right now.
    fn pool_state(&self) -> PoolState;
}

/// Connects to the database named by the configuration (creating an SQLite
/// file if missing). Does not migrate.
pub async fn open(target: &DatabaseTarget) -> Result<Arc<dyn Database>, anyhow::Error> {
    Ok(match target {
        DatabaseTarget::Sqlite(path) => Arc::new(SqliteStore::open(path.as_deref()).await?),
        DatabaseTarget::Postgres(url) => Arc::new(PostgresStore::open(url).await?),
    })
}

/// Migration commands, the same for both backends given their migrator.
pub(crate) mod migrations {
    use sqlx::{
        Pool,
        migrate::{AppliedMigration, Migrate, Migrator},
    };

    use super::MigrationState;

    pub async fn applied<DB: sqlx::Database>(
        pool: &Pool<DB>,
        migrator: &Migrator,
    ) -> anyhow::Result<Vec<AppliedMigration>>
    where
        DB::Connection: Migrate,
    {
        let mut conn = pool.acquire().await?;
        conn.ensure_migrations_table(&migrator.table_name).await?;
        Ok(conn.list_applied_migrations(&migrator.table_name).await?)
    }

    pub async fn status<DB: sqlx::Database>(
        pool: &Pool<DB>,
        migrator: &Migrator,
    ) -> anyhow::Result<Vec<MigrationState>>
    where
        DB::Connection: Migrate,
    {
        let applied = applied(pool, migrator).await?;
        Ok(migrator
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .map(|m| MigrationState {
                version: m.version,
                description: m.description.to_string(),
                applied: applied.iter().any(|a| a.version == m.version),
            })
            .collect())
    }

    /// Undoes only the latest applied migration; returns its version.
    pub async fn revert_latest<DB: sqlx::Database>(
        pool: &Pool<DB>,
        migrator: &Migrator,
    ) -> anyhow::Result<Option<i64>>
    where
        DB::Connection: Migrate,
    {
        let mut versions: Vec<i64> = applied(pool, migrator)
            .await?
            .iter()
            .map(|a| a.version)
            .collect();
        versions.sort_unstable();
        let Some(latest) = versions.pop() else {
            return Ok(None);
        };
        migrator.undo(pool, versions.pop().unwrap_or(0)).await?;
        Ok(Some(latest))
    }
}
