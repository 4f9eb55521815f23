//! Group commit for new messages: concurrent SendMessage calls are queued and
//! written together, up to `MAX_BATCH` per transaction. SQLite has one writer
//! anyway, so one transaction for many messages replaces many transactions
//! for one each; on PostgreSQL it saves commits in the same way.
//!
//! If a batch fails as a whole, each of its messages is retried alone, so one
//! bad message (say, a recipient deleted a moment ago) fails only its own call.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use super::{Database, LoggedChange, NewMessage, Result, StorageError};

const MAX_BATCH: usize = 256;
const QUEUE: usize = 4096;

struct Pending {
    message: NewMessage,
    reply: oneshot::Sender<Result<LoggedChange>>,
}

pub struct MessageWriter {
    queue: mpsc::Sender<Pending>,
}

/// Resolves once `closing` turns true; never if its sender is gone.
pub async fn closing(mut closing: watch::Receiver<bool>) {
    if closing.wait_for(|closing| *closing).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl MessageWriter {
    /// Starts the writer task. When `closing` turns true (the server has no
    /// call left), it writes what is queued, refuses the rest and ends; the
    /// handle is awaited by the shutdown.
    pub fn start(
        db: Arc<dyn Database>,
        closing: watch::Receiver<bool>,
    ) -> std::io::Result<(Self, tokio::task::JoinHandle<()>)> {
        let (queue, pending) = mpsc::channel(QUEUE);
        let own_thread = db.writer_wants_own_thread();
        let writing = write_batches(db, pending, closing);
        let task = if own_thread {
            on_own_thread(writing)?
        } else {
            tokio::spawn(writing)
        };
        Ok((Self { queue }, task))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(sender_id = message.sender_id, recipient_id = message.recipient_id))]
    pub async fn insert(&self, message: NewMessage) -> Result<LoggedChange> {
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

/// Runs `writing` on a new thread with a runtime of its own; the handle
/// resolves when it has ended. Every statement of a SQLite write is a hop to
/// SQLite's worker thread and back, and on the shared runtime each answer
/// waited in the queue behind the streams' and callers' tasks: with 1,000
/// streams at 2k messages/s, a write transaction took 1.7 ms there and
/// 1.2 ms here. (PostgreSQL does not use this: a connection's socket belongs
/// to the runtime that opened it, and this one ends before the pool closes.)
fn on_own_thread(
    writing: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (ended, end) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("message-writer".into())
        .spawn(move || {
            runtime.block_on(writing);
            let _ = ended.send(());
        })?;
    Ok(tokio::spawn(async move {
        // An error means the thread ended without a word: ended all the same.
        let _ = end.await;
    }))
}

async fn write_batches(
    db: Arc<dyn Database>,
    mut pending: mpsc::Receiver<Pending>,
    closing_signal: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let closing = closing(closing_signal);
    tokio::pin!(closing);
    loop {
        tokio::select! {
            received = pending.recv_many(&mut batch, MAX_BATCH) => {
                if received == 0 {
                    return;
                }
                write_batch(db.as_ref(), &mut batch).await;
            }
            () = &mut closing => {
                // Nothing new gets in; what is queued is still written.
                pending.close();
                while pending.recv_many(&mut batch, MAX_BATCH).await > 0 {
                    write_batch(db.as_ref(), &mut batch).await;
                }
                return;
            }
        }
    }
}

/// Writes one batch and answers each of its callers.
async fn write_batch(db: &dyn Database, batch: &mut Vec<Pending>) {
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
