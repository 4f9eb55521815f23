//! Storage records to protocol messages.

use crate::{
    domain::Timestamp,
    proto,
    storage::{EndReason, MessageRecord, RoleRecord, SessionRecord, UserProfile},
};

fn timestamp(micros: i64) -> Option<prost_types::Timestamp> {
    Some(Timestamp::from_micros(micros).to_proto())
}

pub fn user_to_proto(user: &UserProfile, roles: Vec<String>) -> proto::User {
    proto::User {
        id: user.id,
        username: user.username.clone(),
        email: user.email.clone(),
        full_name: user.full_name.clone(),
        bio: user.bio.clone(),
        is_active: user.is_active,
        is_superuser: user.is_superuser,
        roles,
        created_at: timestamp(user.created_at),
        updated_at: timestamp(user.updated_at),
    }
}

pub fn role_to_proto(role: RoleRecord) -> proto::Role {
    proto::Role {
        id: role.id,
        name: role.name,
        description: role.description,
        created_at: timestamp(role.created_at),
    }
}

/// The API's form of a stored end reason.
pub fn end_reason_to_proto(reason: i32) -> proto::SessionEndReason {
    proto::SessionEndReason::try_from(reason).unwrap_or(proto::SessionEndReason::Unspecified)
}

/// A session as its owner sees it at `now`: a live one has no end; a
/// revoked one ended then, for its reason; one that ran out ended at its
/// expiry (`EXPIRED`).
pub fn session_to_proto(
    session: SessionRecord,
    current_session_id: i64,
    now: Timestamp,
) -> proto::Session {
    let (ended_at, end_reason) = if !session.is_active {
        (
            session.revoked_at,
            session
                .end_reason
                .map_or(proto::SessionEndReason::Unspecified, end_reason_to_proto),
        )
    } else if session.expires_at <= now.micros() {
        (
            Some(session.expires_at),
            end_reason_to_proto(EndReason::Expired as i32),
        )
    } else {
        (None, proto::SessionEndReason::Unspecified)
    };
    proto::Session {
        id: session.id,
        device_info: session.device_info,
        ip_address: session.ip_address,
        is_active: session.is_active,
        created_at: timestamp(session.created_at),
        expires_at: timestamp(session.expires_at),
        last_used_at: timestamp(session.last_used_at),
        current: session.id == current_session_id,
        ended_at: ended_at.and_then(timestamp),
        end_reason: end_reason as i32,
    }
}

pub fn message_to_proto(message: MessageRecord) -> proto::Message {
    proto::Message {
        id: message.id,
        sender_id: message.sender_id,
        recipient_id: message.recipient_id,
        content: message.content,
        is_read: message.is_read,
        parent_id: message.parent_id,
        conversation_id: message.conversation_id,
        created_at: timestamp(message.created_at),
        read_at: message.read_at.and_then(timestamp),
        edited_at: message.edited_at.and_then(timestamp),
        reply_count: i32::try_from(message.reply_count).unwrap_or(i32::MAX),
    }
}
