//! The embedded SQLite backend (the default).
//!
//! One writer connection and a few readers over a WAL database: writes never
//! contend for the lock inside this process, readers never block the writer,
//! and write transactions start with `BEGIN IMMEDIATE` so that another process
//! (the CLI beside a running server) waits on `busy_timeout` instead of failing.
//! The WAL is copied back into the database file by a background task, not
//! by whichever commit crosses SQLite's threshold: that commit would wait for
//! the copy and its two fsyncs (p99 of a commit 11 ms at 2k messages/s).

use std::{path::Path, str::FromStr as _, time::Duration};

use async_trait::async_trait;
use sqlx::{
    Sqlite, SqlitePool, Transaction,
    migrate::Migrator,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use super::{Database, MigrationState, Result, migrations, page_cache::PageCache};

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// A write behind a lock held by another process answers UNAVAILABLE within
/// the contract's 5 s: waiting for our writer connection, then for the file's
/// lock, each stop short of it.
const BUSY_TIMEOUT: Duration = Duration::from_millis(4500);
const ACQUIRE_TIMEOUT: Duration = Duration::from_millis(4500);
const READERS: u32 = 8;
/// How often the WAL is checkpointed (the background copy described above).
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);
/// Messages added to the text index in one transaction at most.
const TEXT_INDEX_BATCH: i64 = 10_000;

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// Sound because this process is the file's only writer (see `page_cache`).
    pages: PageCache,
}

impl SqliteStore {
    /// Opens (creating if missing) the file, or a private in-memory database for `None`.
    pub async fn open(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            // One connection: every connection to `:memory:` is its own database.
            let options = SqliteConnectOptions::from_str("sqlite::memory:")?.foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await?;
            return Ok(Self {
                writer: pool.clone(),
                reader: pool,
                pages: PageCache::default(),
            });
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            // No commit checkpoints: `checkpoint_regularly` does.
            .pragma("wal_autocheckpoint", "0")
            // Statement journals (multi-row INSERTs inside a transaction) in
            // memory, not temporary files: a profile showed 14% of SendMessage there.
            .pragma("temp_store", "memory");
        // Every connection is opened here and kept for good (no idle timeout,
        // no maximum lifetime): a server out of file descriptors can still
        // serve the clients it has, since it needs no new one for the database.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // A ping tests only the connection's own thread, and costs a hop
            // to it before every write transaction.
            .test_before_acquire(false)
            .after_release(|conn, _| Box::pin(leaves_no_transaction_open(conn)))
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .min_connections(READERS)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        tokio::spawn(checkpoint_regularly(reader.clone()));
        Ok(Self {
            writer,
            reader,
            pages: PageCache::default(),
        })
    }

    /// Every SQLite write is in-process: the general path's statements
    /// cost no round trips to save.
    #[allow(clippy::unused_async)]
    async fn send_in_one_statement(
        &self,
        _messages: &[super::NewMessage],
    ) -> Option<Result<Vec<Result<super::LoggedChange>>>> {
        None
    }

    fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    /// Each user's id, whether they are active, and their newest event id
    /// (0 before their first), for the users among `ids` who exist.
    async fn read_participants(
        conn: &mut sqlx::SqliteConnection,
        ids: &[i64],
    ) -> Result<Vec<(i64, bool, i64)>> {
        let mut select = sqlx::QueryBuilder::<Sqlite>::new(
            "SELECT u.id, u.is_active, COALESCE(h.last_event_id, 0) FROM users u \
             LEFT JOIN message_event_heads h ON h.user_id = u.id WHERE u.id IN (",
        );
        let mut each = select.separated(", ");
        for user_id in ids {
            each.push_bind(*user_id);
        }
        select.push(")");
        Ok(select.build_query_as().fetch_all(conn).await?)
    }

    /// The insert trigger `messages_merge_conversation` has merged them.
    #[allow(clippy::unused_async)]
    async fn merge_conversation_rows(
        _conn: &mut sqlx::SqliteConnection,
        _stored: &[super::MessageRecord],
    ) -> Result<()> {
        Ok(())
    }

