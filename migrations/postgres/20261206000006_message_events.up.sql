-- Messaging that never loses an event: edits, reply counts, a per-user
-- event log with its heads, idempotent-send keys and a trigram text index.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

ALTER TABLE messages ADD COLUMN edited_at BIGINT;
ALTER TABLE messages ADD COLUMN reply_count BIGINT NOT NULL DEFAULT 0;
UPDATE messages SET reply_count = r.replies
    FROM (SELECT parent_id, COUNT(*) AS replies FROM messages WHERE parent_id IS NOT NULL GROUP BY parent_id) AS r
    WHERE messages.id = r.parent_id;
-- Threads are listed newest first, so replies are indexed in that order;
-- messages that reply to nothing (most) are left out of the index.
DROP INDEX messages_parent_id_idx;
CREATE INDEX messages_parent_created_idx ON messages (parent_id, created_at, id)
    WHERE parent_id IS NOT NULL;
-- SearchMessages matches a substring ignoring ASCII case only: the index is
-- on the content with exactly A-Z folded (lower() would fold more letters).
CREATE INDEX messages_content_trgm_idx ON messages
    USING gin (translate(content, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz') gin_trgm_ops);

-- Each user's newest event id. Event ids are dense per user (1, 2, 3, ...)
-- and handed out by bumping this row inside the writing transaction, whose
-- row lock makes them grow in commit order: a reader that sees id N sees
-- every id below.
CREATE TABLE message_event_heads (
    user_id       BIGINT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    last_event_id BIGINT NOT NULL
);

-- One row per event per user who sees it: the message as it was after the
-- change, so a replay shows what happened even after later edits.
CREATE TABLE message_events (
    user_id         BIGINT  NOT NULL,
    event_id        BIGINT  NOT NULL,
    kind            INTEGER NOT NULL,
    occurred_at     BIGINT  NOT NULL,
    message_id      BIGINT  NOT NULL,
    sender_id       BIGINT  NOT NULL,
    recipient_id    BIGINT  NOT NULL,
    content         TEXT    NOT NULL,
    is_read         BOOLEAN NOT NULL,
    parent_id       BIGINT,
    conversation_id TEXT    NOT NULL,
    created_at      BIGINT  NOT NULL,
    read_at         BIGINT,
    edited_at       BIGINT,
    reply_count     BIGINT  NOT NULL,
    PRIMARY KEY (user_id, event_id)
);
CREATE INDEX message_events_occurred_idx ON message_events (occurred_at);

-- Idempotent sends: a sender's request_id names its first message for 24 h.
-- message_id points at that message (which may since have been deleted).
CREATE TABLE message_requests (
    sender_id   BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    request_id  TEXT   NOT NULL,
    fingerprint BYTEA  NOT NULL,
    message_id  BIGINT,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (sender_id, request_id)
);
CREATE INDEX message_requests_created_idx ON message_requests (created_at);
