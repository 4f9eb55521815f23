-- Messaging that never loses an event: edits, reply counts, a per-user
-- event log with its heads, idempotent-send keys and a trigram text index.
ALTER TABLE messages ADD COLUMN edited_at INTEGER;
ALTER TABLE messages ADD COLUMN reply_count INTEGER NOT NULL DEFAULT 0;
UPDATE messages SET reply_count = (SELECT COUNT(*) FROM messages AS r WHERE r.parent_id = messages.id);
-- Threads are listed newest first, so replies are indexed in that order.
DROP INDEX messages_parent_id_idx;
CREATE INDEX messages_parent_created_idx ON messages (parent_id, created_at, id);

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

-- SearchMessages: trigrams of the content (external content, kept by triggers).
CREATE VIRTUAL TABLE messages_fts USING fts5(
    content, content = 'messages', content_rowid = 'id', tokenize = 'trigram case_sensitive 0'
);
INSERT INTO messages_fts (messages_fts) VALUES ('rebuild');
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
END;
