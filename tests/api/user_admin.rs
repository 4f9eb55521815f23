//! UserAdminService and the authorization matrix of the admin and session surfaces.

use std::process::{Command, Stdio};

use ai_message::proto;
use tonic::{Code, Status};

use crate::helpers::{
    Backend, LoggedIn, PASSWORD, TestApp, assert_code, bad_request_fields, spawn_app, with_bearer,
};

backend_tests!(
    every_admin_and_session_rpc_answers_the_exact_code_for_each_kind_of_caller,
    the_authorization_matrix_holds_through_rest,
    list_users_pages_through_every_user_once,
    list_users_filters_by_substring_case_insensitively,
    list_users_refuses_foreign_or_malformed_page_tokens_and_negative_sizes,
    get_user_returns_the_user_with_roles_or_not_found,
    create_user_validates_like_register_and_can_create_superusers,
    superusers_cannot_disable_delete_or_demote_themselves,
    disabling_revokes_every_session_and_enabling_revives_none,
    promotion_and_demotion_apply_to_the_same_token_on_the_next_call,
    set_user_roles_replaces_the_whole_set_or_changes_nothing,
    roles_are_unique_and_deleting_one_removes_it_from_users,
    delete_user_leaves_no_rows_behind_and_frees_the_names,
    create_superuser_from_the_command_line_gives_a_working_admin,
);

/// How the matrix reaches the server.
#[derive(Clone, Copy)]
enum Transport {
    Grpc,
    Rest,
}

/// One RPC of the matrix, called with `token` (or none) over `transport`.
async fn call(
    app: &TestApp,
    rpc: &str,
    token: Option<&str>,
    fx: &Fixture,
    transport: Transport,
) -> Code {
    match transport {
        Transport::Grpc => call_grpc(app, rpc, token, fx).await,
        Transport::Rest => call_rest(app, rpc, token, fx).await,
    }
}

/// The matrix's call through REST: the gRPC code of the answer, checked
/// against its HTTP status.
async fn call_rest(app: &TestApp, rpc: &str, token: Option<&str>, fx: &Fixture) -> Code {
    use serde_json::json;
    let victim = fx.victim;
    let (method, path, body) = match rpc {
        "ListUsers" => ("GET", "/auth/users".to_owned(), None),
        "GetUser" => ("GET", format!("/auth/users/{victim}"), None),
        "CreateUser" => {
            let name = format!("created{}", fx.counter());
            let body = json!({"username": name, "email": format!("{name}@example.com"), "password": PASSWORD});
            ("POST", "/auth/users".to_owned(), Some(body))
        }
        "DeleteUser" => ("DELETE", format!("/auth/users/{}", fx.doomed), None),
        "DisableUser" => (
            "PUT",
            format!("/auth/users/{victim}/disable"),
            Some(json!({})),
        ),
        "EnableUser" => (
            "PUT",
            format!("/auth/users/{victim}/enable"),
            Some(json!({})),
        ),
        "SetSuperuser" => (
            "PUT",
            format!("/auth/users/{victim}/superuser"),
            Some(json!({"is_superuser": false})),
        ),
        "SetUserRoles" => (
            "PUT",
            format!("/auth/users/{victim}/roles"),
            Some(json!({"role_ids": [fx.role]})),
        ),
        "GetUserRoles" => ("GET", format!("/auth/users/{victim}/roles"), None),
        "ListRoles" => ("GET", "/auth/roles".to_owned(), None),
        "CreateRole" => (
            "POST",
            "/auth/roles".to_owned(),
            Some(json!({"name": format!("role{}", fx.counter())})),
        ),
        "DeleteRole" => ("DELETE", format!("/auth/roles/{}", fx.doomed_role), None),
        "ListSessions" => ("GET", "/auth/sessions".to_owned(), None),
        "DeleteSession" => {
            let session_id = match token {
                Some(token) => fx.spare_session_of(app, token).await,
                None => 1,
            };
            ("DELETE", format!("/auth/sessions/{session_id}"), None)
        }
        other => panic!("no call for {other}"),
    };
    let answer = crate::rest::Rest::new(app)
        .call(method, &path, token, body)
        .await;
    if answer.status == 200 {
        return Code::Ok;
    }
    let code = Code::from_i32(i32::try_from(answer.code()).unwrap());
    let expected_status = match code {
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        _ => answer.status,
    };
    assert_eq!(answer.status, expected_status, "{rpc}: {answer:?}");
    code
}

