//! Login throttling against brute force and credential stuffing, kept in the
//! database so that every instance enforces the same limits.
//!
//! - Per account: after `AI_MESSAGE_LOGIN_ACCOUNT_FAILURES` consecutive
//!   failures, logins wait 15 s, then 30 s, 45 s, ... (at most 15 min) after
//!   each further failure. Never a permanent lock an attacker could use
//!   against the owner; a success resets the count.
//! - Per address: `AI_MESSAGE_LOGIN_ADDRESS_FAILURES` failures within a
//!   10-minute window throttle the address until the window closes.
//!
//! Throttled attempts are refused before any password check (no bcrypt).
//!
//! A day without failures forgives an account's count, and a sweep every
//! ten minutes deletes such rows, so names that match no account (one row
//! each, however many an attacker invents) do not pile up.

use std::{sync::Arc, time::Duration};

use crate::{
    config::Config,
    domain::{Clock, Timestamp},
    error::{AppError, Reason},
    storage::{Database, Reservation, ThrottleLimits},
};

const THROTTLED: &str = "too many failed attempts; try again later";

/// The refusal of a throttled attempt, with the time left until `until`.
fn throttled(reason: Reason, until: i64, now: i64) -> AppError {
    let left = u64::try_from(until.saturating_sub(now)).unwrap_or(0);
    AppError::throttled(reason, THROTTLED, Duration::from_micros(left))
}

pub const ACCOUNT_DELAY_STEP: Duration = Duration::from_secs(15);
pub const ACCOUNT_DELAY_MAX: Duration = Duration::from_secs(15 * 60);
pub const ADDRESS_WINDOW: Duration = Duration::from_secs(10 * 60);
/// Failures older than this are forgotten when no delay is running.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(24 * 60 * 60);
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10 * 60);

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

#[derive(Clone)]
pub struct Throttle {
    db: Arc<dyn Database>,
    limits: ThrottleLimits,
    clock: Arc<dyn Clock>,
}

impl Throttle {
    pub fn new(db: Arc<dyn Database>, config: &Config, clock: Arc<dyn Clock>) -> Self {
        Self {
            db,
            clock,
            limits: ThrottleLimits {
                account_failures: i64::from(config.login_account_failures),
                account_delay_step: micros(ACCOUNT_DELAY_STEP),
                account_delay_max: micros(ACCOUNT_DELAY_MAX),
                address_failures: i64::from(config.login_address_failures),
                address_window: micros(ADDRESS_WINDOW),
            },
        }
    }

    /// Counts an attempt (as a failure until `succeeded`); the inner error
    /// is the refusal when the account or the address is throttled.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn reserve(
        &self,
        account_key: Option<&str>,
        address: Option<&str>,
    ) -> Result<Result<(), AppError>, AppError> {
        let now = self.clock.now().micros();
        Ok(
            match self
                .db
                .reserve_attempt(account_key, address, self.limits, now)
                .await?
            {
                Reservation::Reserved => Ok(()),
                Reservation::AddressThrottled { until } => {
                    Err(throttled(Reason::AddressThrottled, until, now))
                }
                Reservation::AccountThrottled { until } => {
                    Err(throttled(Reason::AccountThrottled, until, now))
                }
            },
        )
    }

    pub async fn succeeded(
        &self,
        account_key: Option<&str>,
        address: Option<&str>,
    ) -> Result<(), AppError> {
        Ok(self.db.attempt_succeeded(account_key, address).await?)
    }

    /// Deletes rows that no longer throttle anything; returns how many.
    pub async fn sweep(&self, now: Timestamp) -> Result<u64, AppError> {
        let now = now.micros();
        Ok(self
            .db
            .sweep_throttle(
                now,
                now.saturating_sub(micros(FAILURE_MEMORY)),
                self.limits.address_window,
            )
            .await?)
    }

    /// Sweeps every `SWEEP_INTERVAL` until `stop` turns true.
    pub async fn sweep_regularly(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => match self.sweep(self.clock.now()).await {
                    Ok(0) => {}
                    Ok(swept) => tracing::info!(swept, "expired login throttle rows deleted"),
                    Err(error) => tracing::warn!(error = %error, "login throttle sweep failed; retrying later"),
                },
                _ = stop.changed() => break,
            }
        }
    }

    /// The refusal, if the address is throttled (Register checks it first).
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn check_address(&self, address: &str) -> Result<Result<(), AppError>, AppError> {
        let now = self.clock.now().micros();
        Ok(
            match self.db.address_throttled(address, self.limits, now).await? {
                Some(until) => Err(throttled(Reason::AddressThrottled, until, now)),
                None => Ok(()),
            },
        )
    }
}
