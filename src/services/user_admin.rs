//! UserAdminService: not implemented yet; every RPC answers UNIMPLEMENTED.

use crate::proto::user_admin_service_server::UserAdminService;

pub struct UserAdminApi;

impl UserAdminService for UserAdminApi {}
