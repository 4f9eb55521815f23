//! The SQL shared by both backends. SQLite and PostgreSQL both accept `$n`
//! placeholders, `RETURNING`, `TRUE`/`FALSE` and expression indexes, and both
//! store times as integer microseconds, so one text serves both. The macro
//! expands it into each backend's impl; each backend supplies `reader()`,
//! `writer()` and `begin_write()` (SQLite takes its write lock up front there),
//! and `page_cache()` (SQLite's first pages of ListMessages, or `None`).

//! One file per aggregate, each one macro: `impl_repositories!` expands them
//! all for a backend.

#[macro_use]
mod message_queries;
#[macro_use]
mod messages;
#[macro_use]
mod roles;
#[macro_use]
mod sessions;
#[macro_use]
mod throttle;
#[macro_use]
mod users;

/// Ends the live sessions that `$cond` selects (it may use `$3`, `$4` bound
/// to the trailing arguments) for `$reason`, inside the transaction `$tx`:
/// each one gets its row in the revocation log, then `is_active` false,
/// `revoked_at` and `end_reason`. Evaluates to how many ended.
macro_rules! end_sessions {
    ($store:expr, $tx:expr, $reason:expr, $now:expr, $cond:literal $(, $bind:expr)* $(,)?) => {{
        $store.lock_revocation_log(&mut *$tx).await?;
        sqlx::query(concat!(
            "INSERT INTO revocations (session_id, user_id, reason, revoked_at) \
             SELECT id, user_id, $1, $2 FROM sessions \
             WHERE is_active AND expires_at > $2 AND ",
            $cond
        ))
        .bind($reason as i32) // $1
        .bind($now) // $2
        $(.bind($bind))*
        .execute(&mut *$tx)
        .await?;
        sqlx::query(concat!(
            "UPDATE sessions SET is_active = FALSE, revoked_at = $2, end_reason = $1 \
             WHERE is_active AND expires_at > $2 AND ",
            $cond
        ))
        .bind($reason as i32) // $1
        .bind($now) // $2
        $(.bind($bind))*
        .execute(&mut *$tx)
        .await?
        .rows_affected()
    }};
}

macro_rules! impl_repositories {
    ($store:ty, $db:ty) => {
        impl_user_repository!($store, $db);
        impl_role_repository!($store, $db);
        impl_session_repository!($store, $db);
        impl_message_queries!($store, $db);
        impl_message_repository!($store, $db);
        impl_throttle_repository!($store, $db);
    };
}

/// Adds each user's count of new events to their head and answers the new
/// heads (`RETURNING user_id, last_event_id`).
pub(crate) const HEAD_BUMP_CONFLICT: &str = " ON CONFLICT (user_id) DO UPDATE SET \
     last_event_id = message_event_heads.last_event_id + excluded.last_event_id \
     RETURNING user_id, last_event_id";

/// Each message's id among `stored` (in id order), or `None` where it was
/// not stored or `stores(index)` says it was not to be. RETURNING gives no
/// row order, so rows are matched back by their content; of equal
/// messages, the earlier one gets the lower id.
pub(crate) fn stored_ids_in_request_order<'a>(
    messages: &'a [super::NewMessage],
    stores: impl Fn(usize) -> bool,
    stored: impl DoubleEndedIterator<Item = &'a super::MessageRecord>,
) -> Vec<Option<i64>> {
    let mut by_content: std::collections::HashMap<_, Vec<i64>> = std::collections::HashMap::new();
    for r in stored.rev() {
        let ids = (r.sender_id, r.recipient_id, r.parent_id, r.created_at);
        let key = (ids, r.content.as_str(), r.conversation_id.as_str());
        by_content.entry(key).or_default().push(r.id);
    }
    let mut ids_in_order = Vec::with_capacity(messages.len());
    for (index, m) in messages.iter().enumerate() {
        let ids = (m.sender_id, m.recipient_id, m.parent_id, m.now);
        let key = (ids, m.content.as_str(), m.conversation_id.as_str());
        let id = stores(index).then(|| by_content.get_mut(&key).and_then(Vec::pop));
        ids_in_order.push(id.flatten());
    }
    ids_in_order
}

/// What a batch does with each message it was handed.
pub(crate) enum Plan {
    /// Store it (so far: later checks may still refuse it).
    Store,
    /// Refused, alone.
    Refused(super::StorageError),
    /// A retry of a send stored before: answer with that message.
    Replay { message_id: i64 },
    /// A retry of the batch's message at this index: the same answer.
    SameAs(usize),
}

/// The refusal of a batch's first message, again for its retry in the same
/// batch (errors carrying a driver error are never per-message refusals).
pub(crate) fn same_refusal(error: &super::StorageError) -> super::StorageError {
    use super::StorageError::{Conflict, NotFound, RecipientDisabled, RequestMismatch};
    match error {
        Conflict(field) => Conflict(field),
        NotFound(what) => NotFound(what),
        RecipientDisabled => RecipientDisabled,
        RequestMismatch(field) => RequestMismatch(field),
        _ => NotFound("message"),
    }
}

/// `query` as a LIKE pattern that finds it anywhere, with only ASCII
/// letters lower-cased (SearchMessages ignores ASCII case, no other) and
/// `%`, `_` and `\\` escaped.
pub(crate) fn ascii_substring_pattern(query: &str) -> String {
    let mut pattern = String::with_capacity(query.len() + 2);
    pattern.push('%');
    for c in query.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c.to_ascii_lowercase());
    }
    pattern.push('%');
    pattern
}

/// `query` as an FTS5 phrase: in double quotes, inner quotes doubled.
pub(crate) fn fts_phrase(query: &str) -> String {
    format!("\"{}\"", query.replace('"', "\"\""))
}

/// `query` as a LIKE pattern body, lower-cased, with `%`, `_` and `\\` escaped.
pub(crate) fn like_pattern(query: &str) -> String {
    let mut pattern = String::with_capacity(query.len());
    for c in query.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern
}

pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|db| db.is_unique_violation())
}

#[cfg(test)]
mod tests {
    #[test]
    fn search_patterns_fold_ascii_only_and_escape_wildcards() {
        assert_eq!(super::ascii_substring_pattern("AbÉ_%"), "%abÉ\\_\\%%");
        assert_eq!(super::fts_phrase("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn like_patterns_escape_their_wildcards() {
        assert_eq!(super::like_pattern("A_b%c\\d"), "a\\_b\\%c\\\\d");
    }
}
