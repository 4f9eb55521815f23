//! Users: accounts, profiles, search, superuser and active flags. One SQL text
//! for both backends, expanded into each backend's store by
//! `impl_repositories!`.

macro_rules! impl_user_repository {
    ($store:ty, $db:ty) => {
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
                    Err(error) if $crate::storage::sql::is_unique_violation(&error) => {
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
                    Err(error) if $crate::storage::sql::is_unique_violation(&error) => Err(self.conflicting_field(None).await),
                    other => other?.ok_or($crate::storage::StorageError::NotFound("user")),
                }
            }

            async fn change_password(
                &self,
                user_id: i64,
                password_hash: &str,
                keep_session_id: i64,
                now: i64,
            ) -> $crate::storage::Result<u64> {
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
                let ended = end_sessions!(
                    self,
                    tx,
                    $crate::storage::EndReason::PasswordChanged,
                    now,
                    "user_id = $3 AND id <> $4",
                    user_id,
                    keep_session_id,
                );
                tx.commit().await?;
                Ok(ended)
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
                .bind($crate::storage::sql::like_pattern(query)) // $3
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
                .bind($crate::storage::sql::like_pattern(query)) // $2
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

            async fn delete_user(&self, user_id: i64, now: i64) -> $crate::storage::Result<u64> {
                let mut tx = self.begin_write().await?;
                // The user's row first, as ChangePassword and DisableUser take
                // it before the revocation log's lock: one order, no deadlock.
                sqlx::query("UPDATE users SET updated_at = updated_at WHERE id = $1")
                    .bind(user_id) // $1
                    .execute(&mut *tx)
                    .await?;
                // The feed hears of every live session before it goes.
                let ended = end_sessions!(
                    self,
                    tx,
                    $crate::storage::EndReason::UserDeleted,
                    now,
                    "user_id = $3",
                    user_id,
                );
                // Children first, explicitly, so the outcome does not hang on
                // cascade settings; messages go with their sender or recipient.
                // Their messages leave no trace in any event log: the other
                // participants' logs are found through the conversation rows.
                for statement in [
                    "DELETE FROM message_events WHERE user_id IN \
                     (SELECT other_user_id FROM conversation_members WHERE user_id = $1) \
                     AND (sender_id = $1 OR recipient_id = $1)",
                    "DELETE FROM message_events WHERE user_id = $1",
                    "DELETE FROM message_event_heads WHERE user_id = $1",
                    "DELETE FROM message_requests WHERE sender_id = $1",
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
                // Other users' pages changed without an event in their logs.
                sqlx::query("UPDATE deployment SET erasures = erasures + 1")
                    .execute(&mut *tx)
                    .await?;
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
                Ok(ended)
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
            ) -> $crate::storage::Result<($crate::storage::UserRecord, u64)> {
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
                let ended = if active {
                    0
                } else {
                    end_sessions!(
                        self,
                        tx,
                        $crate::storage::EndReason::UserDisabled,
                        now,
                        "user_id = $3",
                        user_id,
                    )
                };
                tx.commit().await?;
                Ok((user, ended))
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
    };
}
