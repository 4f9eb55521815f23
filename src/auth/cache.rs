//! A short-lived cache of live sessions (session, user and role names), so
//! that an authenticated call costs no database read while nothing changes.
//!
//! Correctness comes from invalidation, not from the lifetime: every write
//! that changes a session, a user or roles invalidates the affected entries
//! on this instance before the RPC answers, and other instances hear of it
//! through the event channel (PostgreSQL NOTIFY). The one-second lifetime
//! only bounds the damage of a notification lost while an instance's
//! listener reconnects, matching the contract's "within 1 second across
//! instances". A generation counter keeps a read that raced an
//! invalidation from re-inserting what it read before the change.

use std::{
    collections::HashMap,
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::storage::LiveSession;

/// How long an entry may be served without a fresh read.
pub const ENTRY_LIFETIME: Duration = Duration::from_secs(1);
const ENTRY_LIFETIME_MICROS: i64 = ENTRY_LIFETIME.as_micros() as i64;
/// More entries than this and the cache starts over (memory stays bounded).
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone)]
pub struct CachedSession {
    pub live: LiveSession,
    pub roles: Vec<String>,
    /// When it was read (microseconds).
    loaded_at: i64,
}

impl CachedSession {
    /// An entry read from the database at `now_micros`.
    pub fn fresh(live: LiveSession, roles: Vec<String>, now_micros: i64) -> Self {
        Self {
            live,
            roles,
            loaded_at: now_micros,
        }
    }
}

#[derive(Default)]
pub struct SessionCache {
    entries: Mutex<HashMap<i64, CachedSession>>,
    generation: AtomicU64,
}

impl SessionCache {
    fn lock(&self) -> MutexGuard<'_, HashMap<i64, CachedSession>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Read before loading from the database; hand back to `insert`.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The session if cached, fresh, of `user_id` and unexpired at `now`.
    pub fn get(&self, session_id: i64, user_id: i64, now_micros: i64) -> Option<CachedSession> {
        let entries = self.lock();
        let entry = entries.get(&session_id)?;
        (entry.live.user.id == user_id
            && entry.live.expires_at > now_micros
            && now_micros - entry.loaded_at < ENTRY_LIFETIME_MICROS)
            .then(|| entry.clone())
    }

    /// Stores what was read, unless something was invalidated since
    /// `generation` was taken (the read may predate the change).
    pub fn insert(&self, session_id: i64, entry: CachedSession, generation: u64) {
        let mut entries = self.lock();
        if self.generation() != generation {
            return;
        }
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(session_id, entry);
    }

    /// Records a `last_used_at` just written for the session.
    pub fn mark_used(&self, session_id: i64, now_micros: i64) {
        if let Some(entry) = self.lock().get_mut(&session_id) {
            entry.live.last_used_at = now_micros;
        }
    }

    /// Forgets every session of the user.
    pub fn invalidate_user(&self, user_id: i64) {
        let mut entries = self.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        entries.retain(|_, entry| entry.live.user.id != user_id);
    }

    /// Forgets everything (a change that touches many users, e.g. a role deleted).
    pub fn clear(&self) {
        let mut entries = self.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::UserProfile;

    fn live(user_id: i64) -> LiveSession {
        LiveSession {
            user: UserProfile {
                id: user_id,
                username: "u".into(),
                email: "u@x.io".into(),
                full_name: None,
                bio: None,
                is_active: true,
                is_superuser: false,
                created_at: 0,
                updated_at: 0,
            },
            expires_at: 1_000,
            last_used_at: 0,
        }
    }

    #[test]
    fn entries_are_served_only_for_their_user_and_before_expiry() {
        let cache = SessionCache::default();
        cache.insert(
            7,
            CachedSession::fresh(live(1), vec![], 0),
            cache.generation(),
        );
        assert!(cache.get(7, 1, 999).is_some());
        assert!(cache.get(7, 2, 999).is_none(), "another user's id");
        assert!(cache.get(7, 1, 1_000).is_none(), "the session has expired");
        assert!(cache.get(8, 1, 0).is_none());
    }

    #[test]
    fn entries_live_one_second_of_the_callers_clock() {
        let cache = SessionCache::default();
        cache.insert(
            7,
            CachedSession::fresh(live(1), vec![], 0),
            cache.generation(),
        );
        assert!(cache.get(7, 1, 999).is_some());
        let mut long_lived = live(1);
        long_lived.expires_at = i64::MAX;
        cache.insert(
            8,
            CachedSession::fresh(long_lived, vec![], 0),
            cache.generation(),
        );
        assert!(cache.get(8, 1, 999_999).is_some());
        assert!(cache.get(8, 1, 1_000_000).is_none(), "a second old");
    }

    #[test]
    fn invalidating_a_user_forgets_all_their_sessions_only() {
        let cache = SessionCache::default();
        let generation = cache.generation();
        cache.insert(1, CachedSession::fresh(live(10), vec![], 0), generation);
        cache.insert(2, CachedSession::fresh(live(10), vec![], 0), generation);
        cache.insert(3, CachedSession::fresh(live(20), vec![], 0), generation);
        cache.invalidate_user(10);
        assert!(cache.get(1, 10, 0).is_none() && cache.get(2, 10, 0).is_none());
        assert!(cache.get(3, 20, 0).is_some());
        cache.clear();
        assert!(cache.get(3, 20, 0).is_none());
    }

    #[test]
    fn a_read_that_raced_an_invalidation_is_not_stored() {
        let cache = SessionCache::default();
        let before = cache.generation();
        cache.invalidate_user(10);
        cache.insert(1, CachedSession::fresh(live(10), vec![], 0), before);
        assert!(cache.get(1, 10, 0).is_none());
    }
}
