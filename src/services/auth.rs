//! AuthService: registration, login, refresh-token rotation, logout and the
//! caller's own profile, plus ValidateToken for internal services.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{AppState, client_address, convert::user_to_proto};
use crate::{
    auth::{RefreshToken, accounts::create_account, tokens::AccessToken},
    domain::{self, Bio, Email, FullName, NewAccount, NewPassword, Timestamp, Violations},
    error::{AppError, Reason},
    proto::{self, auth_service_server::AuthService},
    storage::{EndReason, NewSession, ProfileChanges, RefreshOutcome},
};

/// The one answer for every failed login, so that it reveals nothing.
const LOGIN_FAILED: &str = "invalid username or password";
const REFRESH_FAILED: &str = "invalid, expired or revoked refresh token";
const TOKEN_TYPE: &str = "bearer";
/// ValidateTokens takes at most this many tokens a call.
const MAX_BATCH_TOKENS: usize = 100;
/// Longest `device_info` kept; a longer `user-agent` is cut to it.
const MAX_DEVICE_INFO_CHARS: usize = 255;

pub struct AuthApi {
    state: Arc<AppState>,
}

impl AuthApi {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    fn access_token(
        &self,
        user_id: i64,
        session_id: i64,
        now: Timestamp,
        session_expires_at: Timestamp,
    ) -> Result<(String, i64), AppError> {
        self.state
            .tokens
            .issue_access(user_id, session_id, now, session_expires_at)
            .map_err(AppError::internal)
    }

    async fn login(
        &self,
        request: Request<proto::LoginRequest>,
    ) -> Result<proto::LoginResponse, AppError> {
        let ip_address = client_address(&request, &self.state.config.trusted_proxies);
        let user_agent = request
            .metadata()
            .get("user-agent")
            .and_then(|value| value.to_str().ok())
            .map(|agent| {
                agent
                    .chars()
                    .take(MAX_DEVICE_INFO_CHARS)
                    .collect::<String>()
            });
        let body = request.into_inner();
        let mut violations = Violations::default();
        violations.check(domain::reject_nul("username", &body.username));
        violations.check(domain::reject_nul("password", &body.password));
        if let Some(device) = &body.device_info {
            violations.check(domain::reject_nul("device_info", device));
            if device.chars().count() > MAX_DEVICE_INFO_CHARS {
                violations.push(crate::error::FieldViolation::new(
                    "device_info",
                    "must be at most 255 characters long",
                ));
            }
        }
        violations.into_result()?;

        let user = if body.username.is_empty() {
            None
        } else {
            self.state.db.find_user_by_login(&body.username).await?
        };
        // Username and email count toward one account; unknown names are
        // throttled exactly like real ones.
        let account_key = match &user {
            Some(user) => format!("user:{}", user.id),
            None => format!("name:{}", body.username.to_lowercase()),
        };
        let address = ip_address.map(|ip| ip.to_string());
        let throttle = &self.state.throttle;
        if let Err(refused) = throttle
            .reserve(Some(&account_key), address.as_deref())
            .await?
        {
            tracing::info!(target: "audit", peer = ?ip_address, "login throttled");
            return Err(refused);
        }
        let hasher = &self.state.hasher;
        let password_matches = match &user {
            Some(user) if !body.password.is_empty() => {
                hasher.verify(&body.password, &user.password_hash).await?
            }
            // Unknown users and empty passwords cost one verification too,
            // so the answer's timing reveals nothing.
            _ => {
                hasher.verify_dummy().await?;
                false
            }
        };
        let user_id = user.as_ref().map(|user| user.id);
        let Some(user) = user.filter(|_| password_matches) else {
            tracing::info!(target: "audit", user_id = ?user_id, peer = ?ip_address, "login failed");
            return Err(AppError::refused(Reason::LoginFailed, LOGIN_FAILED));
        };
        throttle
            .succeeded(Some(&account_key), address.as_deref())
            .await?;
        if !user.is_active {
            tracing::info!(target: "audit", user_id = user.id, peer = ?ip_address, "login refused: account disabled");
            return Err(AppError::refused(
                Reason::AccountDisabled,
                "this account is disabled",
            ));
        }

        let now = self.state.clock.now();
        let session_expires_at = now.plus(self.state.config.refresh_token_ttl);
        let refresh = RefreshToken::generate();
        let session = self
            .state
            .db
            .create_session(NewSession {
                user_id: user.id,
                device_info: body.device_info.or(user_agent).filter(|d| !d.is_empty()),
                ip_address: address.clone(),
                now: now.micros(),
                expires_at: session_expires_at.micros(),
                refresh_token_hash: refresh.hash,
            })
            .await?;
        let (access_token, access_expires_at) =
            self.access_token(user.id, session.id, now, session_expires_at)?;
        tracing::info!(
            target: "audit",
            user_id = user.id,
            session_id = session.id,
            peer = ?ip_address,
            "login succeeded"
        );
        Ok(proto::LoginResponse {
            access_token,
            refresh_token: refresh.token,
            token_type: TOKEN_TYPE.to_owned(),
            expires_in: seconds_until(now, access_expires_at),
            refresh_expires_in: now.whole_seconds_until(session_expires_at),
            session_id: session.id,
        })
    }

