//! Storage records to protocol messages.

use crate::{domain::Timestamp, proto, storage::UserRecord};

pub fn user_to_proto(user: &UserRecord, roles: Vec<String>) -> proto::User {
    proto::User {
        id: user.id,
        username: user.username.clone(),
        email: user.email.clone(),
        full_name: user.full_name.clone(),
        bio: user.bio.clone(),
        is_active: user.is_active,
        is_superuser: user.is_superuser,
        roles,
        created_at: Some(Timestamp::from_micros(user.created_at).to_proto()),
        updated_at: Some(Timestamp::from_micros(user.updated_at).to_proto()),
    }
}
