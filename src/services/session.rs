//! SessionService: the caller's own login sessions.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{AppState, convert::session_to_proto};
use crate::{
    error::AppError,
    proto::{self, session_service_server::SessionService},
    storage::EndReason,
};

/// `include_ended` lists the sessions that ended within this (30 days).
const ENDED_SESSIONS_KEPT_MICROS: i64 = 30 * 24 * 3600 * 1_000_000;

pub struct SessionApi {
    state: Arc<AppState>,
}

impl SessionApi {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn list_sessions(
        &self,
        request: Request<proto::ListSessionsRequest>,
    ) -> Result<Response<proto::ListSessionsResponse>, Status> {
        let caller = self.state.authenticate(&request).await?;
        let now = self.state.clock.now();
        let mut sessions = self
            .state
            .db
            .list_live_sessions(caller.user.id, now.micros())
            .await?;
        if request.get_ref().include_ended {
            let since = now.micros().saturating_sub(ENDED_SESSIONS_KEPT_MICROS);
            sessions.extend(
                self.state
                    .db
                    .list_ended_sessions(caller.user.id, since, now.micros())
                    .await?,
            );
        }
        Ok(Response::new(proto::ListSessionsResponse {
            sessions: sessions
                .into_iter()
                .map(|session| session_to_proto(session, caller.session_id, now))
                .collect(),
        }))
    }

    async fn delete_session(
        &self,
        request: Request<proto::DeleteSessionRequest>,
    ) -> Result<Response<proto::DeleteSessionResponse>, Status> {
        let caller = self.state.authenticate(&request).await?;
        let session_id = request.get_ref().session_id;
        // Someone else's session is "not found", exactly like a missing one.
        let revoked = self
            .state
            .db
            .revoke_session(
                session_id,
                caller.user.id,
                EndReason::SessionDeleted,
                self.state.clock.now().micros(),
            )
            .await?;
        self.state
            .metrics
            .sessions_revoked(EndReason::SessionDeleted.label(), u64::from(revoked));
        if !revoked {
            return Err(AppError::NotFound("session not found".into()).into());
        }
        tracing::info!(target: "audit", user_id = caller.user.id, peer = ?caller.peer, session_id, "session revoked");
        self.state.events.user_changed(caller.user.id);
        Ok(Response::new(proto::DeleteSessionResponse {}))
    }
}
