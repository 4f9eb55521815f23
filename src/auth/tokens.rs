//! Access tokens (RFC 9068 `typ: at+jwt` JWTs) and opaque refresh tokens.
//! Access tokens are HS256, or EdDSA (Ed25519) with a `kid` when a signing
//! key is configured: then only EdDSA is accepted, from the signing key or
//! a listed verification key, so services can verify with public keys alone.
//!
//! Every check that needs no database happens here: algorithm pinned, signature,
//! `typ`, `iss`, `aud`, and expiry without leeway (a token is dead from its
//! `exp` second on). Functions take `now` so expiry is tested without sleeping.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard, PoisonError},
};

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

/// An Ed25519 public key that verifies tokens, with its RFC 7638 thumbprint.
struct VerifyKey {
    kid: String,
    public: [u8; 32],
    decoding: DecodingKey,
}

impl VerifyKey {
    fn new(public: [u8; 32]) -> Self {
        Self {
            kid: thumbprint(&public),
            decoding: DecodingKey::from_ed_der(&public),
            public,
        }
    }
}

/// The RFC 7638 JWK thumbprint of an Ed25519 key: SHA-256 over the required
/// members in lexicographic order, base64url without padding.
pub fn thumbprint(public: &[u8; 32]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(public)
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// How tokens are signed and which keys verify them.
enum Keys {
    Hs256 {
        encoding: EncodingKey,
        decoding: DecodingKey,
    },
    /// The signing key is `verify[0]`; the others are still accepted.
    EdDsa {
        encoding: EncodingKey,
        verify: Vec<VerifyKey>,
    },
}

/// A key file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

/// Reads a PEM Ed25519 private key (PKCS#8): the signing key.
pub fn read_signing_key(pem: &str) -> Result<ed25519_dalek::SigningKey, KeyError> {
    use ed25519_dalek::pkcs8::DecodePrivateKey as _;
    ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
        .map_err(|_| KeyError("not an Ed25519 private key in PKCS#8 PEM".into()))
}

/// Reads a PEM Ed25519 public key (SPKI) or private key: a verification key.
pub fn read_verify_key(pem: &str) -> Result<[u8; 32], KeyError> {
    use ed25519_dalek::pkcs8::DecodePublicKey as _;
    if let Ok(signing) = read_signing_key(pem) {
        return Ok(signing.verifying_key().to_bytes());
    }
    ed25519_dalek::VerifyingKey::from_public_key_pem(pem)
        .map(|key| key.to_bytes())
        .map_err(|_| KeyError("not an Ed25519 public or private key in PEM".into()))
}

pub struct TokenService {
    keys: Keys,
    validation: Validation,
    issuer: String,
    access_ttl_seconds: i64,
    verified: VerifiedTokens,
}

/// Access tokens that passed every check here, by their exact text: a
/// client presents the same token on every call until it expires, and the
/// base64, JSON and signature work (5-6% of a GetMe's CPU with HS256, far
/// more with EdDSA) is then done once per token, as Envoy's `jwt_authn`
/// caches verified tokens. Nothing else is cached: expiry and `nbf` are
/// checked against each call's `now`, the session on every call. The keys
/// never change while the process runs, so a verdict stays true.
#[derive(Default)]
struct VerifiedTokens {
    entries: Mutex<HashMap<Box<str>, Verified>>,
}

#[derive(Clone, Copy)]
struct Verified {
    access: AccessToken,
    not_before: Option<i64>,
}

/// More tokens than this and the cache starts over (memory stays bounded:
/// about 3 MB of token text).
const MAX_VERIFIED_TOKENS: usize = 10_000;

impl VerifiedTokens {
    fn lock(&self) -> MutexGuard<'_, HashMap<Box<str>, Verified>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, token: &str) -> Option<Verified> {
        self.lock().get(token).copied()
    }

    fn insert(&self, token: &str, verified: Verified) {
        let mut entries = self.lock();
        if entries.len() >= MAX_VERIFIED_TOKENS {
            entries.clear();
        }
        entries.insert(token.into(), verified);
    }
}

