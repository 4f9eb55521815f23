DROP TABLE revocations;
ALTER TABLE sessions DROP COLUMN end_reason;
