-- Messaging that never loses an event: edits, reply counts, a per-user
-- event log with its heads, idempotent-send keys and a trigram text index.
ALTER TABLE messages ADD COLUMN edited_at INTEGER;
ALTER TABLE messages ADD COLUMN reply_count INTEGER NOT NULL DEFAULT 0;
UPDATE messages SET reply_count = (SELECT COUNT(*) FROM messages AS r WHERE r.parent_id = messages.id);
-- Threads are listed newest first, so replies are indexed in that order;
-- messages that reply to nothing (most) are left out of the index.
DROP INDEX messages_parent_id_idx;
CREATE INDEX messages_parent_created_idx ON messages (parent_id, created_at, id)
    WHERE parent_id IS NOT NULL;

-- Each user's newest event id. Event ids are dense per user (1, 2, 3, ...)
-- and handed out by bumping this row inside the writing transaction, so
-- they grow in commit order: a reader that sees id N sees every id below.
CREATE TABLE message_event_heads (
    user_id       INTEGER PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    last_event_id INTEGER NOT NULL
);

-- One row per event per user who sees it: the message as it was after the
-- change, so a replay shows what happened even after later edits.
CREATE TABLE message_events (
    user_id         INTEGER NOT NULL,
    event_id        INTEGER NOT NULL,
    kind            INTEGER NOT NULL,
    occurred_at     INTEGER NOT NULL,
    message_id      INTEGER NOT NULL,
    sender_id       INTEGER NOT NULL,
    recipient_id    INTEGER NOT NULL,
    content         TEXT    NOT NULL,
    is_read         INTEGER NOT NULL,
    parent_id       INTEGER,
    conversation_id TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    read_at         INTEGER,
    edited_at       INTEGER,
    reply_count     INTEGER NOT NULL,
    PRIMARY KEY (user_id, event_id)
) WITHOUT ROWID;
CREATE INDEX message_events_occurred_idx ON message_events (occurred_at);

-- A new message is logged by its own INSERT (one event for each of its
-- sender and recipient, once for a note to oneself): a statement more per
-- batch costs more than the rows. Reads, edits and deletes are logged by
-- the store.
CREATE TRIGGER messages_log_created AFTER INSERT ON messages BEGIN
    INSERT INTO message_event_heads (user_id, last_event_id)
        SELECT user_id, 1 FROM (SELECT new.sender_id AS user_id UNION SELECT new.recipient_id) WHERE TRUE
        ON CONFLICT (user_id) DO UPDATE SET last_event_id = last_event_id + 1;
    INSERT INTO message_events (user_id, event_id, kind, occurred_at, message_id, sender_id,
            recipient_id, content, is_read, parent_id, conversation_id, created_at, read_at,
            edited_at, reply_count)
        SELECT user_id, last_event_id, 1, new.created_at, new.id, new.sender_id, new.recipient_id,
            new.content, new.is_read, new.parent_id, new.conversation_id, new.created_at,
            new.read_at, new.edited_at, new.reply_count
        FROM message_event_heads WHERE user_id IN (new.sender_id, new.recipient_id);
END;

-- Idempotent sends: a sender's request_id names its first message for 24 h.
-- message_id points at that message (which may since have been deleted).
CREATE TABLE message_requests (
    sender_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    request_id  TEXT    NOT NULL,
    fingerprint BLOB    NOT NULL,
    message_id  INTEGER,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (sender_id, request_id)
);
CREATE INDEX message_requests_created_idx ON message_requests (created_at);

-- SearchMessages: trigrams of the content (external content). FTS5 writes
-- a segment per transaction, which costs as much again as the message
-- itself in a group commit, so new messages are indexed in bulk, a few
-- thousand at a time, by a background indexer: rows up to indexed_up_to are
-- in the index and searched through it, the few newer ones are searched
-- directly. Edits and deletes of indexed rows keep the index exact at once.
CREATE VIRTUAL TABLE messages_fts USING fts5(
    content, content = 'messages', content_rowid = 'id', tokenize = 'trigram case_sensitive 0'
);
INSERT INTO messages_fts (messages_fts) VALUES ('rebuild');
CREATE TABLE messages_fts_state (indexed_up_to INTEGER NOT NULL);
INSERT INTO messages_fts_state (indexed_up_to) SELECT COALESCE(MAX(id), 0) FROM messages;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages
WHEN old.id <= (SELECT indexed_up_to FROM messages_fts_state) BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages
WHEN old.id <= (SELECT indexed_up_to FROM messages_fts_state) BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
END;
