//! Messages, conversations and their first pages. One SQL text for both
//! backends, expanded into each backend's store by `impl_repositories!`.

macro_rules! impl_message_repository {
    ($store:ty, $db:ty) => {
        /// Merges a new newest message and unread count into a participant's
        /// conversation row: the newer of the two last messages wins.
        const MEMBER_UPSERT_CONFLICT: &str =
            " ON CONFLICT (user_id, other_user_id, conversation_id) DO UPDATE SET \
             last_message_id = CASE WHEN (excluded.last_created_at, excluded.last_message_id) \
             > (conversation_members.last_created_at, conversation_members.last_message_id) \
             THEN excluded.last_message_id ELSE conversation_members.last_message_id END, \
             last_created_at = CASE WHEN (excluded.last_created_at, excluded.last_message_id) \
             > (conversation_members.last_created_at, conversation_members.last_message_id) \
             THEN excluded.last_created_at ELSE conversation_members.last_created_at END, \
             unread_count = conversation_members.unread_count + excluded.unread_count";

        #[async_trait::async_trait]
        impl $crate::storage::MessageRepository for $store {
            async fn insert_message(
                &self,
                message: $crate::storage::NewMessage,
            ) -> $crate::storage::Result<$crate::storage::MessageRecord> {
                self.insert_messages(vec![message])
                    .await?
                    .pop()
                    .unwrap_or(Err($crate::storage::StorageError::NotFound("message")))
            }

            async fn insert_messages(
                &self,
                messages: Vec<$crate::storage::NewMessage>,
            ) -> $crate::storage::Result<Vec<$crate::storage::Result<$crate::storage::MessageRecord>>> {
                use $crate::storage::{MessageRecord, StorageError};
                if messages.is_empty() {
                    return Ok(Vec::new());
                }
                let mut tx = self.begin_write().await?;
                // Recipients are checked inside the transaction that stores
                // the messages, so none can be disabled in between.
                let mut recipients = sqlx::QueryBuilder::<$db>::new("SELECT id, is_active FROM users WHERE id IN (");
                let mut ids = recipients.separated(", ");
                for recipient_id in messages.iter().map(|m| m.recipient_id).collect::<std::collections::BTreeSet<_>>() {
                    ids.push_bind(recipient_id);
                }
                recipients.push(")");
                let active: std::collections::HashMap<i64, bool> =
                    recipients.build_query_as::<(i64, bool)>().fetch_all(&mut *tx).await?.into_iter().collect();
                let verdicts: Vec<std::result::Result<(), StorageError>> = messages
                    .iter()
                    .map(|m| match active.get(&m.recipient_id) {
                        None => Err(StorageError::NotFound("recipient")),
                        Some(false) => Err(StorageError::RecipientDisabled),
                        Some(true) => Ok(()),
                    })
                    .collect();
                let accepted: Vec<&$crate::storage::NewMessage> = messages
                    .iter()
                    .zip(&verdicts)
                    .filter_map(|(m, verdict)| verdict.is_ok().then_some(m))
                    .collect();
                // One INSERT for the whole batch. RETURNING gives no row order,
                // so each row is matched back to its request by its content.
                let mut stored: Vec<MessageRecord> = Vec::with_capacity(accepted.len());
                if !accepted.is_empty() {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO messages (sender_id, recipient_id, content, is_read, parent_id, \
                         conversation_id, created_at, user_low, user_high) ",
                    );
                    insert.push_values(&accepted, |mut row, m| {
                        row.push_bind(m.sender_id)
                            .push_bind(m.recipient_id)
                            .push_bind(m.content.clone())
                            .push("FALSE")
                            .push_bind(m.parent_id)
                            .push_bind(m.conversation_id.clone())
                            .push_bind(m.now)
                            .push_bind(m.sender_id.min(m.recipient_id))
                            .push_bind(m.sender_id.max(m.recipient_id));
                    });
                    insert.push(" RETURNING *");
                    stored = insert.build_query_as().fetch_all(&mut *tx).await?;
                }
                // One upsert row per participant: the newest message and the
                // unread messages it gained. Rows come in key order, the same
                // in every transaction, so concurrent writers of one
                // conversation cannot deadlock on PostgreSQL.
                let mut members: std::collections::BTreeMap<(i64, i64, &str), (&MessageRecord, i64)> =
                    std::collections::BTreeMap::new();
                for record in &stored {
                    let (sender, recipient) = (record.sender_id, record.recipient_id);
                    let mut views = vec![(recipient, sender, 1)];
                    if sender != recipient {
                        views.push((sender, recipient, 0));
                    }
                    for (user_id, other_user_id, unread) in views {
                        let entry = members
                            .entry((user_id, other_user_id, record.conversation_id.as_str()))
                            .or_insert((record, 0));
                        if (record.created_at, record.id) > (entry.0.created_at, entry.0.id) {
                            entry.0 = record;
                        }
                        entry.1 += unread;
                    }
                }
                if !members.is_empty() {
                    let mut upsert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO conversation_members (user_id, other_user_id, conversation_id, \
                         last_message_id, last_created_at, unread_count) ",
                    );
                    upsert.push_values(&members, |mut row, ((user_id, other_user_id, conversation_id), (newest, unread))| {
                        row.push_bind(*user_id)
                            .push_bind(*other_user_id)
                            .push_bind(conversation_id.to_string())
                            .push_bind(newest.id)
                            .push_bind(newest.created_at)
                            .push_bind(*unread);
                    });
                    upsert.push(MEMBER_UPSERT_CONFLICT);
                    upsert.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                if let Some(pages) = self.page_cache() {
                    pages.forget(stored.iter().flat_map(|m| [m.sender_id, m.recipient_id]));
                }
                // Back to request order.
                let mut by_content: std::collections::HashMap<_, Vec<MessageRecord>> =
                    std::collections::HashMap::new();
                for record in stored {
                    let key = (record.sender_id, record.recipient_id, record.content.clone(),
                        record.parent_id, record.conversation_id.clone(), record.created_at);
                    by_content.entry(key).or_default().push(record);
                }
                Ok(messages
                    .into_iter()
                    .zip(verdicts)
                    .map(|(m, verdict)| {
                        verdict?;
                        let key = (m.sender_id, m.recipient_id, m.content, m.parent_id, m.conversation_id, m.now);
                        by_content
                            .get_mut(&key)
                            .and_then(Vec::pop)
                            .ok_or(StorageError::NotFound("message"))
                    })
                    .collect())
            }

            async fn find_message(
                &self,
                message_id: i64,
            ) -> $crate::storage::Result<Option<$crate::storage::MessageRecord>> {
                Ok(sqlx::query_as("SELECT * FROM messages WHERE id = $1")
                    .bind(message_id) // $1
                    .fetch_optional(self.reader())
                    .await?)
            }

            async fn list_messages(
                &self,
                user_id: i64,
                filter: &$crate::storage::MessageFilter,
                before: $crate::storage::Before,
                limit: i64,
            ) -> $crate::storage::Result<Vec<$crate::storage::MessageRecord>> {
                let cached = match self.page_cache() {
                    Some(pages) if before == $crate::storage::Before::START => {
                        let key = $crate::storage::page_cache::PageKey::new(filter, limit);
                        if let Some(page) = pages.get(user_id, &key) {
                            return Ok(page.as_ref().clone());
                        }
                        Some((pages, key, pages.generation()))
                    }
                    _ => None,
                };
                let page = query_messages(self.reader(), user_id, filter, before, limit).await?;
                if let Some((pages, key, generation)) = cached {
                    pages.insert(user_id, key, page.clone(), generation);
                }
                Ok(page)
            }


            async fn list_conversations(
                &self,
                user_id: i64,
                before: $crate::storage::Before,
                limit: i64,
            ) -> $crate::storage::Result<Vec<$crate::storage::ConversationRecord>> {
                #[derive(sqlx::FromRow)]
                struct Row {
                    member_other_user_id: i64,
                    member_unread_count: i64,
                    #[sqlx(flatten)]
                    message: $crate::storage::MessageRecord,
                }
                let rows: Vec<Row> = sqlx::query_as(
                    "SELECT cm.other_user_id AS member_other_user_id, \
                     cm.unread_count AS member_unread_count, m.* \
                     FROM conversation_members cm JOIN messages m ON m.id = cm.last_message_id \
                     WHERE cm.user_id = $1 AND (cm.last_created_at, cm.last_message_id) < ($2, $3) \
                     ORDER BY cm.last_created_at DESC, cm.last_message_id DESC LIMIT $4",
                )
                .bind(user_id) // $1
                .bind(before.created_at) // $2
                .bind(before.id) // $3
                .bind(limit) // $4
                .fetch_all(self.reader())
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|row| $crate::storage::ConversationRecord {
                        other_user_id: row.member_other_user_id,
                        unread_count: row.member_unread_count,
                        last_message: row.message,
                    })
                    .collect())
            }

            async fn mark_read(
                &self,
                recipient_id: i64,
                message_ids: &[i64],
                now: i64,
            ) -> $crate::storage::Result<Vec<$crate::storage::MessageRecord>> {
                if message_ids.is_empty() {
                    return Ok(Vec::new());
                }
                let mut tx = self.begin_write().await?;
                let mut query = sqlx::QueryBuilder::<$db>::new("UPDATE messages SET is_read = TRUE, read_at = ");
                query
                    .push_bind(now)
                    .push(" WHERE recipient_id = ")
                    .push_bind(recipient_id)
                    .push(" AND is_read = FALSE AND id IN (");
                let mut ids = query.separated(", ");
                for id in message_ids {
                    ids.push_bind(*id);
                }
                query.push(") RETURNING *");
                let mut changed: Vec<$crate::storage::MessageRecord> =
                    query.build_query_as().fetch_all(&mut *tx).await?;
                // One decrement per (sender, conversation) row.
                let mut per_conversation: std::collections::BTreeMap<(i64, String), i64> =
                    std::collections::BTreeMap::new();
                for message in &changed {
                    *per_conversation
                        .entry((message.sender_id, message.conversation_id.clone()))
                        .or_default() += 1;
                }
                for ((sender_id, conversation_id), count) in per_conversation {
                    sqlx::query(
                        "UPDATE conversation_members SET unread_count = unread_count - $4 \
                         WHERE user_id = $1 AND other_user_id = $2 AND conversation_id = $3",
                    )
                    .bind(recipient_id) // $1
                    .bind(sender_id) // $2
                    .bind(conversation_id) // $3
                    .bind(count) // $4
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                if let Some(pages) = self.page_cache() {
                    pages.forget(changed.iter().flat_map(|m| [m.sender_id, m.recipient_id]));
                }
                changed.sort_by_key(|message| message.id);
                Ok(changed)
            }

            async fn delete_message(
                &self,
                message_id: i64,
                sender_id: i64,
            ) -> $crate::storage::Result<Option<$crate::storage::MessageRecord>> {
                let mut tx = self.begin_write().await?;
                let deleted: Option<$crate::storage::MessageRecord> =
                    sqlx::query_as("DELETE FROM messages WHERE id = $1 AND sender_id = $2 RETURNING *")
                        .bind(message_id) // $1
                        .bind(sender_id) // $2
                        .fetch_optional(&mut *tx)
                        .await?;
                let Some(deleted) = deleted else {
                    return Ok(None);
                };
                let (sender, recipient) = (deleted.sender_id, deleted.recipient_id);
                if !deleted.is_read {
                    sqlx::query(
                        "UPDATE conversation_members SET unread_count = unread_count - 1 \
                         WHERE user_id = $1 AND other_user_id = $2 AND conversation_id = $3",
                    )
                    .bind(recipient) // $1
                    .bind(sender) // $2
                    .bind(&deleted.conversation_id) // $3
                    .execute(&mut *tx)
                    .await?;
                }
                let newest: Option<(i64, i64)> = sqlx::query_as(
                    "SELECT id, created_at FROM messages WHERE user_low = $1 AND user_high = $2 \
                     AND conversation_id = $3 ORDER BY created_at DESC, id DESC LIMIT 1",
                )
                .bind(sender.min(recipient)) // $1
                .bind(sender.max(recipient)) // $2
                .bind(&deleted.conversation_id) // $3
                .fetch_optional(&mut *tx)
                .await?;
                match newest {
                    Some((last_id, last_created_at)) => {
                        sqlx::query(
                            "UPDATE conversation_members SET last_message_id = $4, last_created_at = $5 \
                             WHERE conversation_id = $3 AND last_message_id = $6 \
                             AND ((user_id = $1 AND other_user_id = $2) OR (user_id = $2 AND other_user_id = $1))",
                        )
                        .bind(sender) // $1
                        .bind(recipient) // $2
                        .bind(&deleted.conversation_id) // $3
                        .bind(last_id) // $4
                        .bind(last_created_at) // $5
                        .bind(deleted.id) // $6
                        .execute(&mut *tx)
                        .await?;
                    }
                    None => {
                        sqlx::query(
                            "DELETE FROM conversation_members WHERE conversation_id = $3 \
                             AND ((user_id = $1 AND other_user_id = $2) OR (user_id = $2 AND other_user_id = $1))",
                        )
                        .bind(sender) // $1
                        .bind(recipient) // $2
                        .bind(&deleted.conversation_id) // $3
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                tx.commit().await?;
                if let Some(pages) = self.page_cache() {
                    pages.forget([deleted.sender_id, deleted.recipient_id]);
                }
                Ok(Some(deleted))
            }
        }
    };
}
