DROP TABLE stream_events;
DROP TABLE conversation_members;
DROP INDEX messages_unread_idx;
DROP INDEX messages_pair_conversation_idx;
DROP INDEX messages_pair_created_idx;
CREATE INDEX messages_conversation_idx ON messages (conversation_id, created_at, id);
ALTER TABLE messages DROP COLUMN user_high;
ALTER TABLE messages DROP COLUMN user_low;
