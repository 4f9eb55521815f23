-- A new message merges its participants' conversation rows inside its own
-- INSERT, as messages_log_created logs its events: on SQLite every statement
-- is a hop to the connection's worker thread and back, dearer than the work.
-- (The same merge as the PostgreSQL writer's upsert: the newer last message
-- wins, the recipient gains an unread message; a note to oneself is one row.)
CREATE TRIGGER messages_merge_conversation AFTER INSERT ON messages BEGIN
    INSERT INTO conversation_members (user_id, other_user_id, conversation_id,
            last_message_id, last_created_at, unread_count)
        SELECT new.recipient_id, new.sender_id, new.conversation_id, new.id, new.created_at,
            CASE WHEN new.is_read THEN 0 ELSE 1 END
        UNION ALL
        SELECT new.sender_id, new.recipient_id, new.conversation_id, new.id, new.created_at, 0
        WHERE new.sender_id <> new.recipient_id
        ON CONFLICT (user_id, other_user_id, conversation_id) DO UPDATE SET
            last_message_id = CASE WHEN (excluded.last_created_at, excluded.last_message_id)
                > (conversation_members.last_created_at, conversation_members.last_message_id)
                THEN excluded.last_message_id ELSE conversation_members.last_message_id END,
            last_created_at = CASE WHEN (excluded.last_created_at, excluded.last_message_id)
                > (conversation_members.last_created_at, conversation_members.last_message_id)
                THEN excluded.last_created_at ELSE conversation_members.last_created_at END,
            unread_count = conversation_members.unread_count + excluded.unread_count;
END;