    async fn refresh(
        &self,
        presented: &str,
        peer: Option<std::net::IpAddr>,
    ) -> Result<proto::RefreshTokenResponse, AppError> {
        let presented_hash = RefreshToken::hash_presented(presented).ok_or(AppError::refused(
            Reason::RefreshTokenInvalid,
            REFRESH_FAILED,
        ))?;
        let now = self.state.clock.now();
        let replacement = RefreshToken::generate();
        let outcome = self
            .state
            .db
            .rotate_refresh_token(&presented_hash, &replacement.hash, now.micros())
            .await?;
        let (user_id, session_id, session_expires_at) = match outcome {
            RefreshOutcome::Rotated {
                user_id,
                session_id,
                session_expires_at,
            } => (
                user_id,
                session_id,
                Timestamp::from_micros(session_expires_at),
            ),
            RefreshOutcome::Reused {
                session_id,
                user_id,
                ended,
            } => {
                self.state
                    .metrics
                    .sessions_revoked(EndReason::RefreshTokenReused.label(), ended);
                tracing::warn!(
                    target: "audit",
                    user_id,
                    session_id,
                    peer = ?peer,
                    "spent refresh token presented again; session revoked"
                );
                self.state.events.user_changed(user_id);
                return Err(AppError::refused(
                    Reason::RefreshTokenReused,
                    REFRESH_FAILED,
                ));
            }
            RefreshOutcome::Invalid => {
                return Err(AppError::refused(
                    Reason::RefreshTokenInvalid,
                    REFRESH_FAILED,
                ));
            }
        };
        let (access_token, access_expires_at) =
            self.access_token(user_id, session_id, now, session_expires_at)?;
        Ok(proto::RefreshTokenResponse {
            access_token,
            refresh_token: replacement.token,
            token_type: TOKEN_TYPE.to_owned(),
            expires_in: seconds_until(now, access_expires_at),
            refresh_expires_in: now.whole_seconds_until(session_expires_at),
        })
    }

    async fn update_me(
        &self,
        request: Request<proto::UpdateMeRequest>,
    ) -> Result<proto::UpdateMeResponse, AppError> {
        let caller = self.state.authenticate(&request).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        let email = body
            .email
            .as_deref()
            .and_then(|email| violations.check(Email::parse("email", email)));
        let full_name = body
            .full_name
            .as_deref()
            .and_then(|name| violations.check(FullName::parse(name)));
        let bio = body
            .bio
            .as_deref()
            .and_then(|bio| violations.check(Bio::parse(bio)));
        violations.into_result()?;
        let changes = ProfileChanges {
            email: email.map(|email| email.as_str().to_owned()),
            full_name: full_name.map(FullName::into_inner),
            bio: bio.map(Bio::into_inner),
        };
        let user = self
            .state
            .db
            .update_profile(caller.user.id, changes, self.state.clock.now().micros())
            .await?;
        self.state.events.user_changed(caller.user.id);
        Ok(proto::UpdateMeResponse {
            user: Some(self.state.user_proto(&user.profile).await?),
        })
    }

