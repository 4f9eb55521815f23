//! Creating an account: the one path Register, CreateUser and the
//! `create-superuser` command share.

use crate::{
    domain::{FullName, NewAccount, Timestamp},
    error::AppError,
    storage::{Database, NewUser, UserRecord},
};

use super::PasswordHasher;

/// Hashes the password (off the async threads) and stores the user, with no
/// roles. A taken username or email is `AlreadyExists` naming the field.
#[tracing::instrument(level = "debug", skip_all, fields(is_superuser))]
pub async fn create_account(
    db: &dyn Database,
    hasher: &PasswordHasher,
    account: NewAccount,
    is_superuser: bool,
    now: Timestamp,
) -> Result<UserRecord, AppError> {
    let password_hash = hasher.hash(account.password.as_str()).await?;
    Ok(db
        .create_user(NewUser {
            username: account.username.as_str().to_owned(),
            email: account.email.as_str().to_owned(),
            password_hash,
            full_name: account.full_name.map(FullName::into_inner),
            is_superuser,
            now: now.micros(),
        })
        .await?)
}
