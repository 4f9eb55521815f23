//! Messages, conversations and their first pages. One SQL text for both
//! backends, expanded into each backend's store by `impl_repositories!`.

macro_rules! impl_message_repository {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::storage::MessageRepository for $store {
            async fn insert_message(
                &self,
                message: $crate::storage::NewMessage,
            ) -> $crate::storage::Result<$crate::storage::LoggedChange> {
                self.insert_messages(vec![message])
                    .await?
                    .pop()
                    .unwrap_or(Err($crate::storage::StorageError::NotFound("message")))
            }

            async fn insert_messages(
                &self,
                messages: Vec<$crate::storage::NewMessage>,
            ) -> $crate::storage::Result<Vec<$crate::storage::Result<$crate::storage::LoggedChange>>> {
                use std::collections::{BTreeMap, BTreeSet, HashMap};
                use $crate::storage::{LoggedChange, MessageChange, MessageRecord, StorageError, sql::{Plan, same_refusal}};
                if messages.is_empty() {
                    return Ok(Vec::new());
                }
                if let Some(answers) = self.send_in_one_statement(&messages).await {
                    return answers;
                }
                let mut tx = self.begin_write().await?;
                // Recipients are checked inside the transaction that stores
                // the messages, so none can be disabled in between.
                // The same read gives every participant's newest event id,
                // for a backend whose trigger logs the new messages (the
                // write lock taken at `begin_write` keeps it current).
                let ids: Vec<i64> = messages.iter().flat_map(|m| [m.recipient_id, m.sender_id]).collect::<BTreeSet<_>>().into_iter().collect();
                let participants = <$store>::read_participants(&mut *tx, &ids).await?;
                let active: HashMap<i64, bool> = participants.iter().map(|(id, active, _)| (*id, *active)).collect();
                let mut heads: HashMap<i64, i64> = participants.into_iter().map(|(id, _, head)| (id, head)).collect();
                let mut plans: Vec<$crate::storage::sql::Plan> = messages
                    .iter()
                    .map(|m| match active.get(&m.recipient_id) {
                        None => Plan::Refused(StorageError::NotFound("recipient")),
                        Some(false) => Plan::Refused(StorageError::RecipientDisabled),
                        Some(true) => Plan::Store,
                    })
                    .collect();
                claim_request_ids(&mut tx, &messages, &mut plans).await?;
                // Replies bump their parents' counts, which also tells which
                // parents still exist (and keeps them until the commit).
                let mut replies: BTreeMap<i64, i64> = BTreeMap::new();
                for (m, plan) in messages.iter().zip(&plans) {
                    if let (Plan::Store, Some(parent_id)) = (plan, m.parent_id) {
                        *replies.entry(parent_id).or_default() += 1;
                    }
                }
                if !replies.is_empty() {
                    let mut bump = sqlx::QueryBuilder::<$db>::new("UPDATE messages SET reply_count = reply_count + CASE id");
                    for (parent_id, count) in &replies {
                        bump.push(" WHEN ").push_bind(*parent_id).push(" THEN ").push_bind(*count);
                    }
                    bump.push(" ELSE 0 END WHERE id IN (");
                    let mut ids = bump.separated(", ");
                    for parent_id in replies.keys() {
                        ids.push_bind(*parent_id);
                    }
                    bump.push(") RETURNING id");
                    let parents: BTreeSet<i64> = bump.build_query_scalar::<i64>().fetch_all(&mut *tx).await?.into_iter().collect();
                    let mut orphans = Vec::new();
                    for (m, plan) in messages.iter().zip(plans.iter_mut()) {
                        if let (Plan::Store, Some(parent_id)) = (&*plan, m.parent_id) {
                            if !parents.contains(&parent_id) {
                                *plan = Plan::Refused(StorageError::NotFound("parent message"));
                                orphans.extend(m.request.as_ref().map(|r| (m.sender_id, r.request_id.clone())));
                            }
                        }
                    }
                    // A refused send leaves its request_id free for a retry.
                    if !orphans.is_empty() {
                        let mut free = sqlx::QueryBuilder::<$db>::new("DELETE FROM message_requests WHERE (sender_id, request_id) IN (");
                        let mut keys = free.separated(", ");
                        for (sender_id, request_id) in orphans {
                            keys.push("(").push_bind_unseparated(sender_id).push_unseparated(", ").push_bind_unseparated(request_id).push_unseparated(")");
                        }
                        free.push(")");
                        free.build().execute(&mut *tx).await?;
                    }
                }
                let accepted: Vec<&$crate::storage::NewMessage> = messages
                    .iter()
                    .zip(&plans)
                    .filter_map(|(m, plan)| matches!(plan, Plan::Store).then_some(m))
                    .collect();
                // One INSERT for the whole batch.
                // (On PostgreSQL the same over arrays, as its other batch
                // statements are, measured 15-25% slower in the send benchmark.)
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
                stored.sort_by_key(|m| m.id);
                let stored_ids = $crate::storage::sql::stored_ids_in_request_order(
                    &messages,
                    |index| matches!(plans[index], Plan::Store),
                    stored.iter(),
                );
                // The claimed request ids now name their messages.
                let named: Vec<(i64, &str, i64)> = messages
                    .iter()
                    .zip(&stored_ids)
                    .filter_map(|(m, id)| Some((m.sender_id, m.request.as_ref()?.request_id.as_str(), (*id)?)))
                    .collect();
                if !named.is_empty() {
                    let mut name = sqlx::QueryBuilder::<$db>::new("UPDATE message_requests SET message_id = v.column3 FROM (");
                    name.push_values(&named, |mut row, (sender_id, request_id, message_id)| {
                        row.push_bind(*sender_id).push_bind(request_id.to_string()).push_bind(*message_id);
                    });
                    name.push(") AS v WHERE message_requests.sender_id = v.column1 AND message_requests.request_id = v.column2");
                    name.build().execute(&mut *tx).await?;
                }
                <$store>::merge_conversation_rows(&mut *tx, &stored).await?;
                let now = messages.iter().map(|m| m.now).max().unwrap_or_default();
                let touched: Vec<i64> = stored.iter().flat_map(|m| [m.sender_id, m.recipient_id]).collect();
                let logged = if <$store>::LOGS_SENDS_BY_TRIGGER {
                    // The trigger gave each participant the next id, message
                    // by message in insertion (id) order, sender first.
                    stored
                        .into_iter()
                        .map(|message| {
                            let event_ids = message
                                .audience()
                                .map(|user_id| {
                                    let head = heads.entry(user_id).or_insert(0);
                                    *head += 1;
                                    (user_id, *head)
                                })
                                .collect();
                            LoggedChange { change: MessageChange::Created, message, event_ids }
                        })
                        .collect()
                } else {
                    log_changes(&mut tx, MessageChange::Created, stored, now).await?
                };
                let replayed = replayed_messages(&mut tx, &plans).await?;
                tx.commit().await?;
                if let Some(pages) = self.page_cache() {
                    pages.forget(touched);
                }
                let mut logged: HashMap<i64, LoggedChange> = logged.into_iter().map(|l| (l.message.id, l)).collect();
                let mut answers: Vec<$crate::storage::Result<LoggedChange>> = Vec::with_capacity(plans.len());
                for (index, (plan, stored_id)) in plans.into_iter().zip(stored_ids).enumerate() {
                    let answer = match plan {
                        Plan::Refused(error) => Err(error),
                        Plan::Store => stored_id
                            .and_then(|id| logged.remove(&id))
                            .ok_or(StorageError::NotFound("message")),
                        Plan::Replay { message_id } => replayed
                            .get(&message_id)
                            .map(|message| LoggedChange { change: MessageChange::Created, message: message.clone(), event_ids: Vec::new() })
                            .ok_or(StorageError::NotFound("message")),
                        Plan::SameAs(leader) => match answers.get(leader) {
                            Some(Ok(first)) => Ok(LoggedChange { event_ids: Vec::new(), ..first.clone() }),
                            Some(Err(error)) => Err(same_refusal(error)),
                            None => Err(StorageError::NotFound("message")),
                        },
                    };
                    debug_assert_eq!(answers.len(), index);
                    answers.push(answer);
                }
                Ok(answers)
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
            ) -> $crate::storage::Result<$crate::storage::MessagePage> {
                let cached = match self.page_cache() {
                    Some(pages) if before == $crate::storage::Before::START => {
                        let key = $crate::storage::page_cache::PageKey::new(filter, limit);
                        if !<$store>::PAGES_CHECKED_AGAINST_LOG {
                            if let Some(page) = pages.get(user_id, &key) {
                                return Ok(page.as_ref().clone());
                            }
                        }
                        Some((pages, key, pages.generation()))
                    }
                    _ => None,
                };
                // The position first: every event up to it is then in the page.
                let (last_event_id, erasures) = self.read_position(user_id).await?;
                // A page read since the user's newest event (and no erasure
                // since) is what a read now would return.
                if let Some((pages, key, _)) = &cached {
                    if <$store>::PAGES_CHECKED_AGAINST_LOG {
                        pages.note_erasures(erasures);
                        if let Some(page) = pages.get(user_id, key) {
                            if page.last_event_id == last_event_id {
                                return Ok(page.as_ref().clone());
                            }
                        }
                    }
                }
                let messages = query_messages(self.reader(), user_id, filter, before, limit).await?;
                let page = $crate::storage::MessagePage { messages, last_event_id };
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
            ) -> $crate::storage::Result<Vec<$crate::storage::LoggedChange>> {
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
                let changed = query.build_query_as().fetch_all(&mut *tx).await?;
                let logged = log_reads(&mut tx, recipient_id, changed, now).await?;
                tx.commit().await?;
                if let Some(pages) = self.page_cache() {
                    pages.forget(logged.iter().flat_map(|l| [l.message.sender_id, l.message.recipient_id]));
                }
                Ok(logged)
            }

            async fn mark_conversation_read(
                &self,
                recipient_id: i64,
                other_user_id: i64,
                conversation_id: &str,
                now: i64,
            ) -> $crate::storage::Result<Vec<$crate::storage::LoggedChange>> {
                let mut tx = self.begin_write().await?;
                // Rows are locked in id order, as MarkRead's id list locks
                // them, so the two never deadlock on PostgreSQL.
                let changed = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "UPDATE messages SET is_read = TRUE, read_at = $1 WHERE id IN \
                     (SELECT id FROM messages WHERE user_low = $2 AND user_high = $3 \
                     AND conversation_id = $4 AND recipient_id = $5 AND is_read = FALSE \
                     ORDER BY id{}) RETURNING *",
                    Self::ROW_LOCK
                )))
                .bind(now) // $1
                .bind(recipient_id.min(other_user_id)) // $2
                .bind(recipient_id.max(other_user_id)) // $3
                .bind(conversation_id) // $4
                .bind(recipient_id) // $5
                .fetch_all(&mut *tx)
                .await?;
                let logged = log_reads(&mut tx, recipient_id, changed, now).await?;
                tx.commit().await?;
                if let Some(pages) = self.page_cache() {
                    pages.forget([recipient_id, other_user_id]);
                }
                Ok(logged)
            }

            async fn delete_message(
                &self,
                message_id: i64,
                sender_id: i64,
                now: i64,
            ) -> $crate::storage::Result<Option<$crate::storage::LoggedChange>> {
                let mut tx = self.begin_write().await?;
                // The parent's count first: a parent is older than its reply,
                // so rows are locked in id order, as everywhere else.
                let parent: Option<Option<i64>> =
                    sqlx::query_scalar("SELECT parent_id FROM messages WHERE id = $1 AND sender_id = $2")
                        .bind(message_id) // $1
                        .bind(sender_id) // $2
                        .fetch_optional(&mut *tx)
                        .await?;
                let Some(parent) = parent else {
                    return Ok(None);
                };
                if let Some(parent_id) = parent {
                    sqlx::query("UPDATE messages SET reply_count = reply_count - 1 WHERE id = $1")
                        .bind(parent_id) // $1
                        .execute(&mut *tx)
                        .await?;
                }
                let deleted: Option<$crate::storage::MessageRecord> =
                    sqlx::query_as("DELETE FROM messages WHERE id = $1 AND sender_id = $2 RETURNING *")
                        .bind(message_id) // $1
                        .bind(sender_id) // $2
                        .fetch_optional(&mut *tx)
                        .await?;
                // Gone meanwhile, or its parent changed: nothing is kept.
                let Some(deleted) = deleted.filter(|deleted| deleted.parent_id == parent) else {
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
                let logged = log_changes(&mut tx, $crate::storage::MessageChange::Deleted, vec![deleted], now).await?;
                tx.commit().await?;
                if let Some(pages) = self.page_cache() {
                    pages.forget([sender, recipient]);
                }
                Ok(logged.into_iter().next())
            }

            async fn edit_message(
                &self,
                message_id: i64,
                sender_id: i64,
                content: &str,
                now: i64,
            ) -> $crate::storage::Result<Option<$crate::storage::LoggedChange>> {
                let mut tx = self.begin_write().await?;
                let edited: Option<$crate::storage::MessageRecord> = sqlx::query_as(
                    "UPDATE messages SET content = $3, edited_at = $4 WHERE id = $1 AND sender_id = $2 RETURNING *",
                )
                .bind(message_id) // $1
                .bind(sender_id) // $2
                .bind(content) // $3
                .bind(now) // $4
                .fetch_optional(&mut *tx)
                .await?;
                let Some(edited) = edited else {
                    return Ok(None);
                };
                let users = [edited.sender_id, edited.recipient_id];
                let logged = log_changes(&mut tx, $crate::storage::MessageChange::Edited, vec![edited], now).await?;
                tx.commit().await?;
                if let Some(pages) = self.page_cache() {
                    pages.forget(users);
                }
                Ok(logged.into_iter().next())
            }

            async fn unread_count(&self, user_id: i64) -> $crate::storage::Result<i64> {
                Ok(sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE recipient_id = $1 AND is_read = FALSE")
                    .bind(user_id) // $1
                    .fetch_one(self.reader())
                    .await?)
            }

            async fn search_messages(
                &self,
                user_id: i64,
                text: &str,
                before: $crate::storage::Before,
                limit: i64,
            ) -> $crate::storage::Result<Vec<$crate::storage::MessageRecord>> {
                let mut query = search_query("", user_id, text, before, limit);
                Ok(query.build_query_as().fetch_all(self.reader()).await?)
            }

            async fn explain_search(&self, user_id: i64, text: &str) -> $crate::storage::Result<String> {
                use sqlx::Row as _;
                let mut query = search_query(Self::EXPLAIN, user_id, text, $crate::storage::Before::START, 50);
                let rows = query.build().fetch_all(self.reader()).await?;
                // The plan's text is the last column on both backends.
                let mut plan = Vec::with_capacity(rows.len());
                for row in rows {
                    plan.push(row.try_get::<String, _>(row.len().saturating_sub(1))?);
                }
                Ok(plan.join("\n"))
            }

            async fn latest_event_id(&self, user_id: i64) -> $crate::storage::Result<i64> {
                let head: Option<i64> =
                    sqlx::query_scalar("SELECT last_event_id FROM message_event_heads WHERE user_id = $1")
                        .bind(user_id) // $1
                        .fetch_optional(self.reader())
                        .await?;
                Ok(head.unwrap_or(0))
            }

            async fn event_retained(
                &self,
                user_id: i64,
                event_id: i64,
                retained_since: i64,
            ) -> $crate::storage::Result<bool> {
                let found: Option<i64> = sqlx::query_scalar(
                    "SELECT event_id FROM message_events WHERE user_id = $1 AND event_id = $2 AND occurred_at >= $3",
                )
                .bind(user_id) // $1
                .bind(event_id) // $2
                .bind(retained_since) // $3
                .fetch_optional(self.reader())
                .await?;
                Ok(found.is_some())
            }

            async fn events_after(
                &self,
                user_id: i64,
                after_event_id: i64,
                limit: i64,
            ) -> $crate::storage::Result<Vec<$crate::storage::MessageEvent>> {
                #[derive(sqlx::FromRow)]
                struct Row {
                    event_id: i64,
                    kind: i32,
                    #[sqlx(flatten)]
                    message: $crate::storage::MessageRecord,
                }
                let rows: Vec<Row> = sqlx::query_as(
                    "SELECT event_id, kind, message_id AS id, sender_id, recipient_id, content, is_read, \
                     parent_id, conversation_id, created_at, read_at, edited_at, reply_count \
                     FROM message_events WHERE user_id = $1 AND event_id > $2 ORDER BY event_id LIMIT $3",
                )
                .bind(user_id) // $1
                .bind(after_event_id) // $2
                .bind(limit) // $3
                .fetch_all(self.reader())
                .await?;
                rows.into_iter()
                    .map(|row| {
                        let change = $crate::storage::MessageChange::from_stored(row.kind).ok_or_else(|| {
                            $crate::storage::StorageError::Internal(sqlx::Error::Decode("unknown message event kind".into()))
                        })?;
                        Ok($crate::storage::MessageEvent { event_id: row.event_id, change, message: row.message })
                    })
                    .collect()
            }

            async fn sweep_message_log(
                &self,
                events_before: i64,
                requests_before: i64,
            ) -> $crate::storage::Result<u64> {
                let mut tx = self.begin_write().await?;
                let events = sqlx::query("DELETE FROM message_events WHERE occurred_at < $1")
                    .bind(events_before) // $1
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                let requests = sqlx::query("DELETE FROM message_requests WHERE created_at < $1")
                    .bind(requests_before) // $1
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok(events + requests)
            }
        }

        /// SearchMessages' one query (after `prefix`, for EXPLAIN): the
        /// backend's text match, the caller's messages, one page.
        fn search_query(
            prefix: &str,
            user_id: i64,
            text: &str,
            before: $crate::storage::Before,
            limit: i64,
        ) -> sqlx::QueryBuilder<$db> {
            let mut query = sqlx::QueryBuilder::<$db>::new(prefix);
            query.push("SELECT * FROM messages WHERE ");
            <$store>::push_text_match(&mut query, text);
            // Unary plus keeps the planners off the sender and recipient
            // indexes (a scan of all the user's messages): the text index
            // drives, the user only filters its candidates.
            query
                .push(" AND (+sender_id = ")
                .push_bind(user_id)
                .push(" OR +recipient_id = ")
                .push_bind(user_id)
                .push(")");
            push_page(&mut query, before, limit);
            query
        }

        /// Logs `change` of each message (in the order given) in its
        /// audience's logs: the heads are bumped first, one row per user in
        /// user order (so concurrent writers never deadlock), and their row
        /// locks keep each user's ids in commit order; then the events are
        /// inserted with the ids handed out.
        async fn log_changes(
            conn: &mut <$db as sqlx::Database>::Connection,
            change: $crate::storage::MessageChange,
            messages: Vec<$crate::storage::MessageRecord>,
            now: i64,
        ) -> $crate::storage::Result<Vec<$crate::storage::LoggedChange>> {
            use std::collections::{BTreeMap, HashMap};
            if messages.is_empty() {
                return Ok(Vec::new());
            }
            let mut counts: BTreeMap<i64, i64> = BTreeMap::new();
            for message in &messages {
                for user_id in message.audience() {
                    *counts.entry(user_id).or_default() += 1;
                }
            }
            let heads = <$store>::bump_heads(&mut *conn, &counts).await?;
            let mut next: HashMap<i64, i64> = heads
                .into_iter()
                .map(|(user_id, last)| (user_id, last - counts.get(&user_id).copied().unwrap_or(0) + 1))
                .collect();
            let logged: Vec<$crate::storage::LoggedChange> = messages
                .into_iter()
                .map(|message| {
                    let event_ids = message
                        .audience()
                        .filter_map(|user_id| {
                            let next = next.get_mut(&user_id)?;
                            *next += 1;
                            Some((user_id, *next - 1))
                        })
                        .collect();
                    $crate::storage::LoggedChange { change, message, event_ids }
                })
                .collect();
            let rows: Vec<(i64, i64, &$crate::storage::MessageRecord)> = logged
                .iter()
                .flat_map(|l| l.event_ids.iter().map(move |(user_id, event_id)| (*user_id, *event_id, &l.message)))
                .collect();
            <$store>::insert_event_rows(&mut *conn, change, now, &rows).await?;
            Ok(logged)
        }

        /// After messages were marked read: one unread decrement per
        /// (sender, conversation) row, then a `Read` event per message, by id.
        async fn log_reads(
            conn: &mut <$db as sqlx::Database>::Connection,
            recipient_id: i64,
            mut changed: Vec<$crate::storage::MessageRecord>,
            now: i64,
        ) -> $crate::storage::Result<Vec<$crate::storage::LoggedChange>> {
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
                .execute(&mut *conn)
                .await?;
            }
            changed.sort_by_key(|message| message.id);
            log_changes(conn, $crate::storage::MessageChange::Read, changed, now).await
        }

        /// Claims the request ids of a batch: the first message with a key
        /// claims it (a key older than 24 hours is claimed anew), a later
        /// one in the batch answers as the first; a key another transaction
        /// holds turns its message into a replay of that one's answer. On
        /// PostgreSQL a claim waits for a concurrent transaction holding the
        /// same key to end, so concurrent retries never both store.
        async fn claim_request_ids(
            conn: &mut <$db as sqlx::Database>::Connection,
            messages: &[$crate::storage::NewMessage],
            plans: &mut [$crate::storage::sql::Plan],
        ) -> $crate::storage::Result<()> {
            use std::collections::{BTreeMap, BTreeSet};
            use $crate::storage::{StorageError, sql::Plan};
            let mut leaders: BTreeMap<(i64, &str), usize> = BTreeMap::new();
            for (index, message) in messages.iter().enumerate() {
                let Some(request) = &message.request else { continue };
                if !matches!(plans.get(index), Some(Plan::Store)) {
                    continue;
                }
                let key = (message.sender_id, request.request_id.as_str());
                match leaders.get(&key).and_then(|leader| messages.get(*leader).map(|m| (*leader, m))) {
                    Some((leader, first)) => {
                        let same = first.request.as_ref().is_some_and(|r| r.fingerprint == request.fingerprint);
                        if let Some(plan) = plans.get_mut(index) {
                            *plan = if same { Plan::SameAs(leader) } else { Plan::Refused(StorageError::RequestMismatch("request_id")) };
                        }
                    }
                    None => {
                        leaders.insert(key, index);
                    }
                }
            }
            if leaders.is_empty() {
                return Ok(());
            }
            let fingerprint = |index: &usize| {
                messages
                    .get(*index)
                    .and_then(|m| m.request.as_ref())
                    .map(|r| r.fingerprint.clone())
                    .unwrap_or_default()
            };
            let mut claim = sqlx::QueryBuilder::<$db>::new(
                "INSERT INTO message_requests (sender_id, request_id, fingerprint, message_id, created_at) ",
            );
            claim.push_values(&leaders, |mut row, ((sender_id, request_id), index)| {
                row.push_bind(*sender_id)
                    .push_bind(request_id.to_string())
                    .push_bind(fingerprint(index))
                    .push("NULL")
                    .push_bind(messages.get(*index).map(|m| m.now).unwrap_or_default());
            });
            claim
                .push(
                    " ON CONFLICT (sender_id, request_id) DO UPDATE SET fingerprint = excluded.fingerprint, \
                     message_id = NULL, created_at = excluded.created_at \
                     WHERE message_requests.created_at < excluded.created_at - ",
                )
                .push_bind($crate::storage::REQUEST_ID_LIFETIME_MICROS)
                .push(" RETURNING sender_id, request_id");
            let claimed: BTreeSet<(i64, String)> =
                claim.build_query_as::<(i64, String)>().fetch_all(&mut *conn).await?.into_iter().collect();
            let taken: Vec<((i64, &str), usize)> = leaders
                .into_iter()
                .filter(|((sender_id, request_id), _)| !claimed.contains(&(*sender_id, request_id.to_string())))
                .collect();
            if taken.is_empty() {
                return Ok(());
            }
            let mut lookup = sqlx::QueryBuilder::<$db>::new(
                "SELECT sender_id, request_id, fingerprint, message_id FROM message_requests \
                 WHERE (sender_id, request_id) IN (",
            );
            let mut keys = lookup.separated(", ");
            for ((sender_id, request_id), _) in &taken {
                keys.push("(")
                    .push_bind_unseparated(*sender_id)
                    .push_unseparated(", ")
                    .push_bind_unseparated(request_id.to_string())
                    .push_unseparated(")");
            }
            lookup.push(")");
            let held: std::collections::HashMap<(i64, String), (Vec<u8>, Option<i64>)> = lookup
                .build_query_as::<(i64, String, Vec<u8>, Option<i64>)>()
                .fetch_all(&mut *conn)
                .await?
                .into_iter()
                .map(|(sender_id, request_id, fingerprint, message_id)| ((sender_id, request_id), (fingerprint, message_id)))
                .collect();
            for ((sender_id, request_id), index) in taken {
                let verdict = match held.get(&(sender_id, request_id.to_string())) {
                    Some((stored, _)) if *stored != fingerprint(&index) => {
                        Plan::Refused(StorageError::RequestMismatch("request_id"))
                    }
                    Some((_, Some(message_id))) => Plan::Replay { message_id: *message_id },
                    // Its message was deleted (or the key vanished meanwhile).
                    _ => Plan::Refused(StorageError::NotFound("message")),
                };
                if let Some(plan) = plans.get_mut(index) {
                    *plan = verdict;
                }
            }
            Ok(())
        }

        /// The messages that replayed sends answer with, as they are now.
        async fn replayed_messages(
            conn: &mut <$db as sqlx::Database>::Connection,
            plans: &[$crate::storage::sql::Plan],
        ) -> $crate::storage::Result<std::collections::HashMap<i64, $crate::storage::MessageRecord>> {
            let ids: std::collections::BTreeSet<i64> = plans
                .iter()
                .filter_map(|plan| match plan {
                    $crate::storage::sql::Plan::Replay { message_id } => Some(*message_id),
                    _ => None,
                })
                .collect();
            if ids.is_empty() {
                return Ok(std::collections::HashMap::new());
            }
            let mut query = sqlx::QueryBuilder::<$db>::new("SELECT * FROM messages WHERE id IN (");
            let mut list = query.separated(", ");
            for id in ids {
                list.push_bind(id);
            }
            query.push(")");
            let found: Vec<$crate::storage::MessageRecord> = query.build_query_as().fetch_all(&mut *conn).await?;
            Ok(found.into_iter().map(|m| (m.id, m)).collect())
        }
    };
}
