//! Account fields and their rules (Register, CreateUser, UpdateMe, ChangePassword).

use super::FieldViolation;
use super::reject_nul;

/// Longest password bcrypt takes whole: it reads 72 bytes including a NUL
/// terminator, so 71 bytes of password. Longer ones are refused, never cut.
pub const MAX_PASSWORD_BYTES: usize = 71;
pub const MIN_PASSWORD_CHARS: usize = 8;
pub const MAX_EMAIL_CHARS: usize = 255;
pub const MAX_FULL_NAME_CHARS: usize = 255;
pub const MAX_BIO_CHARS: usize = 10_000;

/// 3-100 ASCII letters, digits, `_`, `.` or `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    pub const FIELD: &'static str = "username";

    pub fn parse(value: &str) -> Result<Self, FieldViolation> {
        reject_nul(Self::FIELD, value)?;
        let length = value.chars().count();
        if !(3..=100).contains(&length) {
            return Err(FieldViolation::new(
                Self::FIELD,
                "must be 3 to 100 characters long",
            ));
        }
        if !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(FieldViolation::new(
                Self::FIELD,
                "may contain only letters A-Z and a-z, digits, '_', '.' and '-'",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A plausible address of at most 255 characters, kept lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(field: &'static str, value: &str) -> Result<Self, FieldViolation> {
        reject_nul(field, value)?;
        if value.chars().count() > MAX_EMAIL_CHARS {
            return Err(FieldViolation::new(
                field,
                "must be at most 255 characters long",
            ));
        }
        let invalid =
            || FieldViolation::new(field, "must be an email address such as name@example.com");
        let (local, domain) = value.rsplit_once('@').ok_or_else(invalid)?;
        let plausible = !local.is_empty()
            && local.len() <= 64
            && !local.contains('@')
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..")
            && domain
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '.' | '-'))
            && !value.chars().any(|c| c.is_whitespace() || c.is_control());
        if !plausible {
            return Err(invalid());
        }
        Ok(Self(value.to_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password that passes the contract's rules for new passwords.
pub struct NewPassword(String);

/// Never prints the password itself.
impl std::fmt::Debug for NewPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewPassword(***)")
    }
}

impl NewPassword {
    /// `username` and `email` are the account's, for the "not equal" rule.
    pub fn parse(
        field: &'static str,
        value: &str,
        username: &str,
        email: &str,
    ) -> Result<Self, FieldViolation> {
        reject_nul(field, value)?;
        if value.chars().count() < MIN_PASSWORD_CHARS {
            return Err(FieldViolation::new(
                field,
                "must be at least 8 characters long",
            ));
        }
        if value.len() > MAX_PASSWORD_BYTES {
            return Err(FieldViolation::new(
                field,
                "must be at most 71 bytes long (the most bcrypt uses without truncating)",
            ));
        }
        let lowered = value.to_lowercase();
        if lowered == username.to_lowercase() || lowered == email.to_lowercase() {
            return Err(FieldViolation::new(
                field,
                "must differ from the username and email",
            ));
        }
        if super::common_passwords::is_common(&lowered) {
            return Err(FieldViolation::new(
                field,
                "is one of the most common passwords; choose a less guessable one",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Optional display name of at most 255 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullName(String);

impl FullName {
    pub const FIELD: &'static str = "full_name";

    pub fn parse(value: &str) -> Result<Self, FieldViolation> {
        reject_nul(Self::FIELD, value)?;
        if value.chars().count() > MAX_FULL_NAME_CHARS {
            return Err(FieldViolation::new(
                Self::FIELD,
                "must be at most 255 characters long",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// Optional free text of at most 10,000 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bio(String);

impl Bio {
    pub const FIELD: &'static str = "bio";

    pub fn parse(value: &str) -> Result<Self, FieldViolation> {
        reject_nul(Self::FIELD, value)?;
        if value.chars().count() > MAX_BIO_CHARS {
            return Err(FieldViolation::new(
                Self::FIELD,
                "must be at most 10000 characters long",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// The fields of a new account (Register, CreateUser, create-superuser),
/// each checked, every violation reported at once.
pub struct NewAccount {
    pub username: Username,
    pub email: Email,
    pub password: NewPassword,
    pub full_name: Option<FullName>,
}

impl NewAccount {
    pub fn parse(
        username: &str,
        email: &str,
        password: &str,
        full_name: Option<&str>,
    ) -> Result<Self, super::Violations> {
        let mut violations = super::Violations::default();
        let parsed_username = violations.check(Username::parse(username));
        let parsed_email = violations.check(Email::parse("email", email));
        let parsed_password =
            violations.check(NewPassword::parse("password", password, username, email));
        let parsed_full_name = match full_name {
            Some(name) => violations.check(FullName::parse(name)).map(Some),
            None => Some(None),
        };
        let account = (|| {
            Some(Self {
                username: parsed_username?,
                email: parsed_email?,
                password: parsed_password?,
                full_name: parsed_full_name?,
            })
        })();
        violations.finish(account)
    }
}

/// A role name: 1-100 characters, no surrounding blanks, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleName(String);

impl RoleName {
    pub const FIELD: &'static str = "name";

    pub fn parse(value: &str) -> Result<Self, FieldViolation> {
        reject_nul(Self::FIELD, value)?;
        if value.trim() != value || value.is_empty() || value.chars().count() > 100 {
            return Err(FieldViolation::new(
                Self::FIELD,
                "must be 1 to 100 characters long, without leading or trailing blanks",
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(FieldViolation::new(
                Self::FIELD,
                "must not contain control characters",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A role description of at most 1,000 characters.
pub fn parse_role_description(value: &str) -> Result<String, FieldViolation> {
    reject_nul("description", value)?;
    if value.chars().count() > 1000 {
        return Err(FieldViolation::new(
            "description",
            "must be at most 1000 characters long",
        ));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_follow_the_contract() {
        for good in ["abc", "a.b-c_d", "Zed99", &"x".repeat(100)] {
            assert!(Username::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "ab",
            "a b",
            "émile",
            "a\0bc",
            "semi;colon",
            &"x".repeat(101),
        ] {
            let violation = Username::parse(bad).unwrap_err();
            assert_eq!(violation.field, "username", "{bad}");
        }
    }

    #[test]
    fn emails_are_lowercased_and_must_be_plausible() {
        assert_eq!(
            Email::parse("email", "Ann@Example.COM").unwrap().as_str(),
            "ann@example.com"
        );
        for bad in [
            "",
            "ann",
            "ann@",
            "@example.com",
            "ann@example",
            "a n@example.com",
            "ann@ex..com",
        ] {
            assert!(Email::parse("email", bad).is_err(), "{bad}");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(Email::parse("email", &long).is_err());
    }

    #[test]
    fn passwords_count_characters_for_the_minimum_and_bytes_for_the_maximum() {
        // Eight 3-byte characters: 8 code points, 24 bytes.
        assert!(NewPassword::parse("password", "ääääääää", "u", "e@x.io").is_ok());
        assert!(NewPassword::parse("password", "äääääää", "u", "e@x.io").is_err());
        let seventy_one = "Zq7".repeat(23) + "xy";
        assert_eq!(seventy_one.len(), 71);
        assert!(NewPassword::parse("password", &seventy_one, "u", "e@x.io").is_ok());
        let seventy_two = seventy_one + "z";
        let violation = NewPassword::parse("password", &seventy_two, "u", "e@x.io").unwrap_err();
        assert!(violation.description.contains("71 bytes"));
    }

    #[test]
    fn passwords_may_not_equal_username_or_email_in_any_case() {
        assert!(NewPassword::parse("password", "AliceWonder", "alicewonder", "a@x.io").is_err());
        assert!(NewPassword::parse("password", "A@X.IO.long", "bob", "a@x.io.long").is_err());
    }

    #[test]
    fn common_passwords_are_refused_with_the_field_name() {
        let violation =
            NewPassword::parse("new_password", "Password123", "u", "e@x.io").unwrap_err();
        assert_eq!(violation.field, "new_password");
        assert!(violation.description.contains("common"));
    }

    #[test]
    fn a_new_account_reports_every_bad_field_at_once() {
        let error = NewAccount::parse("a", "nope", "short", Some(&"n".repeat(300)))
            .err()
            .unwrap();
        let fields: Vec<_> = error.into_inner().iter().map(|v| v.field).collect();
        assert_eq!(fields, ["username", "email", "password", "full_name"]);
    }

    #[test]
    fn role_names_are_trimmed_non_empty_and_short() {
        assert!(RoleName::parse("moderator").is_ok());
        for bad in ["", " admin", "admin ", "a\nb", &"r".repeat(101)] {
            assert_eq!(RoleName::parse(bad).unwrap_err().field, "name", "{bad:?}");
        }
        assert!(parse_role_description(&"d".repeat(1001)).is_err());
    }

    #[test]
    fn full_name_and_bio_limits() {
        assert!(FullName::parse(&"n".repeat(255)).is_ok());
        assert!(FullName::parse(&"n".repeat(256)).is_err());
        assert!(Bio::parse(&"b".repeat(10_000)).is_ok());
        assert_eq!(Bio::parse(&"b".repeat(10_001)).unwrap_err().field, "bio");
    }
}
