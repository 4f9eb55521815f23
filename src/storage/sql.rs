//! The SQL shared by both backends. SQLite and PostgreSQL both accept `$n`
//! placeholders, `RETURNING`, `TRUE`/`FALSE` and expression indexes, and both
//! store times as integer microseconds, so one text serves both. The macro
//! expands it into each backend's impl; each backend supplies `reader()`,
//! `writer()` and `begin_write()` (SQLite takes its write lock up front there),
//! and `page_cache()` (SQLite's first pages of ListMessages, or `None`).

macro_rules! impl_repositories {
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

        /// Fails with `NotFound("user")` unless the user exists.
        async fn require_user(
            conn: &mut <$db as sqlx::Database>::Connection,
            user_id: i64,
        ) -> $crate::storage::Result<()> {
            let exists: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE id = $1")
                .bind(user_id) // $1
                .fetch_one(&mut *conn)
                .await?;
            if exists == 0 {
                return Err($crate::storage::StorageError::NotFound("user"));
            }
            Ok(())
        }

        /// The user's roles, ordered by name.
        async fn roles_of(
            conn: &mut <$db as sqlx::Database>::Connection,
            user_id: i64,
        ) -> $crate::storage::Result<Vec<$crate::storage::RoleRecord>> {
            Ok(sqlx::query_as(
                "SELECT r.id, r.name, r.description, r.created_at FROM roles r \
                 JOIN user_roles ur ON ur.role_id = r.id WHERE ur.user_id = $1 ORDER BY r.name",
            )
            .bind(user_id) // $1
            .fetch_all(&mut *conn)
            .await?)
        }

        impl $store {
            /// Which unique field a failed insert or update collided with.
            async fn conflicting_field(&self, username: Option<&str>) -> $crate::storage::StorageError {
                if let Some(username) = username {
                    let taken: Result<i64, sqlx::Error> = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM users WHERE lower(username) = lower($1)",
                    )
                    .bind(username) // $1
                    .fetch_one(self.reader())
                    .await;
                    match taken {
                        Ok(count) if count > 0 => return $crate::storage::StorageError::Conflict("username"),
                        Ok(_) => {}
                        Err(error) => return error.into(),
                    }
                }
                $crate::storage::StorageError::Conflict("email")
            }
        }

        /// `query` as a LIKE pattern body, lower-cased, with `%`, `_` and `\\` escaped.
        fn like_pattern(query: &str) -> String {
            let mut pattern = String::with_capacity(query.len());
            for c in query.to_lowercase().chars() {
                if matches!(c, '%' | '_' | '\\') {
                    pattern.push('\\');
                }
                pattern.push(c);
            }
            pattern
        }

        fn is_unique_violation(error: &sqlx::Error) -> bool {
            error
                .as_database_error()
                .is_some_and(|db| db.is_unique_violation())
        }

        #[async_trait::async_trait]
        impl $crate::storage::UserRepository for $store {
            async fn create_user(
                &self,
                user: $crate::storage::NewUser,
            ) -> $crate::storage::Result<$crate::storage::UserRecord> {
                let inserted = sqlx::query_as::<_, $crate::storage::UserRecord>(
                    "INSERT INTO users (username, email, password_hash, full_name, is_superuser, \
                     is_active, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, TRUE, $6, $6) RETURNING *",
                )
                .bind(&user.username) // $1
                .bind(&user.email) // $2
                .bind(&user.password_hash) // $3
                .bind(&user.full_name) // $4
                .bind(user.is_superuser) // $5
                .bind(user.now) // $6
                .fetch_one(self.writer())
                .await;
                match inserted {
                    Err(error) if is_unique_violation(&error) => {
                        Err(self.conflicting_field(Some(&user.username)).await)
                    }
                    other => Ok(other?),
                }
            }

            async fn find_user(
                &self,
                user_id: i64,
            ) -> $crate::storage::Result<Option<$crate::storage::UserRecord>> {
                Ok(sqlx::query_as("SELECT * FROM users WHERE id = $1")
                    .bind(user_id) // $1
                    .fetch_optional(self.reader())
                    .await?)
            }

            async fn find_user_by_login(
                &self,
                login: &str,
            ) -> $crate::storage::Result<Option<$crate::storage::UserRecord>> {
                // Two index lookups (lower(username), lower(email)), one round trip.
                Ok(sqlx::query_as(
                    "SELECT * FROM users WHERE lower(username) = lower($1) \
                     UNION ALL SELECT * FROM users WHERE lower(email) = lower($1) LIMIT 1",
                )
                .bind(login) // $1
                .fetch_optional(self.reader())
                .await?)
            }

            async fn update_profile(
                &self,
                user_id: i64,
                changes: $crate::storage::ProfileChanges,
                now: i64,
            ) -> $crate::storage::Result<$crate::storage::UserRecord> {
                let updated = sqlx::query_as::<_, $crate::storage::UserRecord>(
                    "UPDATE users SET email = COALESCE($2, email), \
                     full_name = COALESCE($3, full_name), bio = COALESCE($4, bio), \
                     updated_at = $5 WHERE id = $1 RETURNING *",
                )
                .bind(user_id) // $1
                .bind(&changes.email) // $2
                .bind(&changes.full_name) // $3
                .bind(&changes.bio) // $4
                .bind(now) // $5
                .fetch_optional(self.writer())
                .await;
                match updated {
                    Err(error) if is_unique_violation(&error) => Err(self.conflicting_field(None).await),
                    other => other?.ok_or($crate::storage::StorageError::NotFound("user")),
                }
            }

            async fn change_password(
                &self,
                user_id: i64,
                password_hash: &str,
                keep_session_id: i64,
                now: i64,
            ) -> $crate::storage::Result<()> {
                let mut tx = self.begin_write().await?;
                let changed = sqlx::query(
                    "UPDATE users SET password_hash = $2, updated_at = $3 WHERE id = $1",
                )
                .bind(user_id) // $1
                .bind(password_hash) // $2
                .bind(now) // $3
                .execute(&mut *tx)
                .await?;
                if changed.rows_affected() == 0 {
                    return Err($crate::storage::StorageError::NotFound("user"));
                }
                sqlx::query(
                    "UPDATE sessions SET is_active = FALSE, revoked_at = $3 \
                     WHERE user_id = $1 AND id <> $2 AND is_active",
                )
                .bind(user_id) // $1
                .bind(keep_session_id) // $2
                .bind(now) // $3
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn list_users(
                &self,
                query: &str,
                after_id: i64,
                limit: i64,
            ) -> $crate::storage::Result<Vec<$crate::storage::UserRecord>> {
                Ok(sqlx::query_as(
                    "SELECT * FROM users WHERE id > $1 AND ($2 = '' \
                     OR lower(username) LIKE '%' || $3 || '%' ESCAPE '\\' \
                     OR lower(email) LIKE '%' || $3 || '%' ESCAPE '\\') \
                     ORDER BY id LIMIT $4",
                )
                .bind(after_id) // $1
                .bind(query) // $2
                .bind(like_pattern(query)) // $3
                .bind(limit) // $4
                .fetch_all(self.reader())
                .await?)
            }

            async fn count_users(&self, query: &str) -> $crate::storage::Result<i64> {
                Ok(sqlx::query_scalar(
                    "SELECT COUNT(*) FROM users WHERE $1 = '' \
                     OR lower(username) LIKE '%' || $2 || '%' ESCAPE '\\' \
                     OR lower(email) LIKE '%' || $2 || '%' ESCAPE '\\'",
                )
                .bind(query) // $1
                .bind(like_pattern(query)) // $2
                .fetch_one(self.reader())
                .await?)
            }

            async fn role_names_in_id_range(
                &self,
                first_id: i64,
                last_id: i64,
            ) -> $crate::storage::Result<Vec<(i64, String)>> {
                Ok(sqlx::query_as(
                    "SELECT ur.user_id, r.name FROM user_roles ur JOIN roles r ON r.id = ur.role_id \
                     WHERE ur.user_id BETWEEN $1 AND $2 ORDER BY r.name",
                )
                .bind(first_id) // $1
                .bind(last_id) // $2
                .fetch_all(self.reader())
                .await?)
            }

            async fn delete_user(&self, user_id: i64) -> $crate::storage::Result<()> {
                let mut tx = self.begin_write().await?;
                // Children first, explicitly, so the outcome does not hang on
                // cascade settings; messages go with their sender or recipient.
                for statement in [
                    "DELETE FROM conversation_members WHERE user_id = $1 OR other_user_id = $1",
                    "DELETE FROM refresh_tokens WHERE user_id = $1",
                    "DELETE FROM sessions WHERE user_id = $1",
                    "DELETE FROM user_roles WHERE user_id = $1",
                    "DELETE FROM messages WHERE sender_id = $1 OR recipient_id = $1",
                ] {
                    sqlx::query(statement)
                        .bind(user_id) // $1
                        .execute(&mut *tx)
                        .await?;
                }
                let deleted = sqlx::query("DELETE FROM users WHERE id = $1")
                    .bind(user_id) // $1
                    .execute(&mut *tx)
                    .await?;
                if deleted.rows_affected() == 0 {
                    return Err($crate::storage::StorageError::NotFound("user"));
                }
                tx.commit().await?;
                // Their messages left other users' pages too.
                if let Some(pages) = self.page_cache() {
                    pages.clear();
                }
                Ok(())
            }

            async fn set_superuser(
                &self,
                user_id: i64,
                is_superuser: bool,
                now: i64,
            ) -> $crate::storage::Result<$crate::storage::UserRecord> {
                sqlx::query_as(
                    "UPDATE users SET is_superuser = $2, updated_at = $3 WHERE id = $1 RETURNING *",
                )
                .bind(user_id) // $1
                .bind(is_superuser) // $2
                .bind(now) // $3
                .fetch_optional(self.writer())
                .await?
                .ok_or($crate::storage::StorageError::NotFound("user"))
            }

            async fn set_user_active(
                &self,
                user_id: i64,
                active: bool,
                now: i64,
            ) -> $crate::storage::Result<$crate::storage::UserRecord> {
                let mut tx = self.begin_write().await?;
                let user = sqlx::query_as::<_, $crate::storage::UserRecord>(
                    "UPDATE users SET is_active = $2, updated_at = $3 WHERE id = $1 RETURNING *",
                )
                .bind(user_id) // $1
                .bind(active) // $2
                .bind(now) // $3
                .fetch_optional(&mut *tx)
                .await?
                .ok_or($crate::storage::StorageError::NotFound("user"))?;
                if !active {
                    sqlx::query(
                        "UPDATE sessions SET is_active = FALSE, revoked_at = $2 \
                         WHERE user_id = $1 AND is_active",
                    )
                    .bind(user_id) // $1
                    .bind(now) // $2
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(user)
            }

            async fn role_names(&self, user_id: i64) -> $crate::storage::Result<Vec<String>> {
                Ok(sqlx::query_scalar(
                    "SELECT r.name FROM roles r JOIN user_roles ur ON ur.role_id = r.id \
                     WHERE ur.user_id = $1 ORDER BY r.name",
                )
                .bind(user_id) // $1
                .fetch_all(self.reader())
                .await?)
            }
        }

        #[async_trait::async_trait]
        impl $crate::storage::RoleRepository for $store {
            async fn list_roles(&self) -> $crate::storage::Result<Vec<$crate::storage::RoleRecord>> {
                Ok(sqlx::query_as("SELECT id, name, description, created_at FROM roles ORDER BY name")
                    .fetch_all(self.reader())
                    .await?)
            }

            async fn create_role(
                &self,
                name: &str,
                description: Option<&str>,
                now: i64,
            ) -> $crate::storage::Result<$crate::storage::RoleRecord> {
                let inserted = sqlx::query_as(
                    "INSERT INTO roles (name, description, created_at) VALUES ($1, $2, $3) \
                     RETURNING id, name, description, created_at",
                )
                .bind(name) // $1
                .bind(description) // $2
                .bind(now) // $3
                .fetch_one(self.writer())
                .await;
                match inserted {
                    Err(error) if is_unique_violation(&error) => {
                        Err($crate::storage::StorageError::Conflict("name"))
                    }
                    other => Ok(other?),
                }
            }

            async fn delete_role(&self, role_id: i64) -> $crate::storage::Result<()> {
                let mut tx = self.begin_write().await?;
                sqlx::query("DELETE FROM user_roles WHERE role_id = $1")
                    .bind(role_id) // $1
                    .execute(&mut *tx)
                    .await?;
                let deleted = sqlx::query("DELETE FROM roles WHERE id = $1")
                    .bind(role_id) // $1
                    .execute(&mut *tx)
                    .await?;
                if deleted.rows_affected() == 0 {
                    return Err($crate::storage::StorageError::NotFound("role"));
                }
                tx.commit().await?;
                Ok(())
            }

            async fn user_roles(
                &self,
                user_id: i64,
            ) -> $crate::storage::Result<Vec<$crate::storage::RoleRecord>> {
                let mut tx = self.reader().begin().await?;
                require_user(&mut tx, user_id).await?;
                let roles = roles_of(&mut tx, user_id).await?;
                tx.commit().await?;
                Ok(roles)
            }

            async fn set_user_roles(
                &self,
                user_id: i64,
                role_ids: &[i64],
            ) -> $crate::storage::Result<Vec<$crate::storage::RoleRecord>> {
                let mut unique_ids = role_ids.to_vec();
                unique_ids.sort_unstable();
                unique_ids.dedup();
                let mut tx = self.begin_write().await?;
                require_user(&mut tx, user_id).await?;
                sqlx::query("DELETE FROM user_roles WHERE user_id = $1")
                    .bind(user_id) // $1
                    .execute(&mut *tx)
                    .await?;
                for role_id in &unique_ids {
                    // Inserting from `roles` adds nothing for an unknown id.
                    let linked = sqlx::query(
                        "INSERT INTO user_roles (user_id, role_id) SELECT $1, id FROM roles WHERE id = $2",
                    )
                    .bind(user_id) // $1
                    .bind(role_id) // $2
                    .execute(&mut *tx)
                    .await?;
                    if linked.rows_affected() == 0 {
                        // Dropping the transaction rolls every change back.
                        return Err($crate::storage::StorageError::NotFound("role"));
                    }
                }
                let roles = roles_of(&mut tx, user_id).await?;
                tx.commit().await?;
                Ok(roles)
            }
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

        /// Adds `unread` to one participant's conversation row, creating it, and
        /// makes `message` its last message unless a newer one is already there.
        /// Merges a new newest message and unread count into a participant's row.
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

        #[async_trait::async_trait]
        impl $crate::storage::ThrottleRepository for $store {
            async fn reserve_attempt(
                &self,
                account_key: Option<&str>,
                address: Option<&str>,
                limits: $crate::storage::ThrottleLimits,
                now: i64,
            ) -> $crate::storage::Result<bool> {
                let mut tx = self.begin_write().await?;
                if let Some(address) = address {
                    sqlx::query(
                        "INSERT INTO login_address_throttle (address, window_start, failures) \
                         VALUES ($1, $2, 0) ON CONFLICT (address) DO NOTHING",
                    )
                    .bind(address) // $1
                    .bind(now) // $2
                    .execute(&mut *tx)
                    .await?;
                    // One conditional UPDATE decides and counts: the row lock
                    // makes parallel attempts take their turn.
                    let reserved: Option<i64> = sqlx::query_scalar(
                        "UPDATE login_address_throttle SET \
                         failures = CASE WHEN window_start <= $2 - $3 THEN 1 ELSE failures + 1 END, \
                         window_start = CASE WHEN window_start <= $2 - $3 THEN $2 ELSE window_start END \
                         WHERE address = $1 AND (window_start <= $2 - $3 OR failures < $4) \
                         RETURNING failures",
                    )
                    .bind(address) // $1
                    .bind(now) // $2
                    .bind(limits.address_window) // $3
                    .bind(limits.address_failures) // $4
                    .fetch_optional(&mut *tx)
                    .await?;
                    if reserved.is_none() {
                        return Ok(false);
                    }
                }
                if let Some(account_key) = account_key {
                    sqlx::query(
                        "INSERT INTO login_account_throttle (account_key, failures, locked_until) \
                         VALUES ($1, 0, 0) ON CONFLICT (account_key) DO NOTHING",
                    )
                    .bind(account_key) // $1
                    .execute(&mut *tx)
                    .await?;
                    // Reaching the limit sets the delay in the same statement:
                    // step × (failures beyond the limit + 1), at most the maximum.
                    let reserved: Option<i64> = sqlx::query_scalar(
                        "UPDATE login_account_throttle SET failures = failures + 1, last_failure_at = $2, \
                         locked_until = CASE WHEN failures + 1 >= $3 THEN $2 + \
                         (CASE WHEN (failures + 2 - $3) * $4 > $5 THEN $5 ELSE (failures + 2 - $3) * $4 END) \
                         ELSE 0 END \
                         WHERE account_key = $1 AND locked_until <= $2 RETURNING failures",
                    )
                    .bind(account_key) // $1
                    .bind(now) // $2
                    .bind(limits.account_failures) // $3
                    .bind(limits.account_delay_step) // $4
                    .bind(limits.account_delay_max) // $5
                    .fetch_optional(&mut *tx)
                    .await?;
                    if reserved.is_none() {
                        // Dropping the transaction also undoes the address count.
                        return Ok(false);
                    }
                }
                tx.commit().await?;
                Ok(true)
            }

            async fn attempt_succeeded(
                &self,
                account_key: Option<&str>,
                address: Option<&str>,
            ) -> $crate::storage::Result<()> {
                let mut tx = self.begin_write().await?;
                if let Some(account_key) = account_key {
                    sqlx::query("DELETE FROM login_account_throttle WHERE account_key = $1")
                        .bind(account_key) // $1
                        .execute(&mut *tx)
                        .await?;
                }
                if let Some(address) = address {
                    sqlx::query(
                        "UPDATE login_address_throttle SET failures = failures - 1 \
                         WHERE address = $1 AND failures > 0",
                    )
                    .bind(address) // $1
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn sweep_throttle(
                &self,
                now: i64,
                forget_before: i64,
                address_window: i64,
            ) -> $crate::storage::Result<u64> {
                let mut tx = self.begin_write().await?;
                let accounts = sqlx::query(
                    "DELETE FROM login_account_throttle WHERE last_failure_at < $1 AND locked_until <= $2",
                )
                .bind(forget_before) // $1
                .bind(now) // $2
                .execute(&mut *tx)
                .await?;
                // An address row past its window counts as empty already.
                let addresses =
                    sqlx::query("DELETE FROM login_address_throttle WHERE window_start <= $1 - $2")
                        .bind(now) // $1
                        .bind(address_window) // $2
                        .execute(&mut *tx)
                        .await?;
                tx.commit().await?;
                Ok(accounts.rows_affected() + addresses.rows_affected())
            }

            async fn address_throttled(
                &self,
                address: &str,
                limits: $crate::storage::ThrottleLimits,
                now: i64,
            ) -> $crate::storage::Result<bool> {
                let throttled: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM login_address_throttle \
                     WHERE address = $1 AND window_start > $2 - $3 AND failures >= $4",
                )
                .bind(address) // $1
                .bind(now) // $2
                .bind(limits.address_window) // $3
                .bind(limits.address_failures) // $4
                .fetch_one(self.reader())
                .await?;
                Ok(throttled > 0)
            }
        }

        #[async_trait::async_trait]
        impl $crate::storage::SessionRepository for $store {
            async fn list_live_sessions(
                &self,
                user_id: i64,
                now: i64,
            ) -> $crate::storage::Result<Vec<$crate::storage::SessionRecord>> {
                Ok(sqlx::query_as(
                    "SELECT id, user_id, device_info, ip_address, is_active, created_at, expires_at, \
                     last_used_at FROM sessions WHERE user_id = $1 AND is_active AND expires_at > $2 \
                     ORDER BY created_at DESC, id DESC",
                )
                .bind(user_id) // $1
                .bind(now) // $2
                .fetch_all(self.reader())
                .await?)
            }

            async fn create_session(
                &self,
                session: $crate::storage::NewSession,
            ) -> $crate::storage::Result<$crate::storage::SessionRecord> {
                let mut tx = self.begin_write().await?;
                let record = sqlx::query_as::<_, $crate::storage::SessionRecord>(
                    "INSERT INTO sessions (user_id, device_info, ip_address, is_active, created_at, \
                     expires_at, last_used_at) VALUES ($1, $2, $3, TRUE, $4, $5, $4) \
                     RETURNING id, user_id, device_info, ip_address, is_active, created_at, \
                     expires_at, last_used_at",
                )
                .bind(session.user_id) // $1
                .bind(&session.device_info) // $2
                .bind(&session.ip_address) // $3
                .bind(session.now) // $4
                .bind(session.expires_at) // $5
                .fetch_one(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO refresh_tokens (session_id, user_id, token_hash, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(record.id) // $1
                .bind(record.user_id) // $2
                .bind(&session.refresh_token_hash) // $3
                .bind(session.now) // $4
                .bind(session.expires_at) // $5
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(record)
            }

            async fn find_live_session(
                &self,
                session_id: i64,
                user_id: i64,
                now: i64,
            ) -> $crate::storage::Result<Option<$crate::storage::LiveSession>> {
                #[derive(sqlx::FromRow)]
                struct Row {
                    #[sqlx(flatten)]
                    user: $crate::storage::UserProfile,
                    session_last_used_at: i64,
                    session_expires_at: i64,
                }
                let row: Option<Row> = sqlx::query_as(concat!(
                    "SELECT u.id, u.username, u.email, u.full_name, u.bio, u.is_active, \
                     u.is_superuser, u.created_at, u.updated_at",
                    ", s.last_used_at AS session_last_used_at, s.expires_at AS session_expires_at \
                     FROM sessions s JOIN users u ON u.id = s.user_id \
                     WHERE s.id = $1 AND s.user_id = $2 AND s.is_active AND s.expires_at > $3 \
                     AND u.is_active"
                ))
                .bind(session_id) // $1
                .bind(user_id) // $2
                .bind(now) // $3
                .fetch_optional(self.reader())
                .await?;
                Ok(row.map(|row| $crate::storage::LiveSession {
                    user: row.user,
                    last_used_at: row.session_last_used_at,
                    expires_at: row.session_expires_at,
                }))
            }

            async fn touch_session(&self, session_id: i64, now: i64) -> $crate::storage::Result<()> {
                sqlx::query("UPDATE sessions SET last_used_at = $2 WHERE id = $1")
                    .bind(session_id) // $1
                    .bind(now) // $2
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn rotate_refresh_token(
                &self,
                presented_hash: &[u8],
                replacement_hash: &[u8],
                now: i64,
            ) -> $crate::storage::Result<$crate::storage::RefreshOutcome> {
                use $crate::storage::RefreshOutcome;
                let mut tx = self.begin_write().await?;
                // Spending is one conditional UPDATE: PostgreSQL re-checks
                // `used_at IS NULL` after a concurrent spender commits, SQLite
                // runs write transactions one at a time; either way one wins.
                let spent: Option<(i64, i64)> = sqlx::query_as(
                    "UPDATE refresh_tokens SET used_at = $2 \
                     WHERE token_hash = $1 AND used_at IS NULL RETURNING session_id, user_id",
                )
                .bind(presented_hash) // $1
                .bind(now) // $2
                .fetch_optional(&mut *tx)
                .await?;
                let Some((session_id, user_id)) = spent else {
                    let previous: Option<(i64, i64)> =
                        sqlx::query_as("SELECT session_id, user_id FROM refresh_tokens WHERE token_hash = $1")
                            .bind(presented_hash) // $1
                            .fetch_optional(&mut *tx)
                            .await?;
                    let Some((session_id, user_id)) = previous else {
                        return Ok(RefreshOutcome::Invalid);
                    };
                    sqlx::query(
                        "UPDATE sessions SET is_active = FALSE, revoked_at = $2 \
                         WHERE id = $1 AND is_active",
                    )
                    .bind(session_id) // $1
                    .bind(now) // $2
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    return Ok(RefreshOutcome::Reused { session_id, user_id });
                };
                let session_expires_at: Option<i64> = sqlx::query_scalar(
                    "SELECT s.expires_at FROM sessions s JOIN users u ON u.id = s.user_id \
                     WHERE s.id = $1 AND s.is_active AND s.expires_at > $2 AND u.is_active",
                )
                .bind(session_id) // $1
                .bind(now) // $2
                .fetch_optional(&mut *tx)
                .await?;
                let Some(session_expires_at) = session_expires_at else {
                    tx.commit().await?;
                    return Ok(RefreshOutcome::Invalid);
                };
                sqlx::query(
                    "INSERT INTO refresh_tokens (session_id, user_id, token_hash, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(session_id) // $1
                .bind(user_id) // $2
                .bind(replacement_hash) // $3
                .bind(now) // $4
                .bind(session_expires_at) // $5
                .execute(&mut *tx)
                .await?;
                sqlx::query("UPDATE sessions SET last_used_at = $2 WHERE id = $1")
                    .bind(session_id) // $1
                    .bind(now) // $2
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(RefreshOutcome::Rotated {
                    user_id,
                    session_id,
                    session_expires_at,
                })
            }

            async fn revoke_session(
                &self,
                session_id: i64,
                user_id: i64,
                now: i64,
            ) -> $crate::storage::Result<bool> {
                let revoked = sqlx::query(
                    "UPDATE sessions SET is_active = FALSE, revoked_at = $3 \
                     WHERE id = $1 AND user_id = $2 AND is_active",
                )
                .bind(session_id) // $1
                .bind(user_id) // $2
                .bind(now) // $3
                .execute(self.writer())
                .await?;
                Ok(revoked.rows_affected() > 0)
            }

            async fn revoke_user_sessions(&self, user_id: i64, now: i64) -> $crate::storage::Result<u64> {
                let revoked = sqlx::query(
                    "UPDATE sessions SET is_active = FALSE, revoked_at = $2 \
                     WHERE user_id = $1 AND is_active AND expires_at > $2",
                )
                .bind(user_id) // $1
                .bind(now) // $2
                .execute(self.writer())
                .await?;
                Ok(revoked.rows_affected())
            }
        }
    };
}