/// One RPC of the matrix, called with `token` (or none).
async fn call_grpc(app: &TestApp, rpc: &str, token: Option<&str>, fx: &Fixture) -> Code {
    fn req<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
        match token {
            Some(token) => with_bearer(message, token),
            None => tonic::Request::new(message),
        }
    }
    fn code<T>(result: Result<T, Status>) -> Code {
        result.map_or_else(|status| status.code(), |_| Code::Ok)
    }
    let mut admin = app.admin.clone();
    let mut sessions = app.sessions.clone();
    let victim = fx.victim;
    match rpc {
        "ListUsers" => code(
            admin
                .list_users(req(proto::ListUsersRequest::default(), token))
                .await,
        ),
        "GetUser" => code(
            admin
                .get_user(req(proto::GetUserRequest { user_id: victim }, token))
                .await,
        ),
        "CreateUser" => {
            let name = format!("created{}", fx.counter());
            code(
                admin
                    .create_user(req(
                        proto::CreateUserRequest {
                            username: name.clone(),
                            email: format!("{name}@example.com"),
                            password: PASSWORD.into(),
                            full_name: None,
                            is_superuser: false,
                        },
                        token,
                    ))
                    .await,
            )
        }
        "DeleteUser" => code(
            admin
                .delete_user(req(proto::DeleteUserRequest { user_id: fx.doomed }, token))
                .await,
        ),
        "DisableUser" => code(
            admin
                .disable_user(req(proto::DisableUserRequest { user_id: victim }, token))
                .await,
        ),
        "EnableUser" => code(
            admin
                .enable_user(req(proto::EnableUserRequest { user_id: victim }, token))
                .await,
        ),
        "SetSuperuser" => code(
            admin
                .set_superuser(req(
                    proto::SetSuperuserRequest {
                        user_id: victim,
                        is_superuser: false,
                    },
                    token,
                ))
                .await,
        ),
        "SetUserRoles" => code(
            admin
                .set_user_roles(req(
                    proto::SetUserRolesRequest {
                        user_id: victim,
                        role_ids: vec![fx.role],
                    },
                    token,
                ))
                .await,
        ),
        "GetUserRoles" => code(
            admin
                .get_user_roles(req(proto::GetUserRolesRequest { user_id: victim }, token))
                .await,
        ),
        "ListRoles" => code(
            admin
                .list_roles(req(proto::ListRolesRequest {}, token))
                .await,
        ),
        "CreateRole" => code(
            admin
                .create_role(req(
                    proto::CreateRoleRequest {
                        name: format!("role{}", fx.counter()),
                        description: None,
                    },
                    token,
                ))
                .await,
        ),
        "DeleteRole" => code(
            admin
                .delete_role(req(
                    proto::DeleteRoleRequest {
                        role_id: fx.doomed_role,
                    },
                    token,
                ))
                .await,
        ),
        "ListSessions" => code(
            sessions
                .list_sessions(req(proto::ListSessionsRequest::default(), token))
                .await,
        ),
        "DeleteSession" => {
            // Each caller deletes a spare session of their own, made for this call.
            let session_id = match token {
                Some(token) => fx.spare_session_of(app, token).await,
                None => 1,
            };
            code(
                sessions
                    .delete_session(req(proto::DeleteSessionRequest { session_id }, token))
                    .await,
            )
        }
        other => panic!("no call for {other}"),
    }
}

struct Fixture {
    victim: i64,
    doomed: i64,
    role: i64,
    doomed_role: i64,
    next: std::sync::atomic::AtomicU32,
    logins: Vec<(String, String)>,
}

