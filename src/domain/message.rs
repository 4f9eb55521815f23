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
    const FIELD: &str = "conversation_id";
    reject_nul(FIELD, value)?;
    let length = value.chars().count();
    if !(1..=MAX_CONVERSATION_ID_CHARS).contains(&length) {
        return Err(FieldViolation::new(
            FIELD,
            "must be 1 to 100 characters long",
        ));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.'))
    {
        return Err(FieldViolation::new(
            FIELD,
            "may contain only letters A-Z and a-z, digits, '_', '-', ':' and '.'",
        ));
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
    fn the_default_conversation_is_the_same_from_both_sides() {
        assert_eq!(default_conversation_id(9, 4), default_conversation_id(4, 9));
        assert!(parse_conversation_id(&default_conversation_id(4, 9)).is_ok());
    }
}
