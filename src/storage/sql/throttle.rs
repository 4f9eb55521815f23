//! Login throttling: per account and per address. One SQL text for both
//! backends, expanded into each backend's store by `impl_repositories!`.

macro_rules! impl_throttle_repository {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::storage::ThrottleRepository for $store {
            async fn reserve_attempt(
                &self,
                account_key: Option<&str>,
                address: Option<&str>,
                limits: $crate::storage::ThrottleLimits,
                now: i64,
            ) -> $crate::storage::Result<$crate::storage::Reservation> {
                use $crate::storage::Reservation;
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
                        let window_start: i64 = sqlx::query_scalar(
                            "SELECT window_start FROM login_address_throttle WHERE address = $1",
                        )
                        .bind(address) // $1
                        .fetch_one(&mut *tx)
                        .await?;
                        return Ok(Reservation::AddressThrottled {
                            until: window_start + limits.address_window,
                        });
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
                        let until: i64 = sqlx::query_scalar(
                            "SELECT locked_until FROM login_account_throttle WHERE account_key = $1",
                        )
                        .bind(account_key) // $1
                        .fetch_one(&mut *tx)
                        .await?;
                        // Dropping the transaction also undoes the address count.
                        return Ok(Reservation::AccountThrottled { until });
                    }
                }
                tx.commit().await?;
                Ok(Reservation::Reserved)
            }

            async fn attempt_succeeded(
                &self,
                account_key: Option<&str>,
                address: Option<&str>,
            ) -> $crate::storage::Result<()> {
                let mut tx = self.begin_write().await?;
                // Rows are locked in `reserve_attempt`'s order (address, then
                // account): the other order deadlocks two concurrent logins
                // of one account from one address on PostgreSQL.
                if let Some(address) = address {
                    sqlx::query(
                        "UPDATE login_address_throttle SET failures = failures - 1 \
                         WHERE address = $1 AND failures > 0",
                    )
                    .bind(address) // $1
                    .execute(&mut *tx)
                    .await?;
                }
                if let Some(account_key) = account_key {
                    sqlx::query("DELETE FROM login_account_throttle WHERE account_key = $1")
                        .bind(account_key) // $1
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
            ) -> $crate::storage::Result<Option<i64>> {
                let window_start: Option<i64> = sqlx::query_scalar(
                    "SELECT window_start FROM login_address_throttle \
                     WHERE address = $1 AND window_start > $2 - $3 AND failures >= $4",
                )
                .bind(address) // $1
                .bind(now) // $2
                .bind(limits.address_window) // $3
                .bind(limits.address_failures) // $4
                .fetch_optional(self.reader())
                .await?;
                Ok(window_start.map(|start| start + limits.address_window))
            }
        }
    };
}
