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
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
};

use super::{MessageFilter, MessagePage, MessageRecord};

/// Memory held by all cached pages together, and by any one page: a user
/// may list 1,000 messages of 16,384 characters, which is not cached.
const MAX_TOTAL_BYTES: usize = 64 << 20;
const MAX_PAGE_BYTES: usize = 1 << 20;
/// Filter combinations kept per user.
const MAX_PAGES_PER_USER: usize = 8;

/// What identifies one first page of one user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PageKey {
    with_user_id: Option<i64>,
    conversation_id: Option<String>,
    unread_only: bool,
    parent_id: Option<i64>,
    limit: i64,
}

impl PageKey {
    pub fn new(filter: &MessageFilter, limit: i64) -> Self {
        Self {
            with_user_id: filter.with_user_id,
            conversation_id: filter.conversation_id.clone(),
            unread_only: filter.unread_only,
            parent_id: filter.parent_id,
            limit,
        }
    }
}

/// Approximate heap and inline size of a page.
fn page_bytes(page: &MessagePage) -> usize {
    page.messages
        .iter()
        .map(|m| std::mem::size_of::<MessageRecord>() + m.content.len() + m.conversation_id.len())
        .sum()
}

#[derive(Default)]
struct UserPages {
    pages: HashMap<PageKey, Arc<MessagePage>>,
    bytes: usize,
}

#[derive(Default)]
struct Pages {
    users: HashMap<i64, UserPages>,
    bytes: usize,
}

impl Pages {
    fn remove_user(&mut self, user_id: i64) {
        if let Some(removed) = self.users.remove(&user_id) {
            self.bytes -= removed.bytes;
        }
    }
}

#[derive(Default)]
pub struct PageCache {
    inner: Mutex<Pages>,
    generation: AtomicU64,
    /// The database's erasure count the cached pages were read under
    /// (checked pages only; see `note_erasures`).
    erasures: AtomicI64,
}

impl PageCache {
    fn lock(&self) -> MutexGuard<'_, Pages> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Read before loading from the database; hand back to `insert`.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn get(&self, user_id: i64, key: &PageKey) -> Option<Arc<MessagePage>> {
        self.lock().users.get(&user_id)?.pages.get(key).cloned()
    }

    /// Stores a page read from the database, unless a write has been
    /// committed since `generation` was taken or the page is too large.
    pub fn insert(&self, user_id: i64, key: PageKey, page: MessagePage, generation: u64) {
        let bytes = page_bytes(&page);
        if bytes > MAX_PAGE_BYTES {
            return;
        }
        let mut cache = self.lock();
        if self.generation() != generation {
            return;
        }
        if cache
            .users
            .get(&user_id)
            .is_some_and(|user| user.pages.len() >= MAX_PAGES_PER_USER)
        {
            cache.remove_user(user_id);
        }
        // Room is made by dropping other users' pages, whichever come first.
        while cache.bytes + bytes > MAX_TOTAL_BYTES {
            let Some(evicted) = cache.users.keys().find(|id| **id != user_id).copied() else {
                break;
            };
            cache.remove_user(evicted);
        }
        let user = cache.users.entry(user_id).or_default();
        let replaced = user
            .pages
            .insert(key, Arc::new(page))
            .map_or(0, |old| page_bytes(&old));
        user.bytes = user.bytes + bytes - replaced;
        cache.bytes = cache.bytes + bytes - replaced;
    }

    /// Forgets the pages of users whose messages changed.
    pub fn forget(&self, user_ids: impl IntoIterator<Item = i64>) {
        let mut cache = self.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        for user_id in user_ids {
            cache.remove_user(user_id);
        }
    }

    /// Forgets every page once the database's erasure count moved: a
    /// DeleteUser removed messages from other users' pages without an event
    /// in their logs (PostgreSQL, whose pages are checked against the log).
    pub fn note_erasures(&self, erasures: i64) {
        // Stored as count + 1, so that the first note (0 in a new database) differs from the default.
        if self.erasures.swap(erasures + 1, Ordering::SeqCst) != erasures + 1 {
            self.clear();
        }
    }

    /// Forgets every page (a user and their messages were erased).
    pub fn clear(&self) {
        let mut cache = self.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        *cache = Pages::default();
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
            edited_at: None,
            reply_count: 0,
        }
    }

    fn page(messages: Vec<MessageRecord>) -> MessagePage {
        MessagePage {
            messages,
            last_event_id: 0,
        }
    }

    fn key() -> PageKey {
        PageKey::new(&MessageFilter::default(), 51)
    }

    #[test]
    fn a_stored_page_is_served_until_its_user_is_forgotten() {
        let cache = PageCache::default();
        cache.insert(2, key(), page(vec![message(1)]), cache.generation());
        assert_eq!(
            cache.get(2, &key()).map(|page| page.messages.len()),
            Some(1)
        );
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
        cache.insert(2, key(), page(vec![message(1)]), generation);
        assert!(cache.get(2, &key()).is_none());
    }

    #[test]
    fn filters_and_sizes_are_separate_pages() {
        let cache = PageCache::default();
        cache.insert(2, key(), page(vec![message(1)]), cache.generation());
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
        let big = |id: i64| MessageRecord {
            content: "x".repeat(16_000),
            ..message(id)
        };
        let full = page((0..50).map(big).collect());
        let bytes = page_bytes(&full);
        for user_id in 0..200 {
            cache.insert(user_id, key(), full.clone(), cache.generation());
            assert!(cache.lock().bytes <= MAX_TOTAL_BYTES);
        }
        assert!(cache.lock().users.len() >= MAX_TOTAL_BYTES / bytes - 1);
        let huge = page((0..100).map(big).collect());
        cache.insert(999, key(), huge, cache.generation());
        assert!(
            cache.get(999, &key()).is_none(),
            "a page over 1 MiB is not kept"
        );
        cache.clear();
        assert_eq!(cache.lock().bytes, 0);
    }

    #[test]
    fn byte_count_follows_replacements_and_removals() {
        let cache = PageCache::default();
        cache.insert(1, key(), page(vec![message(1)]), cache.generation());
        cache.insert(
            1,
            key(),
            page(vec![message(1), message(2)]),
            cache.generation(),
        );
        assert_eq!(
            cache.lock().bytes,
            page_bytes(&page(vec![message(1), message(2)]))
        );
        cache.forget([1]);
        assert_eq!(cache.lock().bytes, 0);
    }
}
