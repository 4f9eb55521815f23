//! Validated values ("parse, don't validate"): once a request field is turned
//! into one of these types it obeys the contract's rules. No I/O here.

pub mod account;
mod common_passwords;
pub mod message;
pub mod paging;
pub mod time;

pub use account::{Bio, Email, FullName, NewAccount, NewPassword, Username};
pub use time::Timestamp;

use crate::error::FieldViolation;

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

/// Collects the violations of several fields so that one answer names them all.
#[derive(Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// Keeps the value, or records its violation and returns `None`.
    pub fn check<T>(&mut self, result: Result<T, FieldViolation>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(violation) => {
                self.0.push(violation);
                None
            }
        }
    }

    pub fn push(&mut self, violation: FieldViolation) {
        self.0.push(violation);
    }

    pub fn into_result(self) -> Result<(), crate::error::AppError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(crate::error::AppError::InvalidArgument(self.0))
        }
    }
}
