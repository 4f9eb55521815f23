//! Message fields and their rules.

use super::FieldViolation;
use super::reject_nul;

/// Why a message to a disabled account is refused.
pub const RECIPIENT_DISABLED: &str = "the recipient's account is disabled";

pub const MAX_CONTENT_CHARS: usize = 16_384;
pub const MAX_CONVERSATION_ID_CHARS: usize = 100;
/// Most ids MarkRead takes in one call, duplicates counted.
pub const MAX_MARK_READ_IDS: usize = 1000;

/// Message text: not blank, at most 16,384 characters (kept as sent).
pub fn parse_content(value: &str) -> Result<String, FieldViolation> {
    reject_nul("content", value)?;
    if value.trim().is_empty() {
        return Err(FieldViolation::new("content", "must not be empty"));
    }
    if value.chars().count() > MAX_CONTENT_CHARS {
        return Err(FieldViolation::new(
            "content",
            "must be at most 16384 characters long",
        ));
    }
    Ok(value.to_owned())
}

/// 1-100 ASCII letters, digits, `_`, `-`, `:` or `.`.
pub fn parse_conversation_id(value: &str) -> Result<String, FieldViolation> {
    parse_identifier("conversation_id", value)
}

/// SendMessage's `request_id`: the same characters as a conversation id.
pub fn parse_request_id(value: &str) -> Result<String, FieldViolation> {
    parse_identifier("request_id", value)
}

pub const MIN_SEARCH_CHARS: usize = 3;
pub const MAX_SEARCH_CHARS: usize = 200;

/// SearchMessages' `query`: 3-200 characters (a trigram needs three).
pub fn parse_search_query(value: &str) -> Result<String, FieldViolation> {
    reject_nul("query", value)?;
    if !(MIN_SEARCH_CHARS..=MAX_SEARCH_CHARS).contains(&value.chars().count()) {
        return Err(FieldViolation::new(
            "query",
            "must be 3 to 200 characters long",
        ));
    }
    Ok(value.to_owned())
}

/// What an idempotent send asked for, as a digest: a retry under the same
/// `request_id` must ask for exactly the same message. Fields are
/// length-prefixed so that no two requests share a digest by concatenation.
pub fn request_fingerprint(
    recipient_id: i64,
    content: &str,
    parent_id: Option<i64>,
    conversation_id: Option<&str>,
) -> Vec<u8> {
    use sha2::{Digest as _, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(recipient_id.to_le_bytes());
    hasher.update(content.len().to_le_bytes());
    hasher.update(content.as_bytes());
    match parent_id {
        Some(parent_id) => {
            hasher.update([1]);
            hasher.update(parent_id.to_le_bytes());
        }
        None => hasher.update([0]),
    }
    match conversation_id {
        Some(conversation_id) => {
            hasher.update([1]);
            hasher.update(conversation_id.as_bytes());
        }
        None => hasher.update([0]),
    }
    hasher.finalize().to_vec()
}

/// 1-100 ASCII letters, digits, `_`, `-`, `:` or `.`, for `field`.
fn parse_identifier(field: &'static str, value: &str) -> Result<String, FieldViolation> {
    const FIELD_RULES: &str = "may contain only letters A-Z and a-z, digits, '_', '-', ':' and '.'";
    reject_nul(field, value)?;
    let length = value.chars().count();
    if !(1..=MAX_CONVERSATION_ID_CHARS).contains(&length) {
        return Err(FieldViolation::new(
            field,
            "must be 1 to 100 characters long",
        ));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.'))
    {
        return Err(FieldViolation::new(field, FIELD_RULES));
    }
    Ok(value.to_owned())
}

/// The conversation a pair of users shares when neither names one.
pub fn default_conversation_id(first_user: i64, second_user: i64) -> String {
    format!(
        "dm:{}:{}",
        first_user.min(second_user),
        first_user.max(second_user)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_must_not_be_blank_or_too_long() {
        assert_eq!(parse_content("  hi ").unwrap(), "  hi ");
        for bad in ["", "   \n\t", "a\0b"] {
            assert_eq!(parse_content(bad).unwrap_err().field, "content", "{bad:?}");
        }
        assert!(
            parse_content(&"é".repeat(16_384)).is_ok(),
            "characters, not bytes"
        );
        assert!(parse_content(&"a".repeat(16_385)).is_err());
    }

    #[test]
    fn conversation_ids_follow_the_contract() {
        for good in ["general", "a-b_c:d.e", &"x".repeat(100)] {
            assert!(parse_conversation_id(good).is_ok(), "{good}");
        }
        for bad in ["", "with space", "slash/", "ümlaut", &"x".repeat(101)] {
            assert_eq!(
                parse_conversation_id(bad).unwrap_err().field,
                "conversation_id",
                "{bad}"
            );
        }
    }

    #[test]
    fn request_ids_and_search_queries_follow_the_contract() {
        assert!(parse_request_id("retry-1:a.b_c").is_ok());
        for bad in ["", "with space", &"x".repeat(101), "a\0"] {
            assert_eq!(
                parse_request_id(bad).unwrap_err().field,
                "request_id",
                "{bad:?}"
            );
        }
        assert!(parse_search_query("abc").is_ok());
        assert!(
            parse_search_query(&"é".repeat(200)).is_ok(),
            "characters, not bytes"
        );
        for bad in ["ab", "", &"x".repeat(201), "a\0b"] {
            assert_eq!(
                parse_search_query(bad).unwrap_err().field,
                "query",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn fingerprints_tell_every_field_apart() {
        let base = request_fingerprint(2, "hi", None, None);
        assert_eq!(base, request_fingerprint(2, "hi", None, None));
        for other in [
            request_fingerprint(3, "hi", None, None),
            request_fingerprint(2, "hi!", None, None),
            request_fingerprint(2, "hi", Some(1), None),
            request_fingerprint(2, "hi", None, Some("c")),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn the_default_conversation_is_the_same_from_both_sides() {
        assert_eq!(default_conversation_id(9, 4), default_conversation_id(4, 9));
        assert!(parse_conversation_id(&default_conversation_id(4, 9)).is_ok());
    }
}
