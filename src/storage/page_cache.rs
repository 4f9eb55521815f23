//! First pages of ListMessages, kept in memory by the SQLite store.
//!
//! SQLite's file belongs to one process, so every write to `messages` passes
//! through this store, which forgets the affected users' pages right after
//! committing: a cached page is always what a fresh read would return. (On
//! PostgreSQL other instances write too, so that store reads every time.)
//! A generation counter keeps a read that raced a write from storing the
//! page it read before the write committed.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use super::{MessageFilter, MessageRecord};

/// Users with cached pages; beyond this one user's pages make room (at most
/// a few MiB with 101 messages per page).
const MAX_USERS: usize = 2_048;
/// Filter combinations kept per user.
const MAX_PAGES_PER_USER: usize = 8;

/// What identifies one first page of one user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PageKey {
    with_user_id: Option<i64>,
    conversation_id: Option<String>,
    unread_only: bool,
    limit: i64,
}

impl PageKey {
    pub fn new(filter: &MessageFilter, limit: i64) -> Self {
        Self {
            with_user_id: filter.with_user_id,
            conversation_id: filter.conversation_id.clone(),
            unread_only: filter.unread_only,
            limit,
        }
    }
}

type Pages = HashMap<PageKey, Arc<Vec<MessageRecord>>>;

#[derive(Default)]
pub struct PageCache {
    users: Mutex<HashMap<i64, Pages>>,
    generation: AtomicU64,
}

impl PageCache {
    fn lock(&self) -> MutexGuard<'_, HashMap<i64, Pages>> {
        self.users.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Read before loading from the database; hand back to `insert`.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn get(&self, user_id: i64, key: &PageKey) -> Option<Arc<Vec<MessageRecord>>> {
        self.lock().get(&user_id)?.get(key).cloned()
    }

    /// Stores a page read from the database, unless a write has been
    /// committed since `generation` was taken.
    pub fn insert(&self, user_id: i64, key: PageKey, page: Vec<MessageRecord>, generation: u64) {
        let mut users = self.lock();
        if self.generation() != generation {
            return;
        }
        if users.len() >= MAX_USERS && !users.contains_key(&user_id) {
            let evicted = users.keys().next().copied();
            if let Some(evicted) = evicted {
                users.remove(&evicted);
            }
        }
        let pages = users.entry(user_id).or_default();
        if pages.len() >= MAX_PAGES_PER_USER {
            pages.clear();
        }
        pages.insert(key, Arc::new(page));
    }

    /// Forgets the pages of users whose messages changed.
    pub fn forget(&self, user_ids: impl IntoIterator<Item = i64>) {
        let mut users = self.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        for user_id in user_ids {
            users.remove(&user_id);
        }
    }

    /// Forgets every page (a user and their messages were erased).
    pub fn clear(&self) {
        let mut users = self.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        users.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: i64) -> MessageRecord {
        MessageRecord {
            id,
            sender_id: 1,
            recipient_id: 2,
            content: "hi".into(),
            is_read: false,
            parent_id: None,
            conversation_id: "dm:1:2".into(),
            created_at: id,
            read_at: None,
        }
    }

    fn key() -> PageKey {
        PageKey::new(&MessageFilter::default(), 51)
    }

    #[test]
    fn a_stored_page_is_served_until_its_user_is_forgotten() {
        let cache = PageCache::default();
        cache.insert(2, key(), vec![message(1)], cache.generation());
        assert_eq!(cache.get(2, &key()).map(|page| page.len()), Some(1));
        cache.forget([7]);
        assert!(cache.get(2, &key()).is_some(), "another user's change");
        cache.forget([1, 2]);
        assert!(cache.get(2, &key()).is_none());
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_stored() {
        let cache = PageCache::default();
        let generation = cache.generation();
        cache.forget([5]);
        cache.insert(2, key(), vec![message(1)], generation);
        assert!(cache.get(2, &key()).is_none());
    }

    #[test]
    fn filters_and_sizes_are_separate_pages() {
        let cache = PageCache::default();
        cache.insert(2, key(), vec![message(1)], cache.generation());
        let unread = PageKey::new(
            &MessageFilter {
                unread_only: true,
                ..MessageFilter::default()
            },
            51,
        );
        assert!(cache.get(2, &unread).is_none());
        assert!(
            cache
                .get(2, &PageKey::new(&MessageFilter::default(), 11))
                .is_none()
        );
    }

    #[test]
    fn memory_stays_bounded() {
        let cache = PageCache::default();
        for user_id in 0..(MAX_USERS as i64 + 10) {
            cache.insert(user_id, key(), Vec::new(), cache.generation());
        }
        assert!(cache.lock().len() <= MAX_USERS);
        cache.clear();
        assert!(cache.lock().is_empty());
    }
}
