//! The one read behind ListMessages: a page of a user's messages, newest
//! first, each filter served by one index range scan. One SQL text for both
//! backends, expanded into each backend's store by `impl_repositories!`.

macro_rules! impl_message_queries {
    ($store:ty, $db:ty) => {
        /// One page of the user's messages, newest first, straight from the database.
        async fn query_messages(
            pool: &sqlx::Pool<$db>,
            user_id: i64,
            filter: &$crate::storage::MessageFilter,
            before: $crate::storage::Before,
            limit: i64,
        ) -> $crate::storage::Result<Vec<$crate::storage::MessageRecord>> {
            // Each branch is one range scan of one index, newest first:
            // (user_low, user_high[, conversation_id], created_at, id) for a
            // pair, the partial unread index, or sender and recipient
            // indexes merged.
            let conversation = |query: &mut sqlx::QueryBuilder<$db>| {
                if let Some(conversation_id) = &filter.conversation_id {
                    query.push(" AND conversation_id = ").push_bind(conversation_id.clone());
                }
            };
            let mut query = sqlx::QueryBuilder::<$db>::new("");
            if let Some(parent_id) = filter.parent_id {
                // A thread: one range scan of (parent_id, created_at, id);
                // the other filters only narrow it.
                query
                    .push("SELECT * FROM messages WHERE parent_id = ")
                    .push_bind(parent_id)
                    .push(" AND (sender_id = ")
                    .push_bind(user_id)
                    .push(" OR recipient_id = ")
                    .push_bind(user_id)
                    .push(")");
                if let Some(other) = filter.with_user_id {
                    query
                        .push(" AND user_low = ")
                        .push_bind(user_id.min(other))
                        .push(" AND user_high = ")
                        .push_bind(user_id.max(other));
                }
                conversation(&mut query);
                if filter.unread_only {
                    query
                        .push(" AND recipient_id = ")
                        .push_bind(user_id)
                        .push(" AND is_read = FALSE");
                }
                push_page(&mut query, before, limit);
                return Ok(query.build_query_as().fetch_all(pool).await?);
            }
            match (filter.with_user_id, filter.unread_only) {
                (Some(other), unread_only) => {
                    query
                        .push("SELECT * FROM messages WHERE user_low = ")
                        .push_bind(user_id.min(other))
                        .push(" AND user_high = ")
                        .push_bind(user_id.max(other));
                    conversation(&mut query);
                    if unread_only {
                        query
                            .push(" AND recipient_id = ")
                            .push_bind(user_id)
                            .push(" AND is_read = FALSE");
                    }
                    push_page(&mut query, before, limit);
                }
                (None, true) => {
                    query
                        .push("SELECT * FROM messages WHERE recipient_id = ")
                        .push_bind(user_id)
                        .push(" AND is_read = FALSE");
                    conversation(&mut query);
                    push_page(&mut query, before, limit);
                }
                (None, false) => {
                    query
                        .push("SELECT * FROM (SELECT * FROM messages WHERE sender_id = ")
                        .push_bind(user_id);
                    conversation(&mut query);
                    push_page(&mut query, before, limit);
                    // A note to oneself is in both branches: keep it in the first.
                    query
                        .push(") AS sent UNION ALL SELECT * FROM (SELECT * FROM messages WHERE recipient_id = ")
                        .push_bind(user_id)
                        .push(" AND sender_id <> ")
                        .push_bind(user_id);
                    conversation(&mut query);
                    push_page(&mut query, before, limit);
                    query
                        .push(") AS received ORDER BY created_at DESC, id DESC LIMIT ")
                        .push_bind(limit);
                }
            }
            Ok(query.build_query_as().fetch_all(pool).await?)
        }

        /// Appends `AND (created_at, id) < before ORDER BY ... LIMIT n`.
        fn push_page(
            query: &mut sqlx::QueryBuilder<$db>,
            before: $crate::storage::Before,
            limit: i64,
        ) {
            query
                .push(" AND (created_at, id) < (")
                .push_bind(before.created_at)
                .push(", ")
                .push_bind(before.id)
                .push(") ORDER BY created_at DESC, id DESC LIMIT ")
                .push_bind(limit);
        }
    };
}
