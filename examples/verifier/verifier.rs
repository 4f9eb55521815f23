//! An offline token verifier for a service that sits behind ai-message: it
//! fetches the public key set once (and again for a `kid` it does not know,
//! after a rotation), verifies access tokens locally with jsonwebtoken, and
//! follows `WatchRevocations` from its last cursor so that a token of a
//! session that ended is refused within a second, without a call per token.
//!
//! Shared by the example binary (`cargo run --example verifier`), the test
//! that runs it (tests/api/verifier.rs) and the benchmark.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use ai_message::proto::{
    self, GetJwksRequest, LoginRequest, WatchRevocationsRequest,
    auth_service_client::AuthServiceClient,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tonic::{Code, transport::Channel};

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub user_id: i64,
    pub session_id: i64,
}

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Malformed, wrongly signed, expired, another issuer or audience.
    Invalid(String),
    /// Its `kid` names no published key.
    UnknownKey,
    /// Its session ended (the revocation feed said so).
    Revoked,
    /// Issued before the feed lost track (a cursor that expired): unverified.
    Unverifiable,
}

#[derive(Debug, serde::Deserialize)]
struct Claims {
    sub: String,
    sid: String,
    iat: i64,
}

/// The state a verifier keeps: keys by `kid`, ended sessions, and the time
/// before which tokens cannot be vouched for.
#[derive(Default)]
struct Knowledge {
    keys: HashMap<String, DecodingKey>,
    revoked: HashSet<i64>,
    /// Unix seconds: tokens issued before this are not trusted.
    not_before: i64,
}

pub struct Verifier {
    client: AuthServiceClient<Channel>,
    validation: Validation,
    known: RwLock<Knowledge>,
    /// The feed's last cursor: where a reconnect resumes.
    cursor: Mutex<String>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

impl Verifier {
    /// Fetches the key set of the server at `channel`, whose tokens carry
    /// `issuer` (its AI_MESSAGE_DOMAIN).
    pub async fn new(channel: Channel, issuer: &str) -> Result<Arc<Self>, tonic::Status> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 0;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&["ai-message"]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let verifier = Arc::new(Self {
            client: AuthServiceClient::new(channel),
            validation,
            known: RwLock::new(Knowledge::default()),
            cursor: Mutex::new(String::new()),
        });
        verifier.refresh_keys().await?;
        Ok(verifier)
    }

    /// Reads the key set again (after a rotation).
    pub async fn refresh_keys(&self) -> Result<(), tonic::Status> {
        let keys = self
            .client
            .clone()
            .get_jwks(GetJwksRequest {})
            .await?
            .into_inner()
            .keys;
        let mut decoded = HashMap::new();
        for jwk in keys {
            if jwk.kty == "OKP"
                && jwk.crv == "Ed25519"
                && let Ok(key) = DecodingKey::from_ed_components(&jwk.x)
            {
                decoded.insert(jwk.kid, key);
            }
        }
        self.known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys = decoded;
        Ok(())
    }

    /// Verifies `token` offline: signature by a published key, claims, and
    /// the revocation feed's knowledge.
    pub fn verify(&self, token: &str) -> Result<Verified, Refused> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| Refused::Invalid(e.to_string()))?;
        if header.typ.as_deref() != Some("at+jwt") {
            return Err(Refused::Invalid("not an access token".into()));
        }
        let known = self
            .known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = header
            .kid
            .as_ref()
            .and_then(|kid| known.keys.get(kid))
            .ok_or(Refused::UnknownKey)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|e| Refused::Invalid(e.to_string()))?;
        let parse = |text: &str| {
            text.parse::<i64>()
                .map_err(|_| Refused::Invalid("bad id".into()))
        };
        let verified = Verified {
            user_id: parse(&data.claims.sub)?,
            session_id: parse(&data.claims.sid)?,
        };
        if known.revoked.contains(&verified.session_id) {
            return Err(Refused::Revoked);
        }
        if data.claims.iat < known.not_before {
            return Err(Refused::Unverifiable);
        }
        Ok(verified)
    }

    /// Like `verify`, fetching the key set once more for an unknown `kid`.
    pub async fn verify_or_refresh(&self, token: &str) -> Result<Verified, Refused> {
        match self.verify(token) {
            Err(Refused::UnknownKey) => {
                let _ = self.refresh_keys().await;
                self.verify(token)
            }
            other => other,
        }
    }

    /// The last cursor received (empty before the first event).
    pub fn cursor(&self) -> String {
        self.cursor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Follows the revocation feed forever as the service account
    /// `username` (a holder of the `service` role), resuming from the last
    /// cursor after every interruption.
    pub async fn follow(self: Arc<Self>, username: String, password: String) {
        let mut token = String::new();
        loop {
            if token.is_empty() {
                match self
                    .client
                    .clone()
                    .login(LoginRequest {
                        username: username.clone(),
                        password: password.clone(),
                        device_info: Some("revocation follower".into()),
                    })
                    .await
                {
                    Ok(answer) => token = answer.into_inner().access_token,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            match self.follow_once(&token).await {
                // Our own session or token ended: log in again.
                Err(status) if status.code() == Code::Unauthenticated => token.clear(),
                // The feed no longer reaches back to our cursor: we may have
                // missed revocations, so nothing issued before now is trusted.
                Err(status) if status.code() == Code::FailedPrecondition => {
                    let mut known = self
                        .known
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    known.not_before = unix_now();
                    drop(known);
                    self.cursor
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clear();
                }
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    async fn follow_once(&self, token: &str) -> Result<(), tonic::Status> {
        let mut request = tonic::Request::new(WatchRevocationsRequest {
            after_cursor: self.cursor(),
        });
        if let Ok(value) = format!("Bearer {token}").parse() {
            request.metadata_mut().insert("authorization", value);
        }
        let mut feed = self
            .client
            .clone()
            .watch_revocations(request)
            .await?
            .into_inner();
        while let Some(event) = feed.message().await? {
            self.learn(&event);
        }
        Ok(())
    }

    fn learn(&self, event: &proto::WatchRevocationsResponse) {
        self.known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .revoked
            .insert(event.session_id);
        *self
            .cursor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = event.cursor.clone();
    }
}
