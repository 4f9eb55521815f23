//! Storage records to protocol messages.

use crate::{
    domain::Timestamp,
    proto,
    storage::{MessageRecord, RoleRecord, SessionRecord, UserProfile},
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

pub fn session_to_proto(session: SessionRecord, current_session_id: i64) -> proto::Session {
    proto::Session {
        id: session.id,
        device_info: session.device_info,
        ip_address: session.ip_address,
        is_active: session.is_active,
        created_at: timestamp(session.created_at),
        expires_at: timestamp(session.expires_at),
        last_used_at: timestamp(session.last_used_at),
        current: session.id == current_session_id,
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
    }
}
