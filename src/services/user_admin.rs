//! UserAdminService: users and roles, for superusers only. Rights are read
//! from the database on every call (`authenticate_superuser`), never from the
//! token, so promotion and demotion apply on the next call.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    AppState, Caller,
    convert::{role_to_proto, user_to_proto},
};
use crate::{
    auth::accounts::create_account,
    domain::{
        self, NewAccount,
        account::{RoleName, parse_role_description},
        paging::{PageScope, page_size},
    },
    error::{AppError, Reason},
    proto::{self, user_admin_service_server::UserAdminService},
    storage::{EndReason, UserRecord},
};

pub struct UserAdminApi {
    state: Arc<AppState>,
}

/// The longest `query` ListUsers accepts (a username or email is shorter).
const MAX_QUERY_CHARS: usize = 255;

impl UserAdminApi {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// A superuser may not lock themselves out (disable, delete or demote).
    fn refuse_self(caller: &Caller, user_id: i64, action: &str) -> Result<(), AppError> {
        if caller.user.id == user_id {
            return Err(AppError::refused(
                Reason::CannotModifySelf,
                format!("a superuser cannot {action} their own account"),
            ));
        }
        Ok(())
    }

    async fn user_response(&self, user: &UserRecord) -> Result<Option<proto::User>, AppError> {
        Ok(Some(self.state.user_proto(&user.profile).await?))
    }

    async fn list_users(
        &self,
        request: Request<proto::ListUsersRequest>,
    ) -> Result<proto::ListUsersResponse, AppError> {
        let caller = self.state.authenticate_superuser(&request).await?;
        let body = request.into_inner();
        let mut violations = domain::Violations::default();
        let limit = violations.check(page_size(body.page_size));
        violations.check(domain::reject_nul("query", &body.query));
        if body.query.chars().count() > MAX_QUERY_CHARS {
            violations.push(crate::error::FieldViolation::new(
                "query",
                "must be at most 255 characters long",
            ));
        }
        let scope = PageScope {
            rpc: "ListUsers",
            caller_id: caller.user.id,
            filters: &[&body.query],
        };
        let cursor = violations.check(scope.decode(&body.page_token, 1));
        let limit = violations.finish(limit)?;
        let after_id = cursor.flatten().map_or(0, |cursor| cursor[0]);

        let db = &self.state.db;
        let mut users = db.list_users(&body.query, after_id, limit + 1).await?;
        let next_page_token = if users.len() > usize::try_from(limit).unwrap_or(usize::MAX) {
            users.truncate(users.len() - 1);
            users
                .last()
                .map(|last| scope.encode(&[last.id]))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let roles = match (users.first(), users.last()) {
            (Some(first), Some(last)) => db.role_names_in_id_range(first.id, last.id).await?,
            _ => Vec::new(),
        };
        let total_size = db.count_users(&body.query).await?;
        Ok(proto::ListUsersResponse {
            users: users
                .iter()
                .map(|user| {
                    let names = roles
                        .iter()
                        .filter(|(user_id, _)| *user_id == user.id)
                        .map(|(_, name)| name.clone())
                        .collect();
                    user_to_proto(&user.profile, names)
                })
                .collect(),
            next_page_token,
            total_size,
        })
    }

    async fn find_user(&self, user_id: i64) -> Result<UserRecord, AppError> {
        self.state
            .db
            .find_user(user_id)
            .await?
            .ok_or_else(|| AppError::NotFound("user not found".into()))
    }
}

#[tonic::async_trait]
impl UserAdminService for UserAdminApi {
    async fn list_users(
        &self,
        request: Request<proto::ListUsersRequest>,
    ) -> Result<Response<proto::ListUsersResponse>, Status> {
        Ok(Response::new(
            UserAdminApi::list_users(self, request).await?,
        ))
    }

    async fn get_user(
        &self,
        request: Request<proto::GetUserRequest>,
    ) -> Result<Response<proto::GetUserResponse>, Status> {
        self.state.authenticate_superuser(&request).await?;
        let user = self.find_user(request.get_ref().user_id).await?;
        Ok(Response::new(proto::GetUserResponse {
            user: self.user_response(&user).await?,
        }))
    }

    async fn create_user(
        &self,
        request: Request<proto::CreateUserRequest>,
    ) -> Result<Response<proto::CreateUserResponse>, Status> {
        let caller = self.state.authenticate_superuser(&request).await?;
        let body = request.into_inner();
        let account = NewAccount::parse(
            &body.username,
            &body.email,
            &body.password,
            body.full_name.as_deref(),
        )?;
        let user = create_account(
            self.state.db.as_ref(),
            &self.state.hasher,
            account,
            body.is_superuser,
            self.state.clock.now(),
        )
        .await?;
        tracing::info!(target: "audit", actor = caller.user.id, peer = ?caller.peer, user_id = user.id, is_superuser = user.is_superuser, "user created");
        Ok(Response::new(proto::CreateUserResponse {
            user: Some(user_to_proto(&user.profile, Vec::new())),
        }))
    }

    async fn delete_user(
        &self,
        request: Request<proto::DeleteUserRequest>,
    ) -> Result<Response<proto::DeleteUserResponse>, Status> {
        let caller = self.state.authenticate_superuser(&request).await?;
        let user_id = request.get_ref().user_id;
        Self::refuse_self(&caller, user_id, "delete")?;
        let ended = self
            .state
            .db
            .delete_user(user_id, self.state.clock.now().micros())
            .await?;
        self.state
            .metrics
            .sessions_revoked(EndReason::UserDeleted.label(), ended);
        tracing::info!(target: "audit", actor = caller.user.id, peer = ?caller.peer, user_id, "user deleted");
        self.state.events.user_changed(user_id);
        Ok(Response::new(proto::DeleteUserResponse {}))
    }

