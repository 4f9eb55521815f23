//! `AppError`, the one error type of the rules layer, and its one mapping to
//! `tonic::Status`. Handlers return `AppError` with `?`; storage errors arrive
//! through `From<StorageError>`.

use std::{borrow::Cow, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub use crate::domain::FieldViolation;
use crate::{domain::Violations, storage::StorageError};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Request fields that break the contract's rules; never empty.
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED or
    /// FAILED_PRECONDITION: the code and the ErrorInfo reason come from
    /// `reason`; throttling and overload say when to retry.
    #[error("{message}")]
    Refused {
        reason: Reason,
        message: Cow<'static, str>,
        retry_after: Option<Duration>,
    },
    #[error("{0}")]
    NotFound(String),
    /// A unique field already taken by another record.
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
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

/// Why a call was refused: the `reason` of its `google.rpc.ErrorInfo`, so
/// that clients act without parsing messages. Each belongs to one code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    TokenMissing,
    TokenInvalid,
    TokenExpired,
    SessionRevoked,
    LoginFailed,
    RefreshTokenInvalid,
    RefreshTokenReused,
    AccountDisabled,
    SuperuserRequired,
    RoleRequired,
    NotMessageSender,
    AccountThrottled,
    AddressThrottled,
    ServerOverloaded,
    RequestTooLarge,
    StreamLagged,
    CannotModifySelf,
    RecipientDisabled,
    CursorExpired,
}

/// The ErrorInfo `domain` of every reason.
pub const ERROR_DOMAIN: &str = "ai-message";

impl Reason {
    pub const fn code(self) -> Code {
        use Reason::*;
        match self {
            TokenMissing | TokenInvalid | TokenExpired | SessionRevoked | LoginFailed
            | RefreshTokenInvalid | RefreshTokenReused => Code::Unauthenticated,
            AccountDisabled | SuperuserRequired | RoleRequired | NotMessageSender => {
                Code::PermissionDenied
            }
            AccountThrottled | AddressThrottled | ServerOverloaded | RequestTooLarge
            | StreamLagged => Code::ResourceExhausted,
            CannotModifySelf | RecipientDisabled | CursorExpired => Code::FailedPrecondition,
        }
    }

    pub const fn as_str(self) -> &'static str {
        use Reason::*;
        match self {
            TokenMissing => "TOKEN_MISSING",
            TokenInvalid => "TOKEN_INVALID",
            TokenExpired => "TOKEN_EXPIRED",
            SessionRevoked => "SESSION_REVOKED",
            LoginFailed => "LOGIN_FAILED",
            RefreshTokenInvalid => "REFRESH_TOKEN_INVALID",
            RefreshTokenReused => "REFRESH_TOKEN_REUSED",
            AccountDisabled => "ACCOUNT_DISABLED",
            SuperuserRequired => "SUPERUSER_REQUIRED",
            RoleRequired => "ROLE_REQUIRED",
            NotMessageSender => "NOT_MESSAGE_SENDER",
            AccountThrottled => "ACCOUNT_THROTTLED",
            AddressThrottled => "ADDRESS_THROTTLED",
            ServerOverloaded => "SERVER_OVERLOADED",
            RequestTooLarge => "REQUEST_TOO_LARGE",
            StreamLagged => "STREAM_LAGGED",
            CannotModifySelf => "CANNOT_MODIFY_SELF",
            RecipientDisabled => "RECIPIENT_DISABLED",
            CursorExpired => "CURSOR_EXPIRED",
        }
    }
}

/// The status refusing a call for `reason`: its code, `message`, an
/// ErrorInfo (domain `ai-message`, no metadata: nothing the caller could not
/// already know) and, with `retry_after`, a RetryInfo.
pub fn refusal(
    reason: Reason,
    message: impl Into<String>,
    retry_after: Option<Duration>,
) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        reason.as_str(),
        ERROR_DOMAIN,
        std::collections::HashMap::new(),
    );
    if let Some(delay) = retry_after {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(reason.code(), message, details)
}

/// What load shedding tells a client to wait before retrying.
pub const OVERLOAD_RETRY: Duration = Duration::from_secs(1);

impl AppError {
    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// A refusal for `reason` with a fixed text.
    pub fn refused(reason: Reason, message: impl Into<Cow<'static, str>>) -> Self {
        Self::Refused {
            reason,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A throttling or overload refusal that says when to retry.
    pub fn throttled(reason: Reason, message: &'static str, retry_after: Duration) -> Self {
        Self::Refused {
            reason,
            message: Cow::Borrowed(message),
            retry_after: Some(retry_after),
        }
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
            StorageError::RecipientDisabled => Self::refused(
                Reason::RecipientDisabled,
                crate::domain::message::RECIPIENT_DISABLED,
            ),
            StorageError::RequestMismatch(field) => Self::invalid(
                field,
                "was used for a different message in the last 24 hours; use a new one",
            ),
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
            AppError::Refused {
                reason,
                retry_after,
                ..
            } => refusal(reason, message, retry_after),
            AppError::NotFound(_) => Status::not_found(message),
            AppError::AlreadyExists(_) => Status::already_exists(message),
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
            (
                AppError::refused(Reason::LoginFailed, "x"),
                Code::Unauthenticated,
            ),
            (
                AppError::refused(Reason::SuperuserRequired, "x"),
                Code::PermissionDenied,
            ),
            (AppError::NotFound("x".into()), Code::NotFound),
            (AppError::AlreadyExists("username"), Code::AlreadyExists),
            (
                AppError::refused(Reason::CannotModifySelf, "x"),
                Code::FailedPrecondition,
            ),
            (
                AppError::refused(Reason::StreamLagged, "x"),
                Code::ResourceExhausted,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(Status::from(error).code(), code);
        }
    }

    #[test]
    fn refusals_carry_error_info_and_throttling_retry_info() {
        let status = Status::from(AppError::throttled(
            Reason::AccountThrottled,
            "slow down",
            Duration::from_secs(15),
        ));
        assert_eq!(status.code(), Code::ResourceExhausted);
        let info = status.get_details_error_info().expect("an ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("ACCOUNT_THROTTLED", ERROR_DOMAIN)
        );
        assert!(info.metadata.is_empty(), "nothing beyond the reason");
        let retry = status.get_details_retry_info().expect("a RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(15)));
        let plain = Status::from(AppError::refused(Reason::TokenMissing, "no token"));
        assert_eq!(
            plain.get_details_error_info().unwrap().reason,
            "TOKEN_MISSING"
        );
        assert!(plain.get_details_retry_info().is_none());
    }
}