impl Fixture {
    fn counter(&self) -> u32 {
        self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    /// A new session of the token's owner, by logging in again.
    async fn spare_session_of(&self, app: &TestApp, token: &str) -> i64 {
        let username = self
            .logins
            .iter()
            .find(|(t, _)| t == token)
            .map(|(_, name)| name.clone());
        match username {
            Some(name) => app.login(&name, PASSWORD).await.map_or(1, |l| l.session_id),
            None => 1,
        }
    }
}

async fn every_admin_and_session_rpc_answers_the_exact_code_for_each_kind_of_caller(
    backend: Backend,
) {
    authorization_matrix(backend, Transport::Grpc).await;
}

async fn the_authorization_matrix_holds_through_rest(backend: Backend) {
    authorization_matrix(backend, Transport::Rest).await;
}

async fn authorization_matrix(backend: Backend, transport: Transport) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let normal = app.register_and_login("normal").await;
    let disabled = app.register_and_login("disabled").await;
    let victim = app.register("victim").await.id;
    let doomed = app.register("doomed").await.id;
    let mut admin = app.admin.clone();
    let role = admin
        .create_role(with_bearer(
            proto::CreateRoleRequest {
                name: "keep".into(),
                description: None,
            },
            &root.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .role
        .unwrap()
        .id;
    let doomed_role = admin
        .create_role(with_bearer(
            proto::CreateRoleRequest {
                name: "doomed".into(),
                description: None,
            },
            &root.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .role
        .unwrap()
        .id;
    admin
        .disable_user(with_bearer(
            proto::DisableUserRequest {
                user_id: disabled.user_id,
            },
            &root.access_token,
        ))
        .await
        .unwrap();
    let fx = Fixture {
        victim,
        doomed,
        role,
        doomed_role,
        next: Default::default(),
        logins: vec![
            (root.access_token.clone(), "root".into()),
            (normal.access_token.clone(), "normal".into()),
        ],
    };

    use Code::{Ok as OK, PermissionDenied as DENIED, Unauthenticated as UNAUTH};
    // rpc, no token, normal user, disabled user's old token, superuser
    let matrix = [
        ("ListUsers", UNAUTH, DENIED, UNAUTH, OK),
        ("GetUser", UNAUTH, DENIED, UNAUTH, OK),
        ("CreateUser", UNAUTH, DENIED, UNAUTH, OK),
        ("DeleteUser", UNAUTH, DENIED, UNAUTH, OK),
        ("DisableUser", UNAUTH, DENIED, UNAUTH, OK),
        ("EnableUser", UNAUTH, DENIED, UNAUTH, OK),
        ("SetSuperuser", UNAUTH, DENIED, UNAUTH, OK),
        ("SetUserRoles", UNAUTH, DENIED, UNAUTH, OK),
        ("GetUserRoles", UNAUTH, DENIED, UNAUTH, OK),
        ("ListRoles", UNAUTH, DENIED, UNAUTH, OK),
        ("CreateRole", UNAUTH, DENIED, UNAUTH, OK),
        ("DeleteRole", UNAUTH, DENIED, UNAUTH, OK),
        ("ListSessions", UNAUTH, OK, UNAUTH, OK),
        ("DeleteSession", UNAUTH, OK, UNAUTH, OK),
    ];
    let mut failures = Vec::new();
    for (rpc, none, user, old, superuser) in matrix {
        let cells = [
            ("no token", None, none),
            ("normal user", Some(normal.access_token.as_str()), user),
            (
                "disabled user's old token",
                Some(disabled.access_token.as_str()),
                old,
            ),
            ("superuser", Some(root.access_token.as_str()), superuser),
        ];
        for (who, token, expected) in cells {
            let got = call(&app, rpc, token, &fx, transport).await;
            if got != expected {
                failures.push(format!(
                    "{rpc} as {who}: expected {expected:?}, got {got:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    app.stop().await;
}

async fn list_users(
    app: &TestApp,
    token: &str,
    request: proto::ListUsersRequest,
) -> Result<proto::ListUsersResponse, Status> {
    app.admin
        .clone()
        .list_users(with_bearer(request, token))
        .await
        .map(tonic::Response::into_inner)
}

/// ListUsers' first page for `query`, which must succeed.
async fn search_users(app: &TestApp, token: &str, query: &str) -> proto::ListUsersResponse {
    list_users(
        app,
        token,
        proto::ListUsersRequest {
            query: query.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

async fn list_users_pages_through_every_user_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let mut expected = vec![root.user_id];
    for i in 0..7 {
        expected.push(app.register(&format!("user{i}")).await.id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list_users(
            &app,
            &root.access_token,
            proto::ListUsersRequest {
                page_size: 3,
                page_token: token.clone(),
                query: String::new(),
            },
        )
        .await
        .unwrap();
        pages += 1;
        assert_eq!(page.total_size, 8);
        if !page.next_page_token.is_empty() {
            assert_eq!(page.users.len(), 3, "every page but the last is full");
        }
        seen.extend(page.users.iter().map(|u| u.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, expected, "ordered by id, no duplicates, no gaps");
    app.stop().await;
}

async fn list_users_filters_by_substring_case_insensitively(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    for name in ["Anna", "hannah", "bob", "under_score", "underXscore"] {
        app.register(name).await;
    }
    let names = |page: &proto::ListUsersResponse| {
        page.users
            .iter()
            .map(|u| u.username.clone())
            .collect::<Vec<_>>()
    };
    let page = search_users(&app, &root.access_token, "ANN").await;
    assert_eq!(names(&page), ["Anna", "hannah"]);
    assert_eq!(page.total_size, 2);
    // Matches in the email too ("...@example.com").
    let page = search_users(&app, &root.access_token, "EXAMPLE").await;
    assert_eq!(page.total_size, 6);
    // `_` and `%` are literal characters, not wildcards.
    let page = search_users(&app, &root.access_token, "r_s").await;
    assert_eq!(names(&page), ["under_score"]);
    let page = search_users(&app, &root.access_token, "%").await;
    assert_eq!(page.total_size, 0);
    app.stop().await;
}

async fn list_users_refuses_foreign_or_malformed_page_tokens_and_negative_sizes(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let other_root = app.superuser("root2").await;
    for i in 0..3 {
        app.register(&format!("user{i}")).await;
    }
    let first = list_users(
        &app,
        &root.access_token,
        proto::ListUsersRequest {
            page_size: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let token = first.next_page_token;
    assert!(!token.is_empty());
    let cases = [
        (
            "another filter",
            &root,
            proto::ListUsersRequest {
                page_size: 1,
                page_token: token.clone(),
                query: "user".into(),
            },
        ),
        (
            "another caller",
            &other_root,
            proto::ListUsersRequest {
                page_size: 1,
                page_token: token.clone(),
                query: String::new(),
            },
        ),
        (
            "malformed",
            &root,
            proto::ListUsersRequest {
                page_size: 1,
                page_token: "garbage!".into(),
                query: String::new(),
            },
        ),
    ];
    for (case, caller, request) in cases {
        let status = assert_code(
            list_users(&app, &caller.access_token, request).await,
            Code::InvalidArgument,
        );
        assert_eq!(bad_request_fields(&status), ["page_token"], "{case}");
    }
    let status = assert_code(
        list_users(
            &app,
            &root.access_token,
            proto::ListUsersRequest {
                page_size: -1,
                ..Default::default()
            },
        )
        .await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_request_fields(&status), ["page_size"]);
    let all = list_users(
        &app,
        &root.access_token,
        proto::ListUsersRequest {
            page_size: 5000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        all.users.len(),
        5,
        "a huge page size is clamped, not refused"
    );
    app.stop().await;
}

async fn get_user_returns_the_user_with_roles_or_not_found(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let ann = app.register("ann").await;
    let mut admin = app.admin.clone();
    let role = admin
        .create_role(with_bearer(
            proto::CreateRoleRequest {
                name: "editor".into(),
                description: Some("edits".into()),
            },
            &root.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .role
        .unwrap();
    admin
        .set_user_roles(with_bearer(
            proto::SetUserRolesRequest {
                user_id: ann.id,
                role_ids: vec![role.id],
            },
            &root.access_token,
        ))
        .await
        .unwrap();
    let user = admin
        .get_user(with_bearer(
            proto::GetUserRequest { user_id: ann.id },
            &root.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.username, "ann");
    assert_eq!(user.roles, ["editor"]);
    let missing = assert_code(
        admin
            .get_user(with_bearer(
                proto::GetUserRequest { user_id: 999_999 },
                &root.access_token,
            ))
            .await,
        Code::NotFound,
    );
    let zero = assert_code(
        admin
            .get_user(with_bearer(
                proto::GetUserRequest { user_id: 0 },
                &root.access_token,
            ))
            .await,
        Code::NotFound,
    );
    assert_eq!(missing.message(), zero.message());
    app.stop().await;
}

async fn create_user_validates_like_register_and_can_create_superusers(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let mut admin = app.admin.clone();
    let status = assert_code(
        admin
            .create_user(with_bearer(
                proto::CreateUserRequest {
                    username: "x".into(),
                    email: "bad".into(),
                    password: "short".into(),
                    full_name: None,
                    is_superuser: false,
                },
                &root.access_token,
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(
        bad_request_fields(&status),
        ["username", "email", "password"]
    );
    let created = admin
        .create_user(with_bearer(
            proto::CreateUserRequest {
                username: "deputy".into(),
                email: "deputy@example.com".into(),
                password: PASSWORD.into(),
                full_name: None,
                is_superuser: true,
            },
            &root.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(created.is_superuser);
    assert!(created.roles.is_empty());
    assert_code(
        admin
            .create_user(with_bearer(
                proto::CreateUserRequest {
                    username: "DEPUTY".into(),
                    email: "d2@example.com".into(),
                    password: PASSWORD.into(),
                    full_name: None,
                    is_superuser: false,
                },
                &root.access_token,
            ))
            .await,
        Code::AlreadyExists,
    );
    let deputy = app.login("deputy", PASSWORD).await.unwrap();
    assert!(
        list_users(
            &app,
            &deputy.access_token,
            proto::ListUsersRequest::default()
        )
        .await
        .is_ok()
    );
    app.stop().await;
}

async fn superusers_cannot_disable_delete_or_demote_themselves(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let mut admin = app.admin.clone();
    let id = root.user_id;
    let token = root.access_token.as_str();
    assert_code(
        admin
            .disable_user(with_bearer(
                proto::DisableUserRequest { user_id: id },
                token,
            ))
            .await,
        Code::FailedPrecondition,
    );
    assert_code(
        admin
            .delete_user(with_bearer(proto::DeleteUserRequest { user_id: id }, token))
            .await,
        Code::FailedPrecondition,
    );
    assert_code(
        admin
            .set_superuser(with_bearer(
                proto::SetSuperuserRequest {
                    user_id: id,
                    is_superuser: false,
                },
                token,
            ))
            .await,
        Code::FailedPrecondition,
    );
    // Re-affirming one's own rights is harmless.
    let me = admin
        .set_superuser(with_bearer(
            proto::SetSuperuserRequest {
                user_id: id,
                is_superuser: true,
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(me.is_superuser && me.is_active);
    app.stop().await;
}

async fn disabling_revokes_every_session_and_enabling_revives_none(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let ben = app.register_and_login("ben").await;
    let second = app.login("ben", PASSWORD).await.unwrap();
    let mut admin = app.admin.clone();
    let user = admin
        .disable_user(with_bearer(
            proto::DisableUserRequest {
                user_id: ben.user_id,
            },
            &root.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(!user.is_active);
    assert_code(app.get_me(&ben.access_token).await, Code::Unauthenticated);
    app.assert_session_ended(&second.access_token, &second.refresh_token)
        .await;
    assert_code(app.login("ben", PASSWORD).await, Code::PermissionDenied);

    let user = admin
        .enable_user(with_bearer(
            proto::EnableUserRequest {
                user_id: ben.user_id,
            },
            &root.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(user.is_active);
    app.assert_session_ended(&ben.access_token, &ben.refresh_token)
        .await;
    let again = app.login("ben", PASSWORD).await.unwrap();
    assert!(app.get_me(&again.access_token).await.is_ok());
    assert_code(
        admin
            .disable_user(with_bearer(
                proto::DisableUserRequest { user_id: 424_242 },
                &root.access_token,
            ))
            .await,
        Code::NotFound,
    );
    app.stop().await;
}

async fn promotion_and_demotion_apply_to_the_same_token_on_the_next_call(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let cleo = app.register_and_login("cleo").await;
    let mut admin = app.admin.clone();
    assert_code(
        list_users(&app, &cleo.access_token, proto::ListUsersRequest::default()).await,
        Code::PermissionDenied,
    );
    admin
        .set_superuser(with_bearer(
            proto::SetSuperuserRequest {
                user_id: cleo.user_id,
                is_superuser: true,
            },
            &root.access_token,
        ))
        .await
        .unwrap();
    assert!(
        list_users(&app, &cleo.access_token, proto::ListUsersRequest::default())
            .await
            .is_ok(),
        "promotion works with the same token"
    );
    let validated = app
        .auth
        .clone()
        .validate_token(proto::ValidateTokenRequest {
            token: cleo.access_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(validated.is_superuser);
    // Idempotent: setting it twice changes nothing.
    admin
        .set_superuser(with_bearer(
            proto::SetSuperuserRequest {
                user_id: cleo.user_id,
                is_superuser: true,
            },
            &root.access_token,
        ))
        .await
        .unwrap();
    admin
        .set_superuser(with_bearer(
            proto::SetSuperuserRequest {
                user_id: cleo.user_id,
                is_superuser: false,
            },
            &root.access_token,
        ))
        .await
        .unwrap();
    assert_code(
        list_users(&app, &cleo.access_token, proto::ListUsersRequest::default()).await,
        Code::PermissionDenied,
    );
    app.stop().await;
}

async fn create_roles(app: &TestApp, token: &str, names: &[&str]) -> Vec<proto::Role> {
    let mut roles = Vec::new();
    for name in names {
        roles.push(
            app.admin
                .clone()
                .create_role(with_bearer(
                    proto::CreateRoleRequest {
                        name: (*name).into(),
                        description: None,
                    },
                    token,
                ))
                .await
                .unwrap()
                .into_inner()
                .role
                .unwrap(),
        );
    }
    roles
}

async fn set_user_roles_replaces_the_whole_set_or_changes_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let dora = app.register_and_login("dora").await;
    let roles = create_roles(&app, &root.access_token, &["reader", "writer", "admin"]).await;
    let mut admin = app.admin.clone();
    let token = root.access_token.as_str();
    let set = |role_ids: Vec<i64>| proto::SetUserRolesRequest {
        user_id: dora.user_id,
        role_ids,
    };
    let given = admin
        .set_user_roles(with_bearer(
            set(vec![roles[0].id, roles[1].id, roles[1].id]),
            token,
        ))
        .await
        .unwrap()
        .into_inner()
        .roles;
    assert_eq!(
        given.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["reader", "writer"]
    );
    // An unknown role id fails the whole call and changes nothing.
    assert_code(
        admin
            .set_user_roles(with_bearer(set(vec![roles[2].id, 987_654]), token))
            .await,
        Code::NotFound,
    );
    let current = admin
        .get_user_roles(with_bearer(
            proto::GetUserRolesRequest {
                user_id: dora.user_id,
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
        .roles;
    assert_eq!(
        current.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["reader", "writer"]
    );
    // Replacement, not addition.
    admin
        .set_user_roles(with_bearer(set(vec![roles[2].id]), token))
        .await
        .unwrap();
    assert_eq!(
        app.get_me(&dora.access_token).await.unwrap().roles,
        ["admin"]
    );
    let validated = app
        .auth
        .clone()
        .validate_token(proto::ValidateTokenRequest {
            token: dora.access_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(validated.roles, ["admin"]);
    let page = list_users(
        &app,
        token,
        proto::ListUsersRequest {
            query: "dora".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(page.users[0].roles, ["admin"]);
    admin
        .set_user_roles(with_bearer(set(vec![]), token))
        .await
        .unwrap();
    assert!(
        app.get_me(&dora.access_token)
            .await
            .unwrap()
            .roles
            .is_empty()
    );
    assert_code(
        admin
            .set_user_roles(with_bearer(
                proto::SetUserRolesRequest {
                    user_id: 999_999,
                    role_ids: vec![],
                },
                token,
            ))
            .await,
        Code::NotFound,
    );
    app.stop().await;
}

async fn roles_are_unique_and_deleting_one_removes_it_from_users(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let eve = app.register_and_login("eve").await;
    let token = root.access_token.as_str();
    let roles = create_roles(&app, token, &["ops"]).await;
    let mut admin = app.admin.clone();
    assert_code(
        admin
            .create_role(with_bearer(
                proto::CreateRoleRequest {
                    name: "ops".into(),
                    description: None,
                },
                token,
            ))
            .await,
        Code::AlreadyExists,
    );
    let status = assert_code(
        admin
            .create_role(with_bearer(
                proto::CreateRoleRequest {
                    name: " ".into(),
                    description: None,
                },
                token,
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_request_fields(&status), ["name"]);
    admin
        .set_user_roles(with_bearer(
            proto::SetUserRolesRequest {
                user_id: eve.user_id,
                role_ids: vec![roles[0].id],
            },
            token,
        ))
        .await
        .unwrap();
    // Seen (and cached) with the role before it is deleted...
    assert_eq!(app.get_me(&eve.access_token).await.unwrap().roles, ["ops"]);
    admin
        .delete_role(with_bearer(
            proto::DeleteRoleRequest {
                role_id: roles[0].id,
            },
            token,
        ))
        .await
        .unwrap();
    assert!(
        app.get_me(&eve.access_token)
            .await
            .unwrap()
            .roles
            .is_empty()
    );
    let listed = admin
        .list_roles(with_bearer(proto::ListRolesRequest {}, token))
        .await
        .unwrap()
        .into_inner()
        .roles;
    assert!(listed.is_empty());
    assert_code(
        admin
            .delete_role(with_bearer(
                proto::DeleteRoleRequest {
                    role_id: roles[0].id,
                },
                token,
            ))
            .await,
        Code::NotFound,
    );
    app.stop().await;
}

async fn delete_user_leaves_no_rows_behind_and_frees_the_names(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let finn: LoggedIn = app.register_and_login("finn").await;
    app.refresh(&finn.refresh_token).await.unwrap();
    let roles = create_roles(&app, &root.access_token, &["member"]).await;
    let mut admin = app.admin.clone();
    admin
        .set_user_roles(with_bearer(
            proto::SetUserRolesRequest {
                user_id: finn.user_id,
                role_ids: vec![roles[0].id],
            },
            &root.access_token,
        ))
        .await
        .unwrap();

    admin
        .delete_user(with_bearer(
            proto::DeleteUserRequest {
                user_id: finn.user_id,
            },
            &root.access_token,
        ))
        .await
        .unwrap();
    for table in [
        "SELECT COUNT(*) FROM users WHERE id = $1",
        "SELECT COUNT(*) FROM sessions WHERE user_id = $1",
        "SELECT COUNT(*) FROM refresh_tokens WHERE user_id = $1",
        "SELECT COUNT(*) FROM user_roles WHERE user_id = $1",
        "SELECT COUNT(*) FROM messages WHERE sender_id = $1 OR recipient_id = $1",
    ] {
        assert_eq!(app.count(table, finn.user_id).await, 0, "{table}");
    }
    assert_code(app.get_me(&finn.access_token).await, Code::Unauthenticated);
    assert_code(
        admin
            .delete_user(with_bearer(
                proto::DeleteUserRequest {
                    user_id: finn.user_id,
                },
                &root.access_token,
            ))
            .await,
        Code::NotFound,
    );
    let again = app.register("finn").await;
    assert_ne!(again.id, finn.user_id, "ids are never reused");
    app.stop().await;
}

async fn create_superuser_from_the_command_line_gives_a_working_admin(backend: Backend) {
    let app = spawn_app(backend).await;
    let run = |username: &str, email: &str, password: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ai-message"))
            .args(["create-superuser", "--username", username, "--email", email])
            .env("DATABASE_URL", &app.database_url)
            .env(
                "AI_MESSAGE_SECRET_KEY",
                String::from_utf8_lossy(crate::helpers::TEST_SECRET).as_ref(),
            )
            .env("AI_MESSAGE_BCRYPT_COST", "4")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{password}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let output = run("chief", "chief@example.com", "the chief's passphrase");
    assert!(output.status.success(), "{output:?}");
    let weak = run("weak", "weak@example.com", "short");
    assert!(!weak.status.success());
    assert!(String::from_utf8_lossy(&weak.stderr).contains("password"));
    let taken = run("CHIEF", "other@example.com", "the chief's passphrase");
    assert!(!taken.status.success());
    assert!(String::from_utf8_lossy(&taken.stderr).contains("username"));

    let chief = app.login("chief", "the chief's passphrase").await.unwrap();
    let page = list_users(
        &app,
        &chief.access_token,
        proto::ListUsersRequest::default(),
    )
    .await
    .unwrap();
    assert_eq!(page.users.len(), 1);
    assert!(page.users[0].is_superuser);
    assert!(page.users[0].roles.is_empty());
    app.stop().await;
}