    async fn disable_user(
        &self,
        request: Request<proto::DisableUserRequest>,
    ) -> Result<Response<proto::DisableUserResponse>, Status> {
        let caller = self.state.authenticate_superuser(&request).await?;
        let user_id = request.get_ref().user_id;
        Self::refuse_self(&caller, user_id, "disable")?;
        let (user, ended) = self
            .state
            .db
            .set_user_active(user_id, false, self.state.clock.now().micros())
            .await?;
        self.state
            .metrics
            .sessions_revoked(EndReason::UserDisabled.label(), ended);
        tracing::info!(target: "audit", actor = caller.user.id, peer = ?caller.peer, user_id, "user disabled; sessions revoked");
        self.state.events.user_changed(user_id);
        Ok(Response::new(proto::DisableUserResponse {
            user: self.user_response(&user).await?,
        }))
    }

    async fn enable_user(
        &self,
        request: Request<proto::EnableUserRequest>,
    ) -> Result<Response<proto::EnableUserResponse>, Status> {
        let caller = self.state.authenticate_superuser(&request).await?;
        let user_id = request.get_ref().user_id;
        let (user, _) = self
            .state
            .db
            .set_user_active(user_id, true, self.state.clock.now().micros())
            .await?;
        tracing::info!(target: "audit", actor = caller.user.id, peer = ?caller.peer, user_id, "user enabled");
        self.state.events.user_changed(user_id);
        Ok(Response::new(proto::EnableUserResponse {
            user: self.user_response(&user).await?,
        }))
    }

    async fn set_superuser(
        &self,
        request: Request<proto::SetSuperuserRequest>,
    ) -> Result<Response<proto::SetSuperuserResponse>, Status> {
        let caller = self.state.authenticate_superuser(&request).await?;
        let proto::SetSuperuserRequest {
            user_id,
            is_superuser,
        } = request.into_inner();
        if !is_superuser {
            Self::refuse_self(&caller, user_id, "demote")?;
        }
        let user = self
            .state
            .db
            .set_superuser(user_id, is_superuser, self.state.clock.now().micros())
            .await?;
        tracing::info!(target: "audit", actor = caller.user.id, peer = ?caller.peer, user_id, is_superuser, "superuser flag set");
        self.state.events.user_changed(user_id);
        Ok(Response::new(proto::SetSuperuserResponse {
            user: self.user_response(&user).await?,
        }))
    }

    async fn set_user_roles(
        &self,
        request: Request<proto::SetUserRolesRequest>,
    ) -> Result<Response<proto::SetUserRolesResponse>, Status> {
        let caller = self.state.authenticate_superuser(&request).await?;
        let body = request.into_inner();
        let roles = self
            .state
            .db
            .set_user_roles(body.user_id, &body.role_ids)
            .await?;
        tracing::info!(target: "audit", actor = caller.user.id, peer = ?caller.peer, user_id = body.user_id, role_ids = ?body.role_ids, "user roles replaced");
        self.state.events.user_changed(body.user_id);
        Ok(Response::new(proto::SetUserRolesResponse {
            roles: roles.into_iter().map(role_to_proto).collect(),
        }))
    }

    async fn get_user_roles(
        &self,
        request: Request<proto::GetUserRolesRequest>,
    ) -> Result<Response<proto::GetUserRolesResponse>, Status> {
        self.state.authenticate_superuser(&request).await?;
        let roles = self.state.db.user_roles(request.get_ref().user_id).await?;
        Ok(Response::new(proto::GetUserRolesResponse {
            roles: roles.into_iter().map(role_to_proto).collect(),
        }))
    }

    async fn list_roles(
        &self,
        request: Request<proto::ListRolesRequest>,
    ) -> Result<Response<proto::ListRolesResponse>, Status> {
        self.state.authenticate_superuser(&request).await?;
        let roles = self.state.db.list_roles().await?;
        Ok(Response::new(proto::ListRolesResponse {
            roles: roles.into_iter().map(role_to_proto).collect(),
        }))
    }

    async fn create_role(
        &self,
        request: Request<proto::CreateRoleRequest>,
    ) -> Result<Response<proto::CreateRoleResponse>, Status> {
        let caller = self.state.authenticate_superuser(&request).await?;
        let body = request.into_inner();
        let mut violations = domain::Violations::default();
        let name = violations.check(RoleName::parse(&body.name));
        let description = body
            .description
            .as_deref()
            .and_then(|text| violations.check(parse_role_description(text)));
        let name = violations.finish(name)?;
        let role = self
            .state
            .db
            .create_role(
                name.as_str(),
                description.as_deref(),
                self.state.clock.now().micros(),
            )
            .await?;
        tracing::info!(target: "audit", actor = caller.user.id, peer = ?caller.peer, role_id = role.id, "role created");
        Ok(Response::new(proto::CreateRoleResponse {
            role: Some(role_to_proto(role)),
        }))
    }

    async fn delete_role(
        &self,
        request: Request<proto::DeleteRoleRequest>,
    ) -> Result<Response<proto::DeleteRoleResponse>, Status> {
        let caller = self.state.authenticate_superuser(&request).await?;
        let role_id = request.get_ref().role_id;
        self.state.db.delete_role(role_id).await?;
        tracing::info!(target: "audit", actor = caller.user.id, peer = ?caller.peer, role_id, "role deleted");
        self.state.events.all_users_changed();
        Ok(Response::new(proto::DeleteRoleResponse {}))
    }
}
