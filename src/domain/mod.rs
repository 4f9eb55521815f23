//! Validated values ("parse, don't validate"): once a request field is turned
//! into one of these types it obeys the contract's rules. No I/O here.

pub mod account;
mod common_passwords;
pub mod message;
pub mod paging;
pub mod time;
pub mod violation;

pub use account::{Bio, Email, FullName, NewAccount, NewPassword, Username};
pub use time::{Clock, ManualClock, SystemClock, Timestamp};
pub use violation::{FieldViolation, Violations};

/// Refuses U+0000 in a string field (contract: `INVALID_ARGUMENT`).
pub fn reject_nul(field: &'static str, value: &str) -> Result<(), FieldViolation> {
    if value.contains('\0') {
        Err(FieldViolation::new(
            field,
            "must not contain the NUL character (U+0000)",
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod properties {
    //! Validation never panics, and whatever it accepts obeys the rules.

    use proptest::prelude::*;

    use super::{
        account::{Email, NewPassword, Username},
        message::{parse_content, parse_conversation_id},
        paging::PageScope,
    };

    proptest! {
        #[test]
        fn accepted_usernames_follow_the_rules(value in "\\PC{0,120}|[a-zA-Z0-9_.-]{0,110}") {
            if let Ok(username) = Username::parse(&value) {
                let length = username.as_str().chars().count();
                prop_assert!((3..=100).contains(&length));
                prop_assert!(username.as_str().chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)));
            }
        }

        #[test]
        fn accepted_emails_are_lower_case_and_short(value in "\\PC{0,300}|[a-zA-Z0-9.]{1,20}@[a-zA-Z0-9.-]{1,20}") {
            if let Ok(email) = Email::parse("email", &value) {
                prop_assert_eq!(email.as_str(), value.to_lowercase());
                prop_assert!(email.as_str().chars().count() <= 255);
                prop_assert!(!email.as_str().contains('\0'));
            }
        }

        #[test]
        fn accepted_passwords_fit_bcrypt_whole(value in "\\PC{0,80}", name in "[a-z]{3,10}") {
            if let Ok(password) = NewPassword::parse("password", &value, &name, "e@x.io") {
                prop_assert!(password.as_str().len() <= 71);
                prop_assert!(password.as_str().chars().count() >= 8);
            }
        }

        #[test]
        fn content_and_conversation_ids_never_panic(content in any::<String>(), conversation in any::<String>()) {
            if let Ok(accepted) = parse_content(&content) {
                prop_assert!(!accepted.trim().is_empty());
            }
            if let Ok(accepted) = parse_conversation_id(&conversation) {
                prop_assert!(accepted.len() <= 100);
            }
        }

        #[test]
        fn arbitrary_page_tokens_are_refused_or_round_trip(token in any::<String>(), cursor in any::<i64>()) {
            let scope = PageScope { rpc: "ListUsers", caller_id: 1, filters: &["q"] };
            let _ = scope.decode(&token, 1);
            prop_assert_eq!(scope.decode(&scope.encode(&[cursor]), 1).unwrap(), Some(vec![cursor]));
        }
    }
}
