//! Authentication rules: access and refresh tokens, password hashing, the
//! interceptor that reads the bearer token (no I/O), and the `Authenticator`
//! that checks the session behind it on every call.

pub mod accounts;
pub mod authenticator;
pub mod cache;
pub mod interceptor;
pub mod passwords;
pub mod throttle;
pub mod tokens;

pub use authenticator::{Authenticator, Caller};
pub use interceptor::{BearerInterceptor, BearerOutcome};
pub use passwords::PasswordHasher;
pub use tokens::{AccessToken, RefreshToken, TokenError, TokenService};
