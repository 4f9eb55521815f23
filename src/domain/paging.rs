//! Page sizes and opaque keyset page tokens.
//!
//! A token carries the RPC it was issued for, the caller, a digest of the
//! filters and the keyset cursor (the sort key of the last item served), so a
//! token replayed for another RPC, caller or filter set is refused. Tokens are
//! base64url text; their content is not a promise to clients.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest as _, Sha256};

use super::FieldViolation;

pub const DEFAULT_PAGE_SIZE: i64 = 50;
pub const MAX_PAGE_SIZE: i64 = 1000;
const VERSION: &str = "p1";

/// 0 means the default, more than the maximum is clamped, negative is refused.
pub fn page_size(requested: i32) -> Result<i64, FieldViolation> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(FieldViolation::new("page_size", "must not be negative")),
        n => Ok(i64::from(n).min(MAX_PAGE_SIZE)),
    }
}

/// What a page token is bound to.
pub struct PageScope<'a> {
    pub rpc: &'a str,
    pub caller_id: i64,
    /// Every filter of the request, in a fixed order.
    pub filters: &'a [&'a str],
}

impl PageScope<'_> {
    fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        for filter in self.filters {
            hasher.update(filter.len().to_le_bytes());
            hasher.update(filter.as_bytes());
        }
        hasher.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The token for the page after the item whose sort key is `cursor`.
    pub fn encode(&self, cursor: &[i64]) -> String {
        let cursor: Vec<String> = cursor.iter().map(i64::to_string).collect();
        let text = format!(
            "{VERSION}|{}|{}|{}|{}",
            self.rpc,
            self.caller_id,
            self.digest(),
            cursor.join(",")
        );
        URL_SAFE_NO_PAD.encode(text)
    }

    /// The cursor in `token`, `None` for an empty token (the first page).
    /// Anything else than a token this scope issued is `INVALID_ARGUMENT`.
    pub fn decode(
        &self,
        token: &str,
        cursor_len: usize,
    ) -> Result<Option<Vec<i64>>, FieldViolation> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid =
            || FieldViolation::new("page_token", "is not a page token issued for this request");
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let parts: Vec<&str> = text.split('|').collect();
        let [version, rpc, caller, digest, cursor] = parts.as_slice() else {
            return Err(invalid());
        };
        if *version != VERSION
            || *rpc != self.rpc
            || *caller != self.caller_id.to_string()
            || *digest != self.digest()
        {
            return Err(invalid());
        }
        let cursor: Vec<i64> = cursor
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| invalid())?;
        if cursor.len() != cursor_len {
            return Err(invalid());
        }
        Ok(Some(cursor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope<'a>(rpc: &'a str, caller_id: i64, filters: &'a [&'a str]) -> PageScope<'a> {
        PageScope {
            rpc,
            caller_id,
            filters,
        }
    }

    #[test]
    fn page_sizes_follow_the_contract() {
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_size(7).unwrap(), 7);
        assert_eq!(page_size(5000).unwrap(), 1000);
        assert_eq!(page_size(-1).unwrap_err().field, "page_size");
    }

    #[test]
    fn a_token_round_trips_in_its_own_scope() {
        let scope = scope("ListUsers", 3, &["ann"]);
        let token = scope.encode(&[42]);
        assert_eq!(scope.decode(&token, 1).unwrap(), Some(vec![42]));
        assert_eq!(scope.decode("", 1).unwrap(), None);
    }

    #[test]
    fn a_token_is_refused_for_another_rpc_caller_or_filter() {
        let token = scope("ListUsers", 3, &["ann"]).encode(&[42]);
        assert!(
            scope("ListMessages", 3, &["ann"])
                .decode(&token, 1)
                .is_err()
        );
        assert!(scope("ListUsers", 4, &["ann"]).decode(&token, 1).is_err());
        assert!(scope("ListUsers", 3, &["bob"]).decode(&token, 1).is_err());
        assert!(scope("ListUsers", 3, &["ann"]).decode(&token, 2).is_err());
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let scope = scope("ListUsers", 3, &[]);
        for token in ["!!", "bm9wZQ", "cDF8TGlzdFVzZXJzfDN8eHh8YWJj"] {
            assert_eq!(
                scope.decode(token, 1).unwrap_err().field,
                "page_token",
                "{token}"
            );
        }
    }
}
