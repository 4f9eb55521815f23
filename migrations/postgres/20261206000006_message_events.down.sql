-- pg_trgm stays: other schemas of the database may use it.
DROP TABLE message_requests;
DROP TABLE message_events;
DROP TABLE message_event_heads;
DROP INDEX messages_content_trgm_idx;
DROP INDEX messages_parent_created_idx;
CREATE INDEX messages_parent_id_idx ON messages (parent_id);
ALTER TABLE messages DROP COLUMN reply_count;
ALTER TABLE messages DROP COLUMN edited_at;
