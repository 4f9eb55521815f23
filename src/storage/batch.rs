//! Group commit for new messages: concurrent SendMessage calls are queued and
//! written together, up to `MAX_BATCH` per transaction. SQLite has one writer
//! anyway, so one transaction for many messages replaces many transactions
//! for one each; on PostgreSQL it saves commits in the same way.
//!
//! If a batch fails as a whole, each of its messages is retried alone, so one
//! bad message (say, a recipient deleted a moment ago) fails only its own call.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{Database, MessageRecord, NewMessage, Result, StorageError};

const MAX_BATCH: usize = 256;
const QUEUE: usize = 4096;

struct Pending {
    message: NewMessage,
    reply: oneshot::Sender<Result<MessageRecord>>,
}

pub struct MessageWriter {
    queue: mpsc::Sender<Pending>,
}

impl MessageWriter {
    /// Starts the writer task; it ends when the last `MessageWriter` is dropped.
    pub fn start(db: Arc<dyn Database>) -> Self {
        let (queue, pending) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(db, pending));
        Self { queue }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(sender_id = message.sender_id, recipient_id = message.recipient_id))]
    pub async fn insert(&self, message: NewMessage) -> Result<MessageRecord> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { message, reply })
            .await
            .map_err(|_| StorageError::Unavailable(sqlx::Error::PoolClosed))?;
        answer
            .await
            .map_err(|_| StorageError::Unavailable(sqlx::Error::PoolClosed))?
    }
}

async fn write_batches(db: Arc<dyn Database>, mut pending: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while pending.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (messages, replies): (Vec<NewMessage>, Vec<_>) =
            batch.drain(..).map(|p| (p.message, p.reply)).unzip();
        let alone = messages.clone();
        match db.insert_messages(messages).await {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(answer);
                }
            }
            Err(error) if replies.len() == 1 => {
                if let Some(reply) = replies.into_iter().next() {
                    let _ = reply.send(Err(error));
                }
            }
            Err(_) => {
                for (reply, message) in replies.into_iter().zip(alone) {
                    let _ = reply.send(db.insert_message(message).await);
                }
            }
        }
    }
}
