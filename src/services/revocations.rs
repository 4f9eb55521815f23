//! AuthService.WatchRevocations: the feed of sessions that ended early, for
//! services that verify tokens offline. The log lives in the database
//! (written in the same transaction as each revocation, ids in commit
//! order), so a feed is the log read from a cursor: replayed first, then
//! followed as new rows commit on any instance, with no gap and no
//! duplicate at the seam by construction.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use tokio::sync::watch;
use tonic::{Request, Response, Status, codegen::BoxStream};

use super::{AppState, convert::end_reason_to_proto};
use crate::{
    auth::authenticator::SESSION_ENDED,
    domain::Timestamp,
    error::{AppError, Reason, refusal},
    proto,
    storage::RevocationRecord,
};

/// The role, besides superusers, that may follow the feed.
pub const SERVICE_ROLE: &str = "service";
/// Rows read per query.
const PAGE: i64 = 500;
/// The feed reads the log at least this often, so that a lost wake-up (a
/// notification missed in a reconnect) still delivers within a second.
const POLL: Duration = Duration::from_millis(250);
/// How often the log is swept of rows past retention.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// A cursor is the row id, opaque to clients: 8 bytes, base64url.
fn cursor_of(id: i64) -> String {
    URL_SAFE_NO_PAD.encode(id.to_be_bytes())
}

fn parse_cursor(text: &str) -> Result<i64, AppError> {
    URL_SAFE_NO_PAD
        .decode(text)
        .ok()
        .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
        .map(i64::from_be_bytes)
        .filter(|id| *id > 0)
        .ok_or_else(|| AppError::invalid("after_cursor", "not a cursor this server issued"))
}

/// How long rows stay replayable: the access-token lifetime plus 5 minutes,
/// so a verifier that reconnects before its newest tokens expire misses
/// nothing.
pub fn retention(access_token_ttl: Duration) -> Duration {
    access_token_ttl + Duration::from_secs(5 * 60)
}

fn event(row: RevocationRecord) -> proto::WatchRevocationsResponse {
    proto::WatchRevocationsResponse {
        cursor: cursor_of(row.id),
        session_id: row.session_id,
        user_id: row.user_id,
        reason: end_reason_to_proto(row.reason) as i32,
        revoked_at: Some(Timestamp::from_micros(row.revoked_at).to_proto()),
    }
}

pub async fn watch(
    state: Arc<AppState>,
    request: Request<proto::WatchRevocationsRequest>,
) -> Result<Response<BoxStream<proto::WatchRevocationsResponse>>, Status> {
    let caller = state.authenticate(&request).await?;
    if !caller.user.is_superuser && !caller.roles.iter().any(|role| role == SERVICE_ROLE) {
        return Err(AppError::refused(
            Reason::RoleRequired,
            "only superusers and holders of the service role may watch revocations",
        )
        .into());
    }
    // Woken before the starting point is read, so nothing committed after
    // it waits for the next poll. Never opened while events from other
    // instances could be missing (the contract's rule for every stream).
    let wake = state.events.revocation_signal();
    let connected = state.events.connection_state();
    if !*connected.borrow() {
        return Err(Status::unavailable(
            "real-time events are interrupted; retry shortly",
        ));
    }
    let cursor = &request.get_ref().after_cursor;
    let after = if cursor.is_empty() {
        state
            .db
            .latest_revocation_id()
            .await
            .map_err(AppError::from)?
    } else {
        let id = parse_cursor(cursor)?;
        if !state
            .db
            .revocation_exists(id)
            .await
            .map_err(AppError::from)?
        {
            return Err(AppError::refused(
                Reason::CursorExpired,
                "the cursor is older than the feed keeps, or was never issued; \
                 treat every token issued before now as unverified and start anew",
            )
            .into());
        }
        id
    };
    let until_expiry = caller.session_time_left(state.clock.now());
    let feed = Feed {
        _open: state.metrics.stream_opened("WatchRevocations"),
        connected,
        shutdown: state.shutdown.clone(),
        state,
        after,
        pending: VecDeque::new(),
        wake,
        session_id: caller.session_id,
        expires: tokio::time::Instant::now() + until_expiry,
        ending: None,
        ended: false,
    };
    let stream = futures::stream::unfold(feed, |mut feed| async move {
        let item = feed.next().await?;
        Some((item, feed))
    });
    Ok(Response::new(Box::pin(stream)))
}