    async fn change_password(
        &self,
        request: Request<proto::ChangePasswordRequest>,
    ) -> Result<(), AppError> {
        let caller = self.state.authenticate(&request).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        violations.check(domain::reject_nul(
            "current_password",
            &body.current_password,
        ));
        let new_password = violations.check(NewPassword::parse(
            "new_password",
            &body.new_password,
            &caller.user.username,
            &caller.user.email,
        ));
        let new_password = violations.finish(new_password)?;
        // A wrong current password counts toward the account's throttle.
        let account_key = format!("user:{}", caller.user.id);
        let throttle = &self.state.throttle;
        throttle.reserve(Some(&account_key), None).await??;
        // The caller carries no hash: read it for this one check.
        let current_hash = self
            .state
            .db
            .find_user(caller.user.id)
            .await?
            .ok_or(AppError::refused(
                Reason::SessionRevoked,
                crate::auth::authenticator::SESSION_ENDED,
            ))?
            .password_hash;
        let hasher = &self.state.hasher;
        if !hasher.verify(&body.current_password, &current_hash).await? {
            tracing::info!(target: "audit", user_id = caller.user.id, peer = ?caller.peer, session_id = caller.session_id, "password change refused: wrong current password");
            return Err(AppError::invalid(
                "current_password",
                "is not the current password",
            ));
        }
        throttle.succeeded(Some(&account_key), None).await?;
        let new_hash = hasher.hash(new_password.as_str()).await?;
        let ended = self
            .state
            .db
            .change_password(
                caller.user.id,
                &new_hash,
                caller.session_id,
                self.state.clock.now().micros(),
            )
            .await?;
        self.state
            .metrics
            .sessions_revoked(EndReason::PasswordChanged.label(), ended);
        tracing::info!(
            target: "audit",
            user_id = caller.user.id,
            peer = ?caller.peer,
            session_id = caller.session_id,
            "password changed"
        );
        self.state.events.user_changed(caller.user.id);
        Ok(())
    }

    /// ValidateToken's answer for one token; `required_roles` fills
    /// `missing_roles`.
    async fn validate(
        &self,
        token: &str,
        required_roles: &[String],
    ) -> Result<proto::ValidateTokenResponse, AppError> {
        let inactive = proto::ValidateTokenResponse::default();
        let now = self.state.clock.now();
        let Ok(AccessToken {
            user_id,
            session_id,
            expires_at,
        }) = self.state.tokens.verify_access(token, now)
        else {
            return Ok(inactive);
        };
        let Some(cached) = self
            .state
            .auth
            .live_session(session_id, user_id, now.micros())
            .await?
        else {
            return Ok(inactive);
        };
        let user = cached.live.user;
        let missing_roles = required_roles
            .iter()
            .filter(|role| !cached.roles.contains(role))
            .cloned()
            .collect();
        // The answer may be reused until the token expires or the revocation
        // bound passes, whichever comes first.
        let exp = Timestamp::from_micros(expires_at.saturating_mul(1_000_000));
        let cache_until = now.plus(self.state.config.validation_cache_ttl).min(exp);
        Ok(proto::ValidateTokenResponse {
            active: true,
            user_id,
            username: user.username,
            session_id,
            is_superuser: user.is_superuser,
            roles: cached.roles,
            expires_at: Some(prost_types::Timestamp {
                seconds: expires_at,
                nanos: 0,
            }),
            missing_roles,
            cache_until: Some(cache_until.to_proto()),
        })
    }
}

