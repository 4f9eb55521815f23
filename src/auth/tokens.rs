//! Access tokens (HS256 JWTs, RFC 9068 `typ: at+jwt`) and opaque refresh tokens.
//!
//! Every check that needs no database happens here: algorithm pinned, signature,
//! `typ`, `iss`, `aud`, and expiry without leeway (a token is dead from its
//! `exp` second on). Functions take `now` so expiry is tested without sleeping.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::domain::Timestamp;

pub const AUDIENCE: &str = "ai-message";
pub const ACCESS_TOKEN_TYPE: &str = "at+jwt";
const REFRESH_TOKEN_BYTES: usize = 32;

#[derive(Debug, Serialize, Deserialize)]
struct AccessClaims {
    sub: String,
    sid: String,
    iat: i64,
    exp: i64,
    iss: String,
    aud: String,
    /// Unique per token, so two tokens minted in the same second differ.
    jti: String,
    /// Never written by this server; a token carrying one in the future is
    /// not valid yet (RFC 7519 4.1.5), checked against the caller's `now`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
}

/// What a verified access token says: checked for form, signature and expiry,
/// but not yet against the session table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessToken {
    pub user_id: i64,
    pub session_id: i64,
    /// The token's `exp`, in whole seconds since the epoch.
    pub expires_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed or wrongly signed")]
    Invalid,
    #[error("the token has expired")]
    Expired,
}

pub struct TokenService {
    encoding_key: EncodingKey,
    decoding_key: DecodingKey,
    validation: Validation,
    issuer: String,
    access_ttl_seconds: i64,
}

impl TokenService {
    pub fn new(secret: &[u8], issuer: &str, access_ttl: std::time::Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked by `verify_access` against the caller's `now`, with
        // no leeway; jsonwebtoken's own check would allow `exp == now`.
        validation.validate_exp = false;
        validation.leeway = 0;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Self {
            encoding_key: EncodingKey::from_secret(secret),
            decoding_key: DecodingKey::from_secret(secret),
            validation,
            issuer: issuer.to_owned(),
            access_ttl_seconds: i64::try_from(access_ttl.as_secs()).unwrap_or(i64::MAX),
        }
    }

    /// Signs an access token for the session; its `exp` never passes the
    /// session's own expiry. Returns the token and its `exp` (whole seconds).
    pub fn issue_access(
        &self,
        user_id: i64,
        session_id: i64,
        now: Timestamp,
        session_expires_at: Timestamp,
    ) -> Result<(String, i64), jsonwebtoken::errors::Error> {
        let issued_at = now.seconds();
        let expires_at = issued_at
            .saturating_add(self.access_ttl_seconds)
            .min(session_expires_at.seconds());
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some(ACCESS_TOKEN_TYPE.to_owned());
        let mut jti = [0u8; 16];
        rand::rng().fill_bytes(&mut jti);
        let claims = AccessClaims {
            sub: user_id.to_string(),
            sid: session_id.to_string(),
            iat: issued_at,
            exp: expires_at,
            iss: self.issuer.clone(),
            aud: AUDIENCE.to_owned(),
            jti: URL_SAFE_NO_PAD.encode(jti),
            nbf: None,
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding_key)?;
        Ok((token, expires_at))
    }

    /// The public keys that verify access tokens, as JWKs: none with HS256.
    pub fn public_keys(&self) -> Vec<crate::proto::Jwk> {
        Vec::new()
    }

    /// Checks everything about an access token that needs no database.
    pub fn verify_access(&self, token: &str, now: Timestamp) -> Result<AccessToken, TokenError> {
        let data =
            jsonwebtoken::decode::<AccessClaims>(token, &self.decoding_key, &self.validation)
                .map_err(|_| TokenError::Invalid)?;
        // No critical extension is understood, so a token naming any is refused
        // (RFC 7515 4.1.11).
        if data.header.typ.as_deref() != Some(ACCESS_TOKEN_TYPE) || data.header.crit.is_some() {
            return Err(TokenError::Invalid);
        }
        let claims = data.claims;
        if claims.nbf.is_some_and(|nbf| now.seconds() < nbf) {
            return Err(TokenError::Invalid);
        }
        let user_id = parse_id(&claims.sub)?;
        let session_id = parse_id(&claims.sid)?;
        if now.seconds() >= claims.exp {
            return Err(TokenError::Expired);
        }
        Ok(AccessToken {
            user_id,
            session_id,
            expires_at: claims.exp,
        })
    }
}

/// Decimal ids only: `+5`, `05` or ` 5` are not how this server writes them.
fn parse_id(text: &str) -> Result<i64, TokenError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.starts_with('0') {
        return Err(TokenError::Invalid);
    }
    text.parse().map_err(|_| TokenError::Invalid)
}

/// An opaque refresh token: 32 random bytes, base64url. Only its SHA-256 is stored.
pub struct RefreshToken {
    pub token: String,
    pub hash: Vec<u8>,
}

