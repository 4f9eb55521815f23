//! Sessions and their refresh tokens. One SQL text for both backends, expanded
//! into each backend's store by `impl_repositories!`.

macro_rules! impl_session_repository {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::storage::SessionRepository for $store {
            async fn list_live_sessions(
                &self,
                user_id: i64,
                now: i64,
            ) -> $crate::storage::Result<Vec<$crate::storage::SessionRecord>> {
                Ok(sqlx::query_as(
                    "SELECT id, user_id, device_info, ip_address, is_active, created_at, expires_at, \
                     last_used_at, revoked_at, end_reason FROM sessions \
                     WHERE user_id = $1 AND is_active AND expires_at > $2 \
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
                     expires_at, last_used_at, revoked_at, end_reason",
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
                    let ended = end_sessions!(
                        self,
                        tx,
                        $crate::storage::EndReason::RefreshTokenReused,
                        now,
                        "id = $3",
                        session_id,
                    );
                    tx.commit().await?;
                    return Ok(RefreshOutcome::Reused {
                        session_id,
                        user_id,
                        ended,
                    });
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
                reason: $crate::storage::EndReason,
                now: i64,
            ) -> $crate::storage::Result<bool> {
                let mut tx = self.begin_write().await?;
                let ended = end_sessions!(
                    self,
                    tx,
                    reason,
                    now,
                    "id = $3 AND user_id = $4",
                    session_id,
                    user_id,
                );
                tx.commit().await?;
                Ok(ended > 0)
            }

            async fn revoke_user_sessions(
                &self,
                user_id: i64,
                reason: $crate::storage::EndReason,
                now: i64,
            ) -> $crate::storage::Result<u64> {
                let mut tx = self.begin_write().await?;
                let ended = end_sessions!(self, tx, reason, now, "user_id = $3", user_id);
                tx.commit().await?;
                Ok(ended)
            }

            async fn list_ended_sessions(
                &self,
                user_id: i64,
                since: i64,
                now: i64,
            ) -> $crate::storage::Result<Vec<$crate::storage::SessionRecord>> {
                // Revoked since `since`, or run out (expired) since then.
                Ok(sqlx::query_as(
                    "SELECT id, user_id, device_info, ip_address, is_active, created_at, expires_at, \
                     last_used_at, revoked_at, end_reason FROM sessions \
                     WHERE user_id = $1 AND (NOT is_active OR expires_at <= $3) \
                     AND (CASE WHEN is_active THEN expires_at ELSE revoked_at END) >= $2 \
                     ORDER BY created_at DESC, id DESC",
                )
                .bind(user_id) // $1
                .bind(since) // $2
                .bind(now) // $3
                .fetch_all(self.reader())
                .await?)
            }

            async fn revocations_after(
                &self,
                after_id: i64,
                limit: i64,
            ) -> $crate::storage::Result<Vec<$crate::storage::RevocationRecord>> {
                Ok(sqlx::query_as(
                    "SELECT id, session_id, user_id, reason, revoked_at FROM revocations \
                     WHERE id > $1 ORDER BY id LIMIT $2",
                )
                .bind(after_id) // $1
                .bind(limit) // $2
                .fetch_all(self.reader())
                .await?)
            }

            async fn revocation_exists(&self, id: i64) -> $crate::storage::Result<bool> {
                let found: Option<i64> = sqlx::query_scalar("SELECT id FROM revocations WHERE id = $1")
                    .bind(id) // $1
                    .fetch_optional(self.reader())
                    .await?;
                Ok(found.is_some())
            }

            async fn latest_revocation_id(&self) -> $crate::storage::Result<i64> {
                let latest: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM revocations")
                    .fetch_one(self.reader())
                    .await?;
                Ok(latest.unwrap_or(0))
            }

            async fn sweep_revocations(&self, before: i64) -> $crate::storage::Result<u64> {
                Ok(sqlx::query("DELETE FROM revocations WHERE revoked_at < $1")
                    .bind(before) // $1
                    .execute(self.writer())
                    .await?
                    .rows_affected())
            }
        }
    };
}
