//! SessionService: not implemented yet; every RPC answers UNIMPLEMENTED.

use crate::proto::session_service_server::SessionService;

pub struct SessionApi;

impl SessionService for SessionApi {}
