//! Authentication rules: access and refresh tokens, password hashing, and the
//! interceptor that reads the bearer token. Storage checks (is the session
//! still live?) happen in the async path, in [`AppState::authenticate`](crate::startup::AppState).

pub mod accounts;
pub mod cache;
pub mod interceptor;
pub mod passwords;
pub mod throttle;
pub mod tokens;

pub use interceptor::{BearerInterceptor, BearerOutcome};
pub use passwords::PasswordHasher;
pub use tokens::{AccessToken, RefreshToken, TokenError, TokenService};