/// What one open feed holds between events.
struct Feed {
    /// Counts the stream in `ai_message_streams_open` while it lives.
    _open: crate::metrics::StreamGuard,
    state: Arc<AppState>,
    /// The last row delivered (or the starting point).
    after: i64,
    pending: VecDeque<RevocationRecord>,
    wake: watch::Receiver<u64>,
    session_id: i64,
    expires: tokio::time::Instant,
    shutdown: watch::Receiver<bool>,
    /// Whether the event channel is up; the feed ends when it goes down.
    connected: watch::Receiver<bool>,
    /// The status that ends the feed once `pending` is delivered.
    ending: Option<Status>,
    ended: bool,
}

impl Feed {
    async fn next(&mut self) -> Option<Result<proto::WatchRevocationsResponse, Status>> {
        loop {
            if self.ended {
                return None;
            }
            if let Some(row) = self.pending.pop_front() {
                self.after = row.id;
                // The caller's own session ending is its last event.
                if row.session_id == self.session_id {
                    self.pending.clear();
                    self.ending = Some(refusal(Reason::SessionRevoked, SESSION_ENDED, None));
                }
                return Some(Ok(event(row)));
            }
            if let Some(status) = self.ending.take() {
                self.ended = true;
                return Some(Err(status));
            }
            match self.state.db.revocations_after(self.after, PAGE).await {
                Ok(rows) if !rows.is_empty() => {
                    self.pending.extend(rows);
                    continue;
                }
                Ok(_) => {}
                // The database is away: try again at the next poll; the log
                // keeps what happens meanwhile.
                Err(error) => tracing::debug!(error = %error, "revocation feed read failed"),
            }
            tokio::select! {
                _ = self.wake.changed() => {}
                () = tokio::time::sleep(POLL) => {}
                () = tokio::time::sleep_until(self.expires) => {
                    self.ending = Some(refusal(Reason::SessionRevoked, SESSION_ENDED, None));
                }
                _ = self.shutdown.changed() => {
                    self.ending = Some(Status::unavailable(
                        "the server is shutting down; resume from your last cursor",
                    ));
                }
                () = crate::events::channel_lost(&mut self.connected) => {
                    self.ending = Some(Status::unavailable(
                        "real-time events were interrupted; resume from your last cursor",
                    ));
                }
            }
        }
    }
}

/// Deletes the log rows past retention at the server's "now".
pub async fn sweep_once(state: &AppState) {
    let keep = retention(state.config.access_token_ttl);
    let before = state.clock.now().micros() - i64::try_from(keep.as_micros()).unwrap_or(i64::MAX);
    match state.db.sweep_revocations(before).await {
        Ok(0) => {}
        Ok(swept) => tracing::debug!(swept, "revocation log rows past retention deleted"),
        Err(error) => tracing::warn!(error = %error, "revocation log sweep failed; retrying later"),
    }
}

/// Sweeps every minute until `stop` turns true.
pub async fn sweep_regularly(state: Arc<AppState>, stop: watch::Receiver<bool>) {
    super::every(SWEEP_INTERVAL, stop, || sweep_once(&state)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_invalid_argument() {
        assert_eq!(parse_cursor(&cursor_of(42)).unwrap(), 42);
        for garbage in ["", "!!", "AAAAAAAAAAA", "AAAA", &cursor_of(-1)] {
            assert!(
                matches!(parse_cursor(garbage), Err(AppError::InvalidArgument(_))),
                "{garbage}"
            );
        }
    }
}
