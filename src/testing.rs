//! Seeding for the load generator and tools (cargo feature `test-support`):
//! users with a session and a token, and messages, written straight to
//! storage so that a benchmark does not mostly time bcrypt. Not part of the
//! service's API.

use std::sync::Arc;

use crate::{
    domain::{Timestamp, message::default_conversation_id},
    services::AppState,
    startup::Application,
    storage::{NewMessage, NewSession, NewUser},
};

/// Writes directly to a built server's storage.
pub struct Seeder {
    state: Arc<AppState>,
    /// One bcrypt hash (cost 4) shared by every seeded user.
    password_hash: String,
}

impl Seeder {
    pub fn new(app: &Application) -> anyhow::Result<Self> {
        Ok(Self {
            state: app.state(),
            password_hash: bcrypt::hash("not used for logging in", 4)?,
        })
    }

    /// A user named `username` with a one-day session; its id and an access token.
    pub async fn user_with_session(&self, username: &str) -> anyhow::Result<(i64, String)> {
        let now = self.state.clock.now();
        let user = self
            .state
            .db
            .create_user(NewUser {
                email: format!("{username}@example.com"),
                username: username.to_owned(),
                password_hash: self.password_hash.clone(),
                full_name: None,
                is_superuser: false,
                now: now.micros(),
            })
            .await?;
        let expires_at = now.micros() + 86_400_000_000;
        let session = self
            .state
            .db
            .create_session(NewSession {
                user_id: user.id,
                device_info: None,
                ip_address: None,
                now: now.micros(),
                expires_at,
                refresh_token_hash: username.as_bytes().to_vec(),
            })
            .await?;
        let (token, _) = self.state.tokens.issue_access(
            user.id,
            session.id,
            now,
            Timestamp::from_micros(expires_at),
        )?;
        Ok((user.id, token))
    }

    /// A message from `sender` to `recipient` in their default conversation.
    pub async fn message(
        &self,
        sender: i64,
        recipient: i64,
        content: String,
    ) -> anyhow::Result<()> {
        self.state
            .db
            .insert_message(NewMessage {
                sender_id: sender,
                recipient_id: recipient,
                content,
                parent_id: None,
                conversation_id: default_conversation_id(recipient, sender),
                now: self.state.clock.now().micros(),
                request: None,
            })
            .await?;
        Ok(())
    }

    /// Messages from `sender` to `recipient`, stored 256 to a transaction
    /// as the group commit would (each with its events).
    pub async fn messages(
        &self,
        sender: i64,
        recipient: i64,
        contents: impl IntoIterator<Item = String>,
    ) -> anyhow::Result<()> {
        let conversation_id = default_conversation_id(recipient, sender);
        let mut batch = Vec::with_capacity(256);
        let mut contents = contents.into_iter().peekable();
        while contents.peek().is_some() {
            batch.clear();
            batch.extend(contents.by_ref().take(256).map(|content| NewMessage {
                sender_id: sender,
                recipient_id: recipient,
                content,
                parent_id: None,
                conversation_id: conversation_id.clone(),
                now: self.state.clock.now().micros(),
                request: None,
            }));
            for answer in self.state.db.insert_messages(batch.clone()).await? {
                answer?;
            }
        }
        Ok(())
    }

    /// Brings the text index up to date (the server's indexer would, within
    /// a few ticks), so that a search benchmark measures the index.
    pub async fn catch_up_text_index(&self) -> anyhow::Result<()> {
        while self.state.db.index_text().await? > 0 {}
        Ok(())
    }
}
