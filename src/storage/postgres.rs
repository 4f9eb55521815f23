//! The PostgreSQL backend, for production and for several instances sharing
//! one database.

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use async_trait::async_trait;
use sqlx::{
    PgPool, Postgres, Transaction,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{Database, EventChannel, MigrationState, Result, migrations};

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(4);
const MAX_CONNECTIONS: u32 = 16;
/// A pooled connection idle this long is pinged before it is handed out.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

pub struct PostgresStore {
    pool: PgPool,
    pages: super::page_cache::PageCache,
    positions: PositionReader,
}

impl PostgresStore {
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // sqlx would ping every connection it hands out: a round trip
            // before every query. Only a connection idle for a while may have
            // been cut without anyone noticing; one in steady use answers for
            // itself (a failed query's connection is discarded on release).
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_WHEN_IDLE_FOR {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await?;
        Ok(Self {
            positions: PositionReader::start(pool.clone()),
            pool,
            pages: super::page_cache::PageCache::default(),
        })
    }

    /// The user's newest event id and the database's erasure count, read
    /// before a first page (see `list_messages`), many callers per query.
    async fn read_position(&self, user_id: i64) -> Result<(i64, i64)> {
        self.positions.read(user_id).await
    }

    fn reader(&self) -> &PgPool {
        &self.pool
    }

    fn writer(&self) -> &PgPool {
        &self.pool
    }

    /// Each user's id, whether they are active, and their newest event id
    /// (0 before their first), for the users among `ids` who exist. Over an
    /// array, so that one prepared statement serves every batch size.
    async fn read_participants(
        conn: &mut sqlx::PgConnection,
        ids: &[i64],
    ) -> Result<Vec<(i64, bool, i64)>> {
        Ok(sqlx::query_as(
            "SELECT u.id, u.is_active, COALESCE(h.last_event_id, 0) FROM users u \
             LEFT JOIN message_event_heads h ON h.user_id = u.id WHERE u.id = ANY($1::bigint[])",
        )
        .bind(ids) // $1
        .fetch_all(conn)
        .await?)
    }

    /// Merges the participants' conversation rows of the `stored` messages
    /// (one per key, in key order) with one upsert over arrays.
    async fn merge_conversation_rows(
        conn: &mut sqlx::PgConnection,
        stored: &[super::MessageRecord],
    ) -> Result<()> {
        let rows = member_rows(stored);
        if rows.is_empty() {
            return Ok(());
        }
        static UPSERT: LazyLock<String> = LazyLock::new(|| {
            format!(
                "INSERT INTO conversation_members (user_id, other_user_id, conversation_id, \
                 last_message_id, last_created_at, unread_count) \
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], \
                 $5::bigint[], $6::bigint[]){}",
                MEMBER_UPSERT_CONFLICT
            )
        });
        sqlx::query(sqlx::AssertSqlSafe(UPSERT.as_str()))
            .bind(column(&rows, |r| r.user_id)) // $1
            .bind(column(&rows, |r| r.other_user_id)) // $2
            .bind(column(&rows, |r| r.conversation_id)) // $3
            .bind(column(&rows, |r| r.last_message_id)) // $4
            .bind(column(&rows, |r| r.last_created_at)) // $5
            .bind(column(&rows, |r| r.unread)) // $6
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Adds `counts` (user id to new events) to the users' heads, locking
    /// them in user order; answers each user's new head.
    async fn bump_heads(
        conn: &mut sqlx::PgConnection,
        counts: &std::collections::BTreeMap<i64, i64>,
    ) -> Result<Vec<(i64, i64)>> {
        static BUMP: LazyLock<String> = LazyLock::new(|| {
            format!(
                "INSERT INTO message_event_heads (user_id, last_event_id) \
                 SELECT u, c FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS t(u, c, n) \
                 ORDER BY n{}",
                super::sql::HEAD_BUMP_CONFLICT
            )
        });
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(BUMP.as_str()))
            .bind(counts.keys().copied().collect::<Vec<_>>()) // $1
            .bind(counts.values().copied().collect::<Vec<_>>()) // $2
            .fetch_all(conn)
            .await?)
    }

    /// Inserts event rows, `(user_id, event_id, message)` each, as one
    /// statement over arrays: the same text for every batch size, so it is
    /// parsed and planned once per connection, not once per batch.
    async fn insert_event_rows(
        conn: &mut sqlx::PgConnection,
        change: super::MessageChange,
        now: i64,
        rows: &[(i64, i64, &super::MessageRecord)],
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO message_events (user_id, event_id, kind, occurred_at, message_id, \
             sender_id, recipient_id, content, is_read, parent_id, conversation_id, created_at, \
             read_at, edited_at, reply_count) \
             SELECT user_id, event_id, $1, $2, message_id, sender_id, recipient_id, content, \
             is_read, parent_id, conversation_id, created_at, read_at, edited_at, reply_count \
             FROM unnest($3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], \
             $8::text[], $9::boolean[], $10::bigint[], $11::text[], $12::bigint[], $13::bigint[], \
             $14::bigint[], $15::bigint[]) AS t(user_id, event_id, message_id, sender_id, \
             recipient_id, content, is_read, parent_id, conversation_id, created_at, read_at, \
             edited_at, reply_count)",
        )
        .bind(change as i32) // $1
        .bind(now) // $2
        .bind(column(rows, |(user_id, _, _)| *user_id)) // $3
        .bind(column(rows, |(_, event_id, _)| *event_id)) // $4
        .bind(column(rows, |(_, _, m)| m.id)) // $5
        .bind(column(rows, |(_, _, m)| m.sender_id)) // $6
        .bind(column(rows, |(_, _, m)| m.recipient_id)) // $7
        .bind(column(rows, |(_, _, m)| m.content.as_str())) // $8
        .bind(column(rows, |(_, _, m)| m.is_read)) // $9
        .bind(column(rows, |(_, _, m)| m.parent_id)) // $10
        .bind(column(rows, |(_, _, m)| m.conversation_id.as_str())) // $11
        .bind(column(rows, |(_, _, m)| m.created_at)) // $12
        .bind(column(rows, |(_, _, m)| m.read_at)) // $13
        .bind(column(rows, |(_, _, m)| m.edited_at)) // $14
        .bind(column(rows, |(_, _, m)| m.reply_count)) // $15
        .execute(conn)
        .await?;
        Ok(())
    }

    /// A batch of plain sends (no reply, no request id) as one statement,
    /// its own transaction: one round trip instead of seven (begin, read the
    /// participants, insert, conversation rows, heads, events, commit). A
    /// round trip costs 0.5-0.8 ms while the server and PostgreSQL share
    /// the cores, and a batch waited for seven of them. `None` for a batch
    /// the general path must write.
    async fn send_in_one_statement(
        &self,
        messages: &[super::NewMessage],
    ) -> Option<Result<Vec<Result<super::LoggedChange>>>> {
        if messages
            .iter()
            .any(|m| m.parent_id.is_some() || m.request.is_some())
        {
            return None;
        }
        Some(self.send_plain(messages).await)
    }

    async fn send_plain(
        &self,
        messages: &[super::NewMessage],
    ) -> Result<Vec<Result<super::LoggedChange>>> {
        use super::{LoggedChange, MessageChange, MessageRecord, StorageError};
        // Conversation rows are merged before the heads are bumped (the
        // scalar subquery on `members` runs first), the order every other
        // write takes them in, and each in key order, bytewise as Rust sorts
        // the general path's (COLLATE "C"): no deadlock with a concurrent
        // writer. Only active recipients' messages are stored. (PostgreSQL
        // plans the join on `users` by its size: a scan of a few thousand
        // rows, a `users_pkey` probe per recipient at 300,000; a forced
        // probe measured 10% slower on the benchmark's small table.)
        static SEND: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH input AS (\
                   SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::bigint[]) \
                   WITH ORDINALITY AS t(sender_id, recipient_id, content, conversation_id, created_at, n)), \
                 stored AS (\
                   INSERT INTO messages (sender_id, recipient_id, content, is_read, parent_id, \
                   conversation_id, created_at, user_low, user_high) \
                   SELECT i.sender_id, i.recipient_id, i.content, FALSE, NULL, i.conversation_id, \
                   i.created_at, LEAST(i.sender_id, i.recipient_id), GREATEST(i.sender_id, i.recipient_id) \
                   FROM input i JOIN users u ON u.id = i.recipient_id AND u.is_active ORDER BY i.n \
                   RETURNING *), \
                 views AS (\
                   SELECT recipient_id AS user_id, sender_id AS other_user_id, conversation_id, id, \
                   created_at, 1 AS unread FROM stored \
                   UNION ALL SELECT sender_id, recipient_id, conversation_id, id, created_at, 0 \
                   FROM stored WHERE sender_id <> recipient_id), \
                 members AS (\
                   INSERT INTO conversation_members (user_id, other_user_id, conversation_id, \
                   last_message_id, last_created_at, unread_count) \
                   SELECT DISTINCT ON (user_id, other_user_id, conversation_id COLLATE \"C\") user_id, \
                   other_user_id, conversation_id, id, created_at, \
                   sum(unread) OVER (PARTITION BY user_id, other_user_id, conversation_id) FROM views \
                   ORDER BY user_id, other_user_id, conversation_id COLLATE \"C\", created_at DESC, id DESC{} \
                   RETURNING 1), \
                 audience AS (\
                   SELECT sender_id AS user_id, id FROM stored \
                   UNION ALL SELECT recipient_id, id FROM stored WHERE recipient_id <> sender_id), \
                 counts AS (SELECT user_id, count(*) AS new_events FROM audience GROUP BY user_id), \
                 heads AS (\
                   INSERT INTO message_event_heads (user_id, last_event_id) \
                   SELECT user_id, new_events FROM counts WHERE (SELECT count(*) FROM members) >= 0 \
                   ORDER BY user_id{}), \
                 numbered AS (\
                   SELECT a.user_id, a.id, h.last_event_id - c.new_events \
                   + row_number() OVER (PARTITION BY a.user_id ORDER BY a.id) AS event_id \
                   FROM audience a JOIN counts c USING (user_id) JOIN heads h USING (user_id)), \
                 logged AS (\
                   INSERT INTO message_events (user_id, event_id, kind, occurred_at, message_id, \
                   sender_id, recipient_id, content, is_read, parent_id, conversation_id, created_at, \
                   read_at, edited_at, reply_count) \
                   SELECT n.user_id, n.event_id, $6, $7, m.id, m.sender_id, m.recipient_id, m.content, \
                   m.is_read, m.parent_id, m.conversation_id, m.created_at, m.read_at, m.edited_at, \
                   m.reply_count FROM numbered n JOIN stored m ON m.id = n.id \
                   RETURNING user_id, event_id, message_id) \
                 SELECT m.*, l.user_id AS event_user_id, l.event_id \
                 FROM logged l JOIN stored m ON m.id = l.message_id",
                MEMBER_UPSERT_CONFLICT,
                super::sql::HEAD_BUMP_CONFLICT
            )
        });
        #[derive(sqlx::FromRow)]
        struct Logged {
            #[sqlx(flatten)]
            message: MessageRecord,
            event_user_id: i64,
            event_id: i64,
        }
        let now = messages.iter().map(|m| m.now).max().unwrap_or_default();
        let rows: Vec<Logged> = sqlx::query_as(sqlx::AssertSqlSafe(SEND.as_str()))
            .bind(column(messages, |m| m.sender_id)) // $1
            .bind(column(messages, |m| m.recipient_id)) // $2
            .bind(column(messages, |m| m.content.as_str())) // $3
            .bind(column(messages, |m| m.conversation_id.as_str())) // $4
            .bind(column(messages, |m| m.now)) // $5
            .bind(MessageChange::Created as i32) // $6
            .bind(now) // $7
            .fetch_all(self.writer())
            .await?;
        let mut events: std::collections::HashMap<(i64, i64), i64> =
            std::collections::HashMap::with_capacity(rows.len());
        // Two rows per message (one per event), one record each, by id.
        let mut stored = std::collections::BTreeMap::new();
        for row in rows {
            events.insert((row.message.id, row.event_user_id), row.event_id);
            stored.entry(row.message.id).or_insert(row.message);
        }
        self.pages
            .forget(stored.values().flat_map(|m| [m.sender_id, m.recipient_id]));
        let stored_ids =
            super::sql::stored_ids_in_request_order(messages, |_| true, stored.values());
        // Why a message was refused is read only when one was (rarely), and
        // after the commit: its failure must not fail the batch, or a retry
        // would store the batch's other messages again.
        let refused: Vec<i64> = messages
            .iter()
            .zip(&stored_ids)
            .filter(|(_, id)| id.is_none())
            .map(|(m, _)| m.recipient_id)
            .collect();
        let existing: Option<std::collections::HashSet<i64>> = if refused.is_empty() {
            Some(std::collections::HashSet::new())
        } else {
            sqlx::query_scalar("SELECT id FROM users WHERE id = ANY($1::bigint[])")
                .bind(refused) // $1
                .fetch_all(self.reader())
                .await
                .inspect_err(
                    |error| tracing::debug!(error = %error, "reading refused recipients failed"),
                )
                .ok()
                .map(|ids| ids.into_iter().collect())
        };
        Ok(messages
            .iter()
            .zip(stored_ids)
            .map(|(m, id)| {
                let Some(message) = id.and_then(|id| stored.remove(&id)) else {
                    return Err(match &existing {
                        Some(existing) if !existing.contains(&m.recipient_id) => {
                            StorageError::NotFound("recipient")
                        }
                        // Disabled; or gone, when that could not be read.
                        _ => StorageError::RecipientDisabled,
                    });
                };
                let event_ids = message
                    .audience()
                    .filter_map(|user_id| Some((user_id, *events.get(&(message.id, user_id))?)))
                    .collect();
                Ok(LoggedChange {
                    change: MessageChange::Created,
                    message,
                    event_ids,
                })
            })
            .collect())
    }

    /// First pages, each checked against the user's newest event id before
    /// it is served (`PAGES_CHECKED_AGAINST_LOG`): other instances write too.
    fn page_cache(&self) -> Option<&super::page_cache::PageCache> {
        Some(&self.pages)
    }

    /// Other instances write to the same database, and their writes reach
    /// this one's cache only through the log's heads.
    const PAGES_CHECKED_AGAINST_LOG: bool = true;

    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    /// New messages are logged by `log_changes`, whose head upsert takes
    /// the row locks that keep ids in commit order.
    const LOGS_SENDS_BY_TRIGGER: bool = false;

    /// What turns a query into its plan.
    const EXPLAIN: &'static str = "EXPLAIN ";

    /// Rows a write selects before changing them are locked in the
    /// selection's order.
    const ROW_LOCK: &'static str = " FOR UPDATE";

    /// SearchMessages' condition, served by the trigram index on the same
    /// expression (ASCII letters folded, nothing else).
    fn push_text_match(query: &mut sqlx::QueryBuilder<Postgres>, text: &str) {
        query
            .push(
                "translate(content, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz') LIKE ",
            )
            .push_bind(super::sql::ascii_substring_pattern(text))
            .push(" ESCAPE '\\'");
    }

    /// Revoking transactions take turns (until their commit) before they add
    /// to the revocation log, so its ids grow in commit order and a feed
    /// reading `id > cursor` never skips a row committed late.
    async fn lock_revocation_log(&self, tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(REVOCATION_LOG_LOCK) // $1
            .execute(tx)
            .await?;
        Ok(())
    }
}