impl TokenService {
    /// HS256 with a shared secret.
    pub fn new(secret: &[u8], issuer: &str, access_ttl: std::time::Duration) -> Self {
        Self::with_keys(
            Keys::Hs256 {
                encoding: EncodingKey::from_secret(secret),
                decoding: DecodingKey::from_secret(secret),
            },
            Algorithm::HS256,
            issuer,
            access_ttl,
        )
    }

    /// EdDSA: tokens signed with `signing`, accepted from it and from every
    /// key of `also_accepted`.
    pub fn ed25519(
        signing: &ed25519_dalek::SigningKey,
        also_accepted: &[[u8; 32]],
        issuer: &str,
        access_ttl: std::time::Duration,
    ) -> Result<Self, KeyError> {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        let der = signing
            .to_pkcs8_der()
            .map_err(|_| KeyError("the signing key does not encode".into()))?;
        let mut verify = vec![VerifyKey::new(signing.verifying_key().to_bytes())];
        for public in also_accepted {
            let key = VerifyKey::new(*public);
            if verify.iter().all(|known| known.kid != key.kid) {
                verify.push(key);
            }
        }
        Ok(Self::with_keys(
            Keys::EdDsa {
                encoding: EncodingKey::from_ed_der(der.as_bytes()),
                verify,
            },
            Algorithm::EdDSA,
            issuer,
            access_ttl,
        ))
    }