/// Whole seconds from `now` until the `exp` second, rounded down.
fn seconds_until(now: Timestamp, exp_seconds: i64) -> i64 {
    now.whole_seconds_until(Timestamp::from_micros(
        exp_seconds.saturating_mul(1_000_000),
    ))
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let peer = client_address(&request, &self.state.config.trusted_proxies);
        let address = peer.map(|ip| ip.to_string());
        let throttle = &self.state.throttle;
        // A throttled address learns nothing, not even whether a name is taken.
        if let Some(address) = &address
            && let Err(refused) = throttle.check_address(address).await?
        {
            return Err(refused.into());
        }
        let body = request.into_inner();
        let account = NewAccount::parse(
            &body.username,
            &body.email,
            &body.password,
            body.full_name.as_deref(),
        )?;
        let user = match create_account(
            self.state.db.as_ref(),
            &self.state.hasher,
            account,
            false,
            self.state.clock.now(),
        )
        .await
        {
            Ok(user) => user,
            Err(taken @ AppError::AlreadyExists(_)) => {
                // Probing for taken names counts as a failure of the address
                // (already throttled or not, the answer is ALREADY_EXISTS).
                let _counted = throttle.reserve(None, address.as_deref()).await?;
                return Err(taken.into());
            }
            Err(other) => return Err(other.into()),
        };
        tracing::info!(target: "audit", user_id = user.id, peer = ?peer, "user registered");
        Ok(Response::new(proto::RegisterResponse {
            user: Some(user_to_proto(&user.profile, Vec::new())),
        }))
    }

    async fn login(
        &self,
        request: Request<proto::LoginRequest>,
    ) -> Result<Response<proto::LoginResponse>, Status> {
        Ok(Response::new(AuthApi::login(self, request).await?))
    }

    async fn refresh_token(
        &self,
        request: Request<proto::RefreshTokenRequest>,
    ) -> Result<Response<proto::RefreshTokenResponse>, Status> {
        let peer = client_address(&request, &self.state.config.trusted_proxies);
        Ok(Response::new(
            self.refresh(&request.get_ref().refresh_token, peer).await?,
        ))
    }

    async fn logout(
        &self,
        request: Request<proto::LogoutRequest>,
    ) -> Result<Response<proto::LogoutResponse>, Status> {
        let caller = self.state.authenticate(&request).await?;
        let ended = self
            .state
            .db
            .revoke_session(
                caller.session_id,
                caller.user.id,
                EndReason::Logout,
                self.state.clock.now().micros(),
            )
            .await?;
        self.state
            .metrics
            .sessions_revoked(EndReason::Logout.label(), u64::from(ended));
        tracing::info!(
            target: "audit",
            user_id = caller.user.id,
            peer = ?caller.peer,
            session_id = caller.session_id,
            "logout"
        );
        self.state.events.user_changed(caller.user.id);
        Ok(Response::new(proto::LogoutResponse {}))
    }

    async fn logout_all(
        &self,
        request: Request<proto::LogoutAllRequest>,
    ) -> Result<Response<proto::LogoutAllResponse>, Status> {
        let caller = self.state.authenticate(&request).await?;
        let revoked = self
            .state
            .db
            .revoke_user_sessions(
                caller.user.id,
                EndReason::LogoutAll,
                self.state.clock.now().micros(),
            )
            .await?;
        self.state
            .metrics
            .sessions_revoked(EndReason::LogoutAll.label(), revoked);
        tracing::info!(
            target: "audit",
            user_id = caller.user.id,
            peer = ?caller.peer,
            revoked,
            "logout from every session"
        );
        self.state.events.user_changed(caller.user.id);
        Ok(Response::new(proto::LogoutAllResponse {
            revoked_sessions: i32::try_from(revoked).unwrap_or(i32::MAX),
        }))
    }

    async fn get_me(
        &self,
        request: Request<proto::GetMeRequest>,
    ) -> Result<Response<proto::GetMeResponse>, Status> {
        let caller = self.state.authenticate(&request).await?;
        Ok(Response::new(proto::GetMeResponse {
            user: Some(self.state.caller_proto(&caller)),
        }))
    }

    async fn update_me(
        &self,
        request: Request<proto::UpdateMeRequest>,
    ) -> Result<Response<proto::UpdateMeResponse>, Status> {
        Ok(Response::new(AuthApi::update_me(self, request).await?))
    }

    async fn change_password(
        &self,
        request: Request<proto::ChangePasswordRequest>,
    ) -> Result<Response<proto::ChangePasswordResponse>, Status> {
        AuthApi::change_password(self, request).await?;
        Ok(Response::new(proto::ChangePasswordResponse {}))
    }

    async fn validate_token(
        &self,
        request: Request<proto::ValidateTokenRequest>,
    ) -> Result<Response<proto::ValidateTokenResponse>, Status> {
        let request = request.get_ref();
        Ok(Response::new(
            self.validate(&request.token, &request.required_roles)
                .await?,
        ))
    }

    async fn validate_tokens(
        &self,
        request: Request<proto::ValidateTokensRequest>,
    ) -> Result<Response<proto::ValidateTokensResponse>, Status> {
        let request = request.into_inner();
        if request.tokens.len() > MAX_BATCH_TOKENS {
            return Err(AppError::invalid(
                "tokens",
                format!("at most {MAX_BATCH_TOKENS} tokens a call"),
            )
            .into());
        }
        let checks = request
            .tokens
            .iter()
            .map(|token| self.validate(token, &request.required_roles));
        let results = futures::future::try_join_all(checks).await?;
        Ok(Response::new(proto::ValidateTokensResponse { results }))
    }

    async fn get_jwks(
        &self,
        _request: Request<proto::GetJwksRequest>,
    ) -> Result<Response<proto::GetJwksResponse>, Status> {
        let mut response = Response::new(proto::GetJwksResponse {
            keys: self.state.tokens.public_keys(),
        });
        // Through REST this becomes the key set's `cache-control` header.
        response.metadata_mut().insert(
            "cache-control",
            tonic::metadata::MetadataValue::from_static("max-age=300"),
        );
        Ok(response)
    }

    async fn watch_revocations(
        &self,
        request: Request<proto::WatchRevocationsRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<proto::WatchRevocationsResponse>>, Status> {
        super::revocations::watch(Arc::clone(&self.state), request).await
    }
}
