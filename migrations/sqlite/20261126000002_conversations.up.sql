-- Messaging: a conversation is its id together with its two participants
-- (user_low <= user_high), one summary row per participant, and the indexes
-- that keep ListMessages and ListConversations to index range scans.
ALTER TABLE messages ADD COLUMN user_low INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN user_high INTEGER NOT NULL DEFAULT 0;
UPDATE messages SET user_low = min(sender_id, recipient_id), user_high = max(sender_id, recipient_id);

DROP INDEX messages_conversation_idx;
CREATE INDEX messages_pair_created_idx ON messages (user_low, user_high, created_at, id);
CREATE INDEX messages_pair_conversation_idx ON messages (user_low, user_high, conversation_id, created_at, id);
CREATE INDEX messages_unread_idx ON messages (recipient_id, created_at, id) WHERE is_read = FALSE;

-- One row per participant and conversation: its newest message and the
-- participant's unread count, kept current by every write to messages.
-- (MessageService answered UNIMPLEMENTED before this migration, so there are
-- no messages to summarise here.)
CREATE TABLE conversation_members (
    user_id         INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    other_user_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    conversation_id TEXT    NOT NULL,
    last_message_id INTEGER NOT NULL,
    last_created_at INTEGER NOT NULL,
    unread_count    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, other_user_id, conversation_id)
);
CREATE INDEX conversation_members_recent_idx
    ON conversation_members (user_id, last_created_at, last_message_id);
