//! The SQL shared by both backends. SQLite and PostgreSQL both accept `$n`
//! placeholders, `RETURNING`, `TRUE`/`FALSE` and expression indexes, and both
//! store times as integer microseconds, so one text serves both. The macro
//! expands it into each backend's impl; each backend supplies `reader()`,
//! `writer()` and `begin_write()` (SQLite takes its write lock up front there).

/// `SELECT` list of a user, for queries that join.
macro_rules! user_columns {
    ($alias:literal) => {
        concat!(
            $alias,
            ".id, ",
            $alias,
            ".username, ",
            $alias,
            ".email, ",
            $alias,
            ".password_hash, ",
            $alias,
            ".full_name, ",
            $alias,
            ".bio, ",
            $alias,
            ".is_active, ",
            $alias,
            ".is_superuser, ",
            $alias,
            ".created_at, ",
            $alias,
            ".updated_at"
        )
    };
}

macro_rules! impl_repositories {
    ($store:ty, $db:ty) => {
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
                    user: $crate::storage::UserRecord,
                    session_last_used_at: i64,
                }
                let row: Option<Row> = sqlx::query_as(concat!(
                    "SELECT ",
                    user_columns!("u"),
                    ", s.last_used_at AS session_last_used_at \
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
                    let previous: Option<i64> =
                        sqlx::query_scalar("SELECT session_id FROM refresh_tokens WHERE token_hash = $1")
                            .bind(presented_hash) // $1
                            .fetch_optional(&mut *tx)
                            .await?;
                    let Some(session_id) = previous else {
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
                    return Ok(RefreshOutcome::Reused { session_id });
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