    /// Adds `counts` (user id to new events) to the users' heads; answers
    /// each user's new head.
    async fn bump_heads(
        conn: &mut sqlx::SqliteConnection,
        counts: &std::collections::BTreeMap<i64, i64>,
    ) -> Result<Vec<(i64, i64)>> {
        let mut heads = sqlx::QueryBuilder::<Sqlite>::new(
            "INSERT INTO message_event_heads (user_id, last_event_id) ",
        );
        heads.push_values(counts, |mut row, (user_id, count)| {
            row.push_bind(*user_id).push_bind(*count);
        });
        heads.push(super::sql::HEAD_BUMP_CONFLICT);
        Ok(heads.build_query_as().fetch_all(conn).await?)
    }

    /// Inserts event rows, `(user_id, event_id, message)` each, as multi-row
    /// INSERTs (a statement more costs more than its rows here).
    async fn insert_event_rows(
        conn: &mut sqlx::SqliteConnection,
        change: super::MessageChange,
        now: i64,
        rows: &[(i64, i64, &super::MessageRecord)],
    ) -> Result<()> {
        /// 15 binds per row stays under SQLite's limit of 32,766 per statement.
        const ROWS_PER_INSERT: usize = 1000;
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let mut insert = sqlx::QueryBuilder::<Sqlite>::new(
                "INSERT INTO message_events (user_id, event_id, kind, occurred_at, message_id, \
                 sender_id, recipient_id, content, is_read, parent_id, conversation_id, created_at, \
                 read_at, edited_at, reply_count) ",
            );
            insert.push_values(chunk, |mut row, (user_id, event_id, m)| {
                row.push_bind(*user_id)
                    .push_bind(*event_id)
                    .push_bind(change as i32)
                    .push_bind(now)
                    .push_bind(m.id)
                    .push_bind(m.sender_id)
                    .push_bind(m.recipient_id)
                    .push_bind(m.content.clone())
                    .push_bind(m.is_read)
                    .push_bind(m.parent_id)
                    .push_bind(m.conversation_id.clone())
                    .push_bind(m.created_at)
                    .push_bind(m.read_at)
                    .push_bind(m.edited_at)
                    .push_bind(m.reply_count);
            });
            insert.build().execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// The user's newest event id and the database's erasure count, read
    /// before a first page (see `list_messages`).
    async fn read_position(&self, user_id: i64) -> Result<(i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT COALESCE((SELECT last_event_id FROM message_event_heads WHERE user_id = $1), 0), \
             (SELECT erasures FROM deployment)",
        )
        .bind(user_id) // $1
        .fetch_one(&self.reader)
        .await?)
    }

    fn page_cache(&self) -> Option<&PageCache> {
        Some(&self.pages)
    }

    /// Every write passes through this store, which forgets the pages it
    /// changes: a cached page is current without a look at the database.
    const PAGES_CHECKED_AGAINST_LOG: bool = false;

    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.writer.begin_with("BEGIN IMMEDIATE").await
    }

    /// New messages are logged by a trigger inside their INSERT: every
    /// statement costs a hop to SQLite's worker thread, more than the work.
    const LOGS_SENDS_BY_TRIGGER: bool = true;

    /// What turns a query into its plan.
    const EXPLAIN: &'static str = "EXPLAIN QUERY PLAN ";

    /// No row locks to take: SQLite has one writer at a time.
    const ROW_LOCK: &'static str = "";

    /// SearchMessages' condition: FTS5 trigrams find the candidates among
    /// the indexed rows, a range of the primary key the few newer ones (see
    /// `index_text`); trigrams fold case beyond ASCII, so they find a
    /// superset, and `lower()`, which folds ASCII letters only in SQLite,
    /// decides.
    fn push_text_match(query: &mut sqlx::QueryBuilder<Sqlite>, text: &str) {
        query
            .push("id IN (SELECT rowid FROM messages_fts WHERE messages_fts MATCH ")
            .push_bind(super::sql::fts_phrase(text))
            .push(
                " UNION ALL SELECT id FROM messages \
                 WHERE id > (SELECT indexed_up_to FROM messages_fts_state)) \
                 AND instr(lower(content), ",
            )
            .push_bind(text.to_ascii_lowercase())
            .push(") > 0");
    }

    /// Nothing to do: with one writer, revocation ids grow in commit order.
    async fn lock_revocation_log(
        &self,
        _tx: &mut sqlx::SqliteConnection,
    ) -> Result<(), sqlx::Error> {
        Ok(())
    }
}

