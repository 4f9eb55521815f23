//! `AppError`, the one error type of the rules layer, and its one mapping to
//! `tonic::Status`. Handlers return `AppError` with `?`; storage errors arrive
//! through `From<StorageError>`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub use crate::domain::FieldViolation;
use crate::{domain::Violations, storage::StorageError};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Request fields that break the contract's rules; never empty.
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("{0}")]
    NotFound(String),
    /// A unique field already taken by another record.
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(&'static str),
    /// The database (or another dependency) cannot be reached right now.
    #[error("service temporarily unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// A bug or an unexpected server-side failure; details stay in the log.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl AppError {
    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    pub fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self::Internal(error.into())
    }
}

impl From<Violations> for AppError {
    fn from(violations: Violations) -> Self {
        Self::InvalidArgument(violations.into_inner())
    }
}

impl From<FieldViolation> for AppError {
    fn from(violation: FieldViolation) -> Self {
        Self::InvalidArgument(vec![violation])
    }
}

impl From<Violations> for Status {
    fn from(violations: Violations) -> Self {
        AppError::from(violations).into()
    }
}

impl From<StorageError> for Status {
    fn from(error: StorageError) -> Self {
        AppError::from(error).into()
    }
}

impl From<StorageError> for AppError {
    fn from(error: StorageError) -> Self {
        match error {
            StorageError::Conflict(field) => Self::AlreadyExists(field),
            StorageError::NotFound(what) => Self::NotFound(format!("{what} not found")),
            StorageError::RecipientDisabled => {
                Self::FailedPrecondition(crate::domain::message::RECIPIENT_DISABLED.into())
            }
            StorageError::Unavailable(source) => Self::Unavailable(source.into()),
            StorageError::Internal(source) => Self::Internal(source.into()),
        }
    }
}

impl From<AppError> for Status {
    fn from(error: AppError) -> Self {
        let message = error.to_string();
        match error {
            AppError::InvalidArgument(violations) => {
                let mut details = ErrorDetails::new();
                for violation in &violations {
                    details.add_bad_request_violation(violation.field, &violation.description);
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            AppError::Unauthenticated(_) => Status::unauthenticated(message),
            AppError::PermissionDenied(_) => Status::permission_denied(message),
            AppError::NotFound(_) => Status::not_found(message),
            AppError::AlreadyExists(_) => Status::already_exists(message),
            AppError::FailedPrecondition(_) => Status::failed_precondition(message),
            AppError::ResourceExhausted(_) => Status::resource_exhausted(message),
            // The client gets a fixed text and an id; the log line with the
            // same id has the details.
            AppError::Unavailable(source) => {
                let request_id = current_request_id();
                tracing::warn!(%request_id, error = %error_chain(source.as_ref()), "dependency unavailable");
                Status::unavailable(format!("{message} (request id {request_id})"))
            }
            AppError::Internal(source) => {
                let request_id = current_request_id();
                tracing::error!(%request_id, error = %error_chain(source.as_ref()), "internal error");
                Status::internal(format!("{message} (request id {request_id})"))
            }
        }
    }
}

tokio::task_local! {
    /// The id of the call being served (set by the call-log layer), so that
    /// an error's answer quotes the id its log lines carry.
    pub static REQUEST_ID: String;
}

/// The current call's id, or a fresh one outside a call.
fn current_request_id() -> String {
    REQUEST_ID
        .try_with(Clone::clone)
        .unwrap_or_else(|_| new_request_id())
}

/// A short random id that ties a client's error to the server's log line.
pub fn new_request_id() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 8];
    rand::rng().fill_bytes(&mut bytes);
    let mut id = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        // Writing to a String cannot fail.
        let _ = std::fmt::Write::write_fmt(&mut id, format_args!("{byte:02x}"));
    }
    id
}

/// The whole `source()` chain on one line, for the server log only.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_one_bad_request_violation_per_field() {
        let error = AppError::InvalidArgument(vec![
            FieldViolation::new("username", "too short"),
            FieldViolation::new("email", "not an email address"),
        ]);
        let status = Status::from(error);
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad_request = status
            .get_details_bad_request()
            .expect("a BadRequest detail");
        let fields: Vec<_> = bad_request
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["username", "email"]);
        assert!(status.message().contains("username: too short"));
    }

    #[test]
    fn internal_and_unavailable_never_leak_their_source_text() {
        let secret = "relation \"users\" does not exist at 10.0.0.5";
        for (error, code) in [
            (AppError::internal(anyhow::anyhow!(secret)), Code::Internal),
            (
                AppError::Unavailable(anyhow::anyhow!(secret)),
                Code::Unavailable,
            ),
        ] {
            let status = Status::from(error);
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("relation"));
            assert!(
                status.message().contains("request id "),
                "{}",
                status.message()
            );
        }
    }

    #[test]
    fn each_variant_maps_to_its_code() {
        let cases = [
            (AppError::Unauthenticated("x"), Code::Unauthenticated),
            (AppError::PermissionDenied("x"), Code::PermissionDenied),
            (AppError::NotFound("x".into()), Code::NotFound),
            (AppError::AlreadyExists("username"), Code::AlreadyExists),
            (
                AppError::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (AppError::ResourceExhausted("x"), Code::ResourceExhausted),
        ];
        for (error, code) in cases {
            assert_eq!(Status::from(error).code(), code);
        }
    }
}
