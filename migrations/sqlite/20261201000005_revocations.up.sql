-- Why a session ended (SessionEndReason numbers; NULL while live or for a
-- session that simply expired), beside the existing revoked_at.
ALTER TABLE sessions ADD COLUMN end_reason INTEGER;

-- The revocation feed: one row per session that ended early, written in the
-- same transaction as the revocation. Ids grow in commit order (SQLite has
-- one writer), so a reader that has seen id N has seen every id below it.
CREATE TABLE revocations (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id INTEGER NOT NULL,
    user_id    INTEGER NOT NULL,
    reason     INTEGER NOT NULL,
    revoked_at INTEGER NOT NULL
);
CREATE INDEX revocations_revoked_at_idx ON revocations (revoked_at);