/// Copies the WAL back into the database file every `CHECKPOINT_INTERVAL`
/// until the pool closes. PASSIVE: it never waits for, nor blocks, the
/// writer or a reader; frames it cannot copy yet are copied by a later run.
async fn checkpoint_regularly(pool: SqlitePool) {
    let mut every = tokio::time::interval(CHECKPOINT_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let closed = pool.close_event();
    tokio::pin!(closed);
    // Warned once per spell of failures (a full disk fails every run).
    let mut failing = false;
    loop {
        tokio::select! {
            () = &mut closed => return,
            _ = every.tick() => {}
        }
        match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("WAL checkpoints work again");
            }
            Ok(_) => {}
            Err(error) if failing => {
                tracing::debug!(error = %error, "WAL checkpoint failed again");
            }
            Err(error) => {
                failing = true;
                tracing::warn!(error = %error, "WAL checkpoint failed; retrying every 200 ms");
            }
        }
    }
}

/// Whether a writer connection coming back to its pool may be used again.
///
/// After a failed COMMIT (SQLITE_FULL, SQLITE_IOERR) SQLite may already have
/// rolled the transaction back itself; the ROLLBACK that sqlx then sends fails,
/// and sqlx goes on counting the connection as inside a transaction, so every
/// later `BEGIN` on it would fail until a restart. Such a connection is closed
/// and the pool opens a fresh one on the next write.
async fn leaves_no_transaction_open(
    conn: &mut sqlx::SqliteConnection,
) -> Result<bool, sqlx::Error> {
    use sqlx::Connection as _;
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    // A dropped transaction's ROLLBACK may still be queued on the connection's
    // worker: a ping behind it tells whether it worked.
    conn.ping().await?;
    if conn.is_in_transaction() {
        tracing::warn!(
            "the SQLite writer connection is stuck in a failed transaction; replacing it"
        );
        return Ok(false);
    }
    Ok(true)
}

impl_repositories!(SqliteStore, Sqlite);

#[async_trait]
impl Database for SqliteStore {
    /// One process owns an SQLite file: in-process delivery is enough.
    fn pool_state(&self) -> super::PoolState {
        let (writer, reader) = (&self.writer, &self.reader);
        let idle = writer.num_idle() + reader.num_idle();
        let size = writer.size() as usize + reader.size() as usize;
        super::PoolState {
            idle,
            in_use: size.saturating_sub(idle),
        }
    }

    fn event_channel(&self) -> Option<std::sync::Arc<dyn super::EventChannel>> {
        None
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn deployment_id(&self) -> Result<String> {
        Ok(sqlx::query_scalar("SELECT id FROM deployment")
            .fetch_one(&self.reader)
            .await?)
    }

    /// Adds the messages stored since the last run to the text index, at
    /// most `TEXT_INDEX_BATCH` in one transaction.
    async fn index_text(&self) -> Result<u64> {
        let (indexed, newest): (i64, i64) = sqlx::query_as(
            "SELECT indexed_up_to, (SELECT COALESCE(MAX(id), 0) FROM messages) FROM messages_fts_state",
        )
        .fetch_one(&self.reader)
        .await?;
        if newest <= indexed {
            return Ok(0);
        }
        let until = newest.min(indexed.saturating_add(TEXT_INDEX_BATCH));
        let mut tx = self.begin_write().await?;
        // Read again under the write lock: another run may have gone first.
        let indexed: i64 = sqlx::query_scalar("SELECT indexed_up_to FROM messages_fts_state")
            .fetch_one(&mut *tx)
            .await?;
        if until <= indexed {
            return Ok(0);
        }
        let added = sqlx::query(
            "INSERT INTO messages_fts (rowid, content) \
             SELECT id, content FROM messages WHERE id > $1 AND id <= $2",
        )
        .bind(indexed) // $1
        .bind(until) // $2
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("UPDATE messages_fts_state SET indexed_up_to = $1")
            .bind(until) // $1
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(added)
    }

    fn writer_wants_own_thread(&self) -> bool {
        true
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        Ok(MIGRATOR.run(&self.writer).await?)
    }

    async fn migration_status(&self) -> anyhow::Result<Vec<MigrationState>> {
        migrations::status(&self.writer, &MIGRATOR).await
    }

    async fn revert_latest(&self) -> anyhow::Result<Option<i64>> {
        migrations::revert_latest(&self.writer, &MIGRATOR).await
    }

    async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}
