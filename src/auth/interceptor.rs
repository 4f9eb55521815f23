//! Reads `authorization: Bearer <token>` and verifies the token's form,
//! signature and expiry synchronously (no I/O, so it fits tonic's interceptor).
//! The outcome goes into the request extensions; whether the session is still
//! live is checked by the handler, against the database, on every call.

use std::sync::Arc;

use tonic::{Request, Status, metadata::MetadataMap, service::Interceptor};

use super::tokens::{AccessToken, TokenError, TokenService};
use crate::{
    domain::Clock,
    error::{Reason, refusal},
};

/// What the interceptor found, for handlers to read from the extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerOutcome {
    /// A well-formed, correctly signed, unexpired access token.
    Verified(AccessToken),
    /// No `authorization` metadata at all.
    Missing,
    /// Present but unusable: `TokenExpired`, or `TokenInvalid` (wrong
    /// scheme, bad signature, two entries, ...).
    Rejected(Reason),
}

/// Verifies bearer tokens. With `required`, a call without a usable token is
/// refused here; otherwise (AuthService, where some RPCs are public) the
/// outcome is only recorded and the handler decides.
#[derive(Clone)]
pub struct BearerInterceptor {
    tokens: Arc<TokenService>,
    clock: Arc<dyn Clock>,
    required: bool,
}

impl BearerInterceptor {
    pub fn required(tokens: Arc<TokenService>, clock: Arc<dyn Clock>) -> Self {
        Self {
            tokens,
            clock,
            required: true,
        }
    }

    pub fn optional(tokens: Arc<TokenService>, clock: Arc<dyn Clock>) -> Self {
        Self {
            tokens,
            clock,
            required: false,
        }
    }

    fn inspect(&self, metadata: &MetadataMap) -> BearerOutcome {
        let mut entries = metadata.get_all("authorization").iter();
        let Some(value) = entries.next() else {
            return BearerOutcome::Missing;
        };
        // Two credentials: a proxy may have authorized the other one.
        if entries.next().is_some() {
            return BearerOutcome::Rejected(Reason::TokenInvalid);
        }
        let Some(token) = value.to_str().ok().and_then(bearer_token) else {
            return BearerOutcome::Rejected(Reason::TokenInvalid);
        };
        match self.tokens.verify_access(token, self.clock.now()) {
            Ok(access) => BearerOutcome::Verified(access),
            Err(TokenError::Expired) => BearerOutcome::Rejected(Reason::TokenExpired),
            Err(_) => BearerOutcome::Rejected(Reason::TokenInvalid),
        }
    }
}

/// The token of a `Bearer` credential; the scheme is case-insensitive.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

pub const MISSING_TOKEN: &str = "missing bearer token";
pub const INVALID_TOKEN: &str = "invalid access token";
pub const EXPIRED_TOKEN: &str = "expired access token";

/// The message of a rejected token.
pub fn rejection_text(reason: Reason) -> &'static str {
    if reason == Reason::TokenExpired {
        EXPIRED_TOKEN
    } else {
        INVALID_TOKEN
    }
}

impl Interceptor for BearerInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let outcome = self.inspect(request.metadata());
        if self.required {
            match outcome {
                BearerOutcome::Verified(_) => {}
                BearerOutcome::Missing => {
                    return Err(refusal(Reason::TokenMissing, MISSING_TOKEN, None));
                }
                BearerOutcome::Rejected(reason) => {
                    return Err(refusal(reason, rejection_text(reason), None));
                }
            }
        }
        request.extensions_mut().insert(outcome);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::SystemClock;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }

    fn request_with(header: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(header) = header {
            request
                .metadata_mut()
                .insert("authorization", header.parse().unwrap());
        }
        request
    }

    /// A token service and a token it issued for user 3, session 9.
    fn tokens_and_a_good_token() -> (Arc<TokenService>, String) {
        let tokens = Arc::new(TokenService::new(
            &[7; 32],
            "localhost",
            Duration::from_secs(60),
        ));
        let now = SystemClock.now();
        let (good, _) = tokens
            .issue_access(3, 9, now, now.plus(Duration::from_secs(3600)))
            .unwrap();
        (tokens, good)
    }

    #[test]
    fn required_mode_refuses_missing_and_bad_tokens_and_passes_good_ones() {
        let (tokens, good) = tokens_and_a_good_token();
        let mut interceptor =
            BearerInterceptor::required(Arc::clone(&tokens), Arc::new(SystemClock));

        let missing = interceptor.call(request_with(None)).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        let forged = interceptor
            .call(request_with(Some("Bearer a.b.c")))
            .unwrap_err();
        assert_eq!(forged.code(), tonic::Code::Unauthenticated);

        let passed = interceptor
            .call(request_with(Some(&format!("bearer {good}"))))
            .unwrap();
        let outcome = passed.extensions().get::<BearerOutcome>().copied();
        assert!(
            matches!(outcome, Some(BearerOutcome::Verified(t)) if t.user_id == 3 && t.session_id == 9)
        );
    }

    #[test]
    fn two_authorization_entries_are_refused_even_when_both_are_good() {
        let (tokens, good) = tokens_and_a_good_token();
        let mut request = request_with(Some(&format!("Bearer {good}")));
        request
            .metadata_mut()
            .append("authorization", format!("Bearer {good}").parse().unwrap());
        let mut interceptor = BearerInterceptor::required(tokens, Arc::new(SystemClock));
        let refused = interceptor.call(request).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn optional_mode_records_the_outcome_instead_of_refusing() {
        let tokens = Arc::new(TokenService::new(
            &[7; 32],
            "localhost",
            Duration::from_secs(60),
        ));
        let mut interceptor = BearerInterceptor::optional(tokens, Arc::new(SystemClock));
        let passed = interceptor.call(request_with(Some("Bearer junk"))).unwrap();
        assert_eq!(
            passed.extensions().get::<BearerOutcome>(),
            Some(&BearerOutcome::Rejected(Reason::TokenInvalid))
        );
        let passed = interceptor.call(request_with(None)).unwrap();
        assert_eq!(
            passed.extensions().get::<BearerOutcome>(),
            Some(&BearerOutcome::Missing)
        );
    }
}
