//! MessageService: not implemented yet; every RPC answers UNIMPLEMENTED.

use crate::proto::message_service_server::MessageService;

pub struct MessageApi;

impl MessageService for MessageApi {}