/// The advisory lock key of the revocation log ("revoc" in ASCII).
const REVOCATION_LOG_LOCK: i64 = 0x0072_6576_6f63;

impl_repositories!(PostgresStore, Postgres);

#[async_trait]
impl Database for PostgresStore {
    fn pool_state(&self) -> super::PoolState {
        let idle = self.pool.num_idle();
        super::PoolState {
            idle,
            in_use: (self.pool.size() as usize).saturating_sub(idle),
        }
    }

    fn event_channel(&self) -> Option<Arc<dyn EventChannel>> {
        Some(Arc::new(PgEventChannel {
            pool: self.pool.clone(),
        }))
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn deployment_id(&self) -> Result<String> {
        Ok(sqlx::query_scalar("SELECT id FROM deployment")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Nothing to do: the trigram index takes each row as it is written
    /// (GIN's pending list already defers the work).
    async fn index_text(&self) -> Result<u64> {
        Ok(0)
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        Ok(MIGRATOR.run(&self.pool).await?)
    }

    async fn migration_status(&self) -> anyhow::Result<Vec<MigrationState>> {
        migrations::status(&self.pool, &MIGRATOR).await
    }

    async fn revert_latest(&self) -> anyhow::Result<Option<i64>> {
        migrations::revert_latest(&self.pool, &MIGRATOR).await
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// Merges a new newest message and unread count into a participant's
/// conversation row: the newer of the two last messages wins. (SQLite's
/// insert trigger `messages_merge_conversation` merges the same way.)
const MEMBER_UPSERT_CONFLICT: &str = " ON CONFLICT (user_id, other_user_id, conversation_id) DO UPDATE SET \
     last_message_id = CASE WHEN (excluded.last_created_at, excluded.last_message_id) \
     > (conversation_members.last_created_at, conversation_members.last_message_id) \
     THEN excluded.last_message_id ELSE conversation_members.last_message_id END, \
     last_created_at = CASE WHEN (excluded.last_created_at, excluded.last_message_id) \
     > (conversation_members.last_created_at, conversation_members.last_message_id) \
     THEN excluded.last_created_at ELSE conversation_members.last_created_at END, \
     unread_count = conversation_members.unread_count + excluded.unread_count";

/// One participant's conversation row after a batch of sends: its newest
/// message and the unread messages it gained.
struct MemberRow<'a> {
    user_id: i64,
    other_user_id: i64,
    conversation_id: &'a str,
    last_message_id: i64,
    last_created_at: i64,
    unread: i64,
}

/// One row per participant and conversation of the `stored` messages: the
/// newest message and the unread messages it gained. Rows come in key order,
/// the same in every transaction, so concurrent writers of one conversation
/// cannot deadlock on PostgreSQL.
fn member_rows(stored: &[super::MessageRecord]) -> Vec<MemberRow<'_>> {
    let mut members: std::collections::BTreeMap<(i64, i64, &str), (&super::MessageRecord, i64)> =
        std::collections::BTreeMap::new();
    for record in stored {
        let (sender, recipient) = (record.sender_id, record.recipient_id);
        let mut views = vec![(recipient, sender, 1)];
        if sender != recipient {
            views.push((sender, recipient, 0));
        }
        for (user_id, other_user_id, unread) in views {
            let entry = members
                .entry((user_id, other_user_id, record.conversation_id.as_str()))
                .or_insert((record, 0));
            if (record.created_at, record.id) > (entry.0.created_at, entry.0.id) {
                entry.0 = record;
            }
            entry.1 += unread;
        }
    }
    members
        .into_iter()
        .map(
            |((user_id, other_user_id, conversation_id), (newest, unread))| MemberRow {
                user_id,
                other_user_id,
                conversation_id,
                last_message_id: newest.id,
                last_created_at: newest.created_at,
                unread,
            },
        )
        .collect()
}

/// One field of every row, as the array a statement over `unnest` binds.
fn column<'r, R, T>(rows: &'r [R], field: impl Fn(&'r R) -> T) -> Vec<T> {
    rows.iter().map(field).collect()
}

type PositionReply = tokio::sync::oneshot::Sender<Result<(i64, i64)>>;

/// Reads users' positions for the first-page check, all waiting callers in
/// one query: a caller waits for the next query that starts after it asked,
/// so it still sees every write committed before its call. Under load this
/// turns a query per ListMessages into a query per round of them.
struct PositionReader {
    queue: tokio::sync::mpsc::UnboundedSender<(i64, PositionReply)>,
}

/// Callers answered by one query at most.
const POSITIONS_PER_QUERY: usize = 1024;

impl PositionReader {
    /// Starts the reading task; it ends with the store.
    fn start(pool: PgPool) -> Self {
        let (queue, mut waiting) = tokio::sync::mpsc::unbounded_channel::<(i64, PositionReply)>();
        tokio::spawn(async move {
            let mut round = Vec::with_capacity(POSITIONS_PER_QUERY);
            while waiting.recv_many(&mut round, POSITIONS_PER_QUERY).await > 0 {
                let mut users: Vec<i64> = round.iter().map(|(user_id, _)| *user_id).collect();
                users.sort_unstable();
                users.dedup();
                let read: std::result::Result<Vec<(i64, i64, i64)>, sqlx::Error> = sqlx::query_as(
                    "SELECT u.id, COALESCE(h.last_event_id, 0), d.erasures \
                     FROM unnest($1::bigint[]) AS u(id) CROSS JOIN deployment d \
                     LEFT JOIN message_event_heads h ON h.user_id = u.id",
                )
                .bind(&users) // $1
                .fetch_all(&pool)
                .await;
                match read {
                    Ok(rows) => {
                        let positions: std::collections::HashMap<i64, (i64, i64)> = rows
                            .into_iter()
                            .map(|(user_id, head, erasures)| (user_id, (head, erasures)))
                            .collect();
                        for (user_id, reply) in round.drain(..) {
                            let position = positions
                                .get(&user_id)
                                .copied()
                                .ok_or(super::StorageError::NotFound("position"));
                            let _ = reply.send(position);
                        }
                    }
                    Err(error) => {
                        // Every caller gets the same kind of failure.
                        let unavailable = matches!(
                            super::StorageError::from(error),
                            super::StorageError::Unavailable(_)
                        );
                        for (_, reply) in round.drain(..) {
                            let _ = reply.send(Err(if unavailable {
                                super::StorageError::Unavailable(sqlx::Error::PoolTimedOut)
                            } else {
                                super::StorageError::Internal(sqlx::Error::Protocol(
                                    "reading first-page positions failed".into(),
                                ))
                            }));
                        }
                    }
                }
            }
        });
        Self { queue }
    }

    async fn read(&self, user_id: i64) -> Result<(i64, i64)> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let closed = || super::StorageError::Unavailable(sqlx::Error::PoolClosed);
        self.queue.send((user_id, reply)).map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

/// Stream events between instances: LISTEN/NOTIFY on one channel. A payload
/// that fits in a notification travels in it (`p:` prefix); a larger one is
/// stored in `stream_events` and the notification carries its id (`i:`).
struct PgEventChannel {
    pool: PgPool,
}

const CHANNEL: &str = "ai_message_events";
/// PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
const MAX_INLINE_PAYLOAD: usize = 7900;
/// Stored events older than this are swept; every listener has long read them.
const STORED_EVENT_LIFETIME_MICROS: i64 = 60_000_000;
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

#[async_trait]
impl EventChannel for PgEventChannel {
    async fn publish(&self, payloads: Vec<String>, now: i64) -> anyhow::Result<()> {
        // One statement, so one transaction and one turn at NOTIFY's
        // database-wide commit lock, for each run of payloads that fit in a
        // notification; a larger one is stored and its id notified, in order.
        let fits = |payload: &String| payload.len() <= MAX_INLINE_PAYLOAD;
        for run in payloads.chunk_by(|a, b| fits(a) == fits(b)) {
            if fits(&run[0]) {
                sqlx::query(
                    "SELECT pg_notify($1, 'p:' || payload) \
                     FROM unnest($2::text[]) WITH ORDINALITY AS t(payload, n) ORDER BY n",
                )
                .bind(CHANNEL) // $1
                .bind(run) // $2
                .execute(&self.pool)
                .await?;
                continue;
            }
            for payload in run {
                sqlx::query(
                    "WITH stored AS (INSERT INTO stream_events (payload, created_at) VALUES ($2, $3) \
                     RETURNING id) SELECT pg_notify($1, 'i:' || id) FROM stored",
                )
                .bind(CHANNEL) // $1
                .bind(payload) // $2
                .bind(now) // $3
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(())
    }

    async fn start_listener(
        &self,
        deliver: Arc<dyn Fn(String) + Send + Sync>,
        connected: tokio::sync::watch::Sender<bool>,
        now: super::Clock,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let mut listener = listen(&self.pool).await?;
        connected.send_replace(true);
        let pool = self.pool.clone();
        Ok(tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
            let mut check = tokio::time::interval(LISTENER_CHECK_INTERVAL);
            loop {
                let lost = tokio::select! {
                    _ = stop.changed() => return,
                    _ = sweep.tick() => {
                        sweep_stored_events(&pool, now()).await;
                        false
                    }
                    // A connection that went silent (no error, no data) is
                    // found by a query on it that gets no answer.
                    _ = check.tick() => !matches!(
                        tokio::time::timeout(LISTENER_CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(&mut listener)).await,
                        Ok(Ok(_))
                    ),
                    // `try_recv` answers `None` when the connection broke:
                    // notifications sent meanwhile are gone.
                    received = listener.try_recv() => match received {
                        Ok(Some(notification)) => {
                            deliver_notification(&pool, notification.payload(), deliver.as_ref()).await;
                            false
                        }
                        Ok(None) | Err(_) => true,
                    },
                };
                if !lost {
                    continue;
                }
                connected.send_replace(false);
                tracing::warn!(
                    "the event listener connection was lost; streams end until it is back"
                );
                listener = loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        () = tokio::time::sleep(LISTENER_RETRY) => {}
                    }
                    match tokio::time::timeout(LISTENER_CHECK_TIMEOUT, listen(&pool)).await {
                        Ok(Ok(listener)) => break listener,
                        Ok(Err(error)) => {
                            tracing::debug!(error = %error, "event listener not back yet")
                        }
                        Err(_) => tracing::debug!("event listener not back yet (timed out)"),
                    }
                };
                connected.send_replace(true);
                tracing::info!("the event listener is listening again");
            }
        }))
    }
}

/// How often the listening connection is checked, and how long the check may
/// take: a silent connection is noticed within 10 s (the contract: 15 s).
const LISTENER_CHECK_INTERVAL: Duration = Duration::from_secs(5);
const LISTENER_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
const LISTENER_RETRY: Duration = Duration::from_millis(250);

/// A listener on its own connection, subscribed when this returns. It never
/// reconnects by itself: a lost connection must be seen, not papered over.
async fn listen(pool: &PgPool) -> Result<sqlx::postgres::PgListener> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

async fn sweep_stored_events(pool: &PgPool, now: i64) {
    let cutoff = now - STORED_EVENT_LIFETIME_MICROS;
    if let Err(error) = sqlx::query("DELETE FROM stream_events WHERE created_at < $1")
        .bind(cutoff) // $1
        .execute(pool)
        .await
    {
        tracing::warn!(error = %error, "sweeping stored stream events failed");
    }
}

/// An inline payload (`p:`) goes straight on; a stored one (`i:<id>`) is read first.
async fn deliver_notification(
    pool: &PgPool,
    payload: &str,
    deliver: &(dyn Fn(String) + Send + Sync),
) {
    if let Some(inline) = payload.strip_prefix("p:") {
        deliver(inline.to_owned());
    } else if let Some(id) = payload
        .strip_prefix("i:")
        .and_then(|id| id.parse::<i64>().ok())
    {
        match sqlx::query_scalar::<_, String>("SELECT payload FROM stream_events WHERE id = $1")
            .bind(id) // $1
            .fetch_optional(pool)
            .await
        {
            Ok(Some(stored)) => deliver(stored),
            Ok(None) => tracing::warn!(id, "stored stream event already swept"),
            Err(error) => tracing::warn!(error = %error, "reading a stored stream event failed"),
        }
    }
}