    fn with_keys(
        keys: Keys,
        algorithm: Algorithm,
        issuer: &str,
        access_ttl: std::time::Duration,
    ) -> Self {
        // One algorithm family at a time: the header's `alg` must be this one.
        let mut validation = Validation::new(algorithm);
        // Expiry is checked by `verify_access` against the caller's `now`, with
        // no leeway; jsonwebtoken's own check would allow `exp == now`.
        validation.validate_exp = false;
        validation.leeway = 0;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Self {
            keys,
            validation,
            issuer: issuer.to_owned(),
            access_ttl_seconds: i64::try_from(access_ttl.as_secs()).unwrap_or(i64::MAX),
            verified: VerifiedTokens::default(),
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
        let (mut header, encoding) = match &self.keys {
            Keys::Hs256 { encoding, .. } => (Header::new(Algorithm::HS256), encoding),
            Keys::EdDsa { encoding, verify } => {
                let mut header = Header::new(Algorithm::EdDSA);
                header.kid = verify.first().map(|key| key.kid.clone());
                (header, encoding)
            }
        };
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
        let token = jsonwebtoken::encode(&header, &claims, encoding)?;
        Ok((token, expires_at))
    }

    /// The public keys that verify access tokens, as JWKs (the signing key
    /// first): none with HS256, whose key is never published.
    pub fn public_keys(&self) -> Vec<crate::proto::Jwk> {
        let Keys::EdDsa { verify, .. } = &self.keys else {
            return Vec::new();
        };
        verify
            .iter()
            .map(|key| crate::proto::Jwk {
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                x: URL_SAFE_NO_PAD.encode(key.public),
                kid: key.kid.clone(),
                alg: "EdDSA".into(),
                r#use: "sig".into(),
            })
            .collect()
    }

    /// The key for a token: HS256's one, or the EdDSA key its `kid` names
    /// (a missing or unknown `kid` verifies nothing).
    fn decoding_key(&self, token: &str) -> Result<&DecodingKey, TokenError> {
        match &self.keys {
            Keys::Hs256 { decoding, .. } => Ok(decoding),
            Keys::EdDsa { verify, .. } => {
                let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
                let kid = header.kid.ok_or(TokenError::Invalid)?;
                verify
                    .iter()
                    .find(|key| key.kid == kid)
                    .map(|key| &key.decoding)
                    .ok_or(TokenError::Invalid)
            }
        }
    }

    /// Checks everything about an access token that needs no database.
    pub fn verify_access(&self, token: &str, now: Timestamp) -> Result<AccessToken, TokenError> {
        let verified = match self.verified.get(token) {
            Some(verified) => verified,
            None => {
                let verified = self.verify_signed(token)?;
                self.verified.insert(token, verified);
                verified
            }
        };
        if verified.not_before.is_some_and(|nbf| now.seconds() < nbf) {
            return Err(TokenError::Invalid);
        }
        if now.seconds() >= verified.access.expires_at {
            return Err(TokenError::Expired);
        }
        Ok(verified.access)
    }

    /// What holds of a token at any time: algorithm, signature, header and
    /// claims (the time checks are `verify_access`'s).
    fn verify_signed(&self, token: &str) -> Result<Verified, TokenError> {
        let key = self.decoding_key(token)?;
        let data = jsonwebtoken::decode::<AccessClaims>(token, key, &self.validation)
            .map_err(|_| TokenError::Invalid)?;
        // No critical extension is understood, so a token naming any is refused
        // (RFC 7515 4.1.11).
        if data.header.typ.as_deref() != Some(ACCESS_TOKEN_TYPE) || data.header.crit.is_some() {
            return Err(TokenError::Invalid);
        }
        let claims = data.claims;
        Ok(Verified {
            access: AccessToken {
                user_id: parse_id(&claims.sub)?,
                session_id: parse_id(&claims.sid)?,
                expires_at: claims.exp,
            },
            not_before: claims.nbf,
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

    fn ed25519(seed: u8, also: &[[u8; 32]]) -> TokenService {
        let signing = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        TokenService::ed25519(&signing, also, "localhost", Duration::from_secs(1800)).unwrap()
    }

    fn public(seed: u8) -> [u8; 32] {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
            .verifying_key()
            .to_bytes()
    }

    #[test]
    fn the_thumbprint_is_rfc_8037s_example() {
        let x: [u8; 32] = URL_SAFE_NO_PAD
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(
            thumbprint(&x),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn eddsa_tokens_name_their_key_and_verify_with_it_only() {
        let service = ed25519(1, &[]);
        let (token, _) = service.issue_access(7, 42, at(1000), at(100_000)).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::EdDSA);
        assert_eq!(header.kid.as_deref(), Some(thumbprint(&public(1)).as_str()));
        assert_eq!(service.verify_access(&token, at(1000)).unwrap().user_id, 7);
        // Another key, even one listing this key's kid, does not take it.
        assert_eq!(
            ed25519(2, &[]).verify_access(&token, at(1000)),
            Err(TokenError::Invalid)
        );
        let keys = service.public_keys();
        assert_eq!(keys.len(), 1);
        assert_eq!(
            (
                keys[0].kty.as_str(),
                keys[0].crv.as_str(),
                keys[0].alg.as_str()
            ),
            ("OKP", "Ed25519", "EdDSA")
        );
    }

    #[test]
    fn after_rotation_both_keys_verify_and_hs256_or_none_never_does() {
        let old = ed25519(1, &[]);
        let (old_token, _) = old.issue_access(7, 42, at(1000), at(100_000)).unwrap();
        let rotated = ed25519(2, &[public(1)]);
        let (new_token, _) = rotated.issue_access(8, 43, at(1000), at(100_000)).unwrap();
        assert!(rotated.verify_access(&old_token, at(1000)).is_ok());
        assert!(rotated.verify_access(&new_token, at(1000)).is_ok());
        let kids: Vec<String> = rotated.public_keys().into_iter().map(|k| k.kid).collect();
        assert_eq!(
            kids,
            [thumbprint(&public(2)), thumbprint(&public(1))],
            "signing key first"
        );
        // An HS256 token (whatever its secret) while keys are in use.
        let (hs256, _) = service()
            .issue_access(7, 42, at(1000), at(100_000))
            .unwrap();
        assert_eq!(
            rotated.verify_access(&hs256, at(1000)),
            Err(TokenError::Invalid)
        );
        // alg none, with a known kid.
        let parts: Vec<&str> = new_token.split('.').collect();
        let none_header = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"alg":"none","typ":"at+jwt","kid":"{}"}}"#,
            thumbprint(&public(2))
        ));
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert_eq!(
            rotated.verify_access(&unsigned, at(1000)),
            Err(TokenError::Invalid)
        );
        // A kid that names no key, and none at all.
        let unknown = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA","typ":"at+jwt","kid":"nobody"}"#),
            parts[1],
            parts[2]
        );
        assert_eq!(
            rotated.verify_access(&unknown, at(1000)),
            Err(TokenError::Invalid)
        );
        let kidless = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA","typ":"at+jwt"}"#),
            parts[1],
            parts[2]
        );
        assert_eq!(
            rotated.verify_access(&kidless, at(1000)),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn key_files_are_read_as_pem_and_other_things_refused() {
        use ed25519_dalek::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
        let signing = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let private = signing
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .unwrap();
        let public_pem = signing
            .verifying_key()
            .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .unwrap();
        assert_eq!(
            read_signing_key(&private).unwrap().to_bytes(),
            signing.to_bytes()
        );
        assert_eq!(read_verify_key(&private).unwrap(), public(3));
        assert_eq!(read_verify_key(&public_pem).unwrap(), public(3));
        assert!(
            read_signing_key(&public_pem).is_err(),
            "a public key cannot sign"
        );
        assert!(read_signing_key("not a key").is_err());
        assert!(
            read_verify_key("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
                .is_err()
        );
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
    fn a_remembered_token_still_dies_at_its_exp_and_waits_for_its_nbf() {
        let service = service();
        let (token, exp) = service.issue_access(1, 1, at(1000), at(100_000)).unwrap();
        assert!(service.verify_access(&token, at(1000)).is_ok());
        assert!(service.verified.get(&token).is_some(), "remembered");
        assert_eq!(
            service.verify_access(&token, at(exp)),
            Err(TokenError::Expired)
        );
        let later = forge(
            r#"{"alg":"HS256","typ":"at+jwt"}"#,
            claims("ai-message", "1").replace(r#""jti""#, r#""nbf":2000,"jti""#),
        );
        assert_eq!(
            service.verify_access(&later, at(1999)),
            Err(TokenError::Invalid)
        );
        assert!(service.verify_access(&later, at(2000)).is_ok());
        // A clock set back (or a caller's earlier `now`) sees it refused again.
        assert_eq!(
            service.verify_access(&later, at(1999)),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn only_the_exact_text_of_a_verified_token_is_remembered() {
        let service = service();
        let (token, _) = service.issue_access(1, 1, at(1000), at(100_000)).unwrap();
        assert!(service.verify_access(&token, at(1000)).is_ok());
        // Every one-character change to a remembered token: signature,
        // claims or header, and what padding or trailing bytes make of it.
        let mut altered: Vec<String> = (0..token.len())
            .filter(|&i| token.as_bytes()[i] != b'.')
            .map(|i| {
                let mut bytes = token.clone().into_bytes();
                bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
                String::from_utf8(bytes).unwrap()
            })
            .collect();
        altered.extend([
            format!("{token}="),
            format!("{token} "),
            format!("{token}."),
        ]);
        for forged in altered {
            assert_eq!(
                service.verify_access(&forged, at(1000)),
                Err(TokenError::Invalid),
                "{forged}"
            );
            assert!(service.verified.get(&forged).is_none());
        }
        // A token of another key, presented after ours, is still checked.
        let other = TokenService::new(
            b"another-key-another-key-another-key",
            "localhost",
            Duration::from_secs(60),
        );
        let (foreign, _) = other.issue_access(1, 1, at(1000), at(5000)).unwrap();
        assert_eq!(
            service.verify_access(&foreign, at(1000)),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn the_remembered_tokens_stay_bounded() {
        let service = service();
        for session_id in 0..=i64::try_from(MAX_VERIFIED_TOKENS).unwrap() {
            let (token, _) = service
                .issue_access(1, session_id + 1, at(1000), at(100_000))
                .unwrap();
            assert!(service.verify_access(&token, at(1000)).is_ok());
        }
        let remembered = service.verified.lock().len();
        assert!(
            (1..=MAX_VERIFIED_TOKENS).contains(&remembered),
            "{remembered} tokens remembered"
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