impl RefreshToken {
    pub fn generate() -> Self {
        let mut bytes = [0u8; REFRESH_TOKEN_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        let token = URL_SAFE_NO_PAD.encode(bytes);
        let hash = Self::hash(&token);
        Self { token, hash }
    }

    /// The stored form of a presented token, or `None` when it cannot be one
    /// of ours (so it never reaches the database).
    pub fn hash_presented(token: &str) -> Option<Vec<u8>> {
        let decoded = URL_SAFE_NO_PAD.decode(token).ok()?;
        (decoded.len() == REFRESH_TOKEN_BYTES).then(|| Self::hash(token))
    }

    fn hash(token: &str) -> Vec<u8> {
        Sha256::digest(token.as_bytes()).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn service() -> TokenService {
        TokenService::new(SECRET, "localhost", Duration::from_secs(1800))
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_micros(seconds * 1_000_000)
    }

    #[test]
    fn issued_tokens_verify_and_carry_their_ids() {
        let service = service();
        let (token, exp) = service.issue_access(7, 42, at(1000), at(100_000)).unwrap();
        assert_eq!(exp, 2800);
        let verified = service.verify_access(&token, at(1000)).unwrap();
        assert_eq!(
            verified,
            AccessToken {
                user_id: 7,
                session_id: 42,
                expires_at: 2800
            }
        );
    }

    #[test]
    fn tokens_die_at_their_exp_second_without_leeway() {
        let service = service();
        let (token, exp) = service.issue_access(1, 1, at(1000), at(100_000)).unwrap();
        assert!(service.verify_access(&token, at(exp - 1)).is_ok());
        assert_eq!(
            service.verify_access(&token, at(exp)),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn access_tokens_never_outlive_their_session() {
        let service = service();
        let (_, exp) = service.issue_access(1, 1, at(1000), at(1060)).unwrap();
        assert_eq!(exp, 1060);
    }

    #[test]
    fn a_token_signed_with_another_key_is_refused() {
        let other = TokenService::new(
            b"another-key-another-key-another-key",
            "localhost",
            Duration::from_secs(60),
        );
        let (token, _) = other.issue_access(1, 1, at(1000), at(5000)).unwrap();
        assert_eq!(
            service().verify_access(&token, at(1000)),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn another_issuer_is_refused() {
        let other = TokenService::new(SECRET, "evil.example", Duration::from_secs(60));
        let (token, _) = other.issue_access(1, 1, at(1000), at(5000)).unwrap();
        assert_eq!(
            service().verify_access(&token, at(1000)),
            Err(TokenError::Invalid)
        );
    }

    /// Builds a token by hand, signed with `SECRET`, from raw header and claims JSON.
    fn forge(header: &str, claims: String) -> String {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let key = EncodingKey::from_secret(SECRET);
        let signature =
            jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key, Algorithm::HS256).unwrap();
        format!("{signing_input}.{signature}")
    }

    fn claims(aud: &str, sub: &str) -> String {
        format!(
            r#"{{"sub":"{sub}","sid":"1","iat":1000,"exp":5000,"iss":"localhost","aud":"{aud}","jti":"x"}}"#
        )
    }

    #[test]
    fn alg_none_is_refused() {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"at+jwt"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims("ai-message", "1"));
        let token = format!("{header}.{payload}.");
        assert_eq!(
            service().verify_access(&token, at(1000)),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn a_correctly_signed_token_with_the_wrong_typ_or_audience_is_refused() {
        let good = forge(
            r#"{"alg":"HS256","typ":"at+jwt"}"#,
            claims("ai-message", "1"),
        );
        assert!(
            service().verify_access(&good, at(1000)).is_ok(),
            "the forging helper works"
        );
        let plain_jwt = forge(r#"{"alg":"HS256","typ":"JWT"}"#, claims("ai-message", "1"));
        assert_eq!(
            service().verify_access(&plain_jwt, at(1000)),
            Err(TokenError::Invalid)
        );
        let wrong_aud = forge(r#"{"alg":"HS256","typ":"at+jwt"}"#, claims("other", "1"));
        assert_eq!(
            service().verify_access(&wrong_aud, at(1000)),
            Err(TokenError::Invalid)
        );
        let odd_sub = forge(
            r#"{"alg":"HS256","typ":"at+jwt"}"#,
            claims("ai-message", "+1"),
        );
        assert_eq!(
            service().verify_access(&odd_sub, at(1000)),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn refresh_tokens_are_random_and_only_their_hash_matches() {
        let first = RefreshToken::generate();
        let second = RefreshToken::generate();
        assert_ne!(first.token, second.token);
        assert_eq!(
            RefreshToken::hash_presented(&first.token),
            Some(first.hash.clone())
        );
        assert_ne!(first.hash, first.token.as_bytes());
        assert_eq!(RefreshToken::hash_presented("not-a-token"), None);
        assert_eq!(RefreshToken::hash_presented(""), None);
    }
}
