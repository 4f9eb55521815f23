//! Machine-readable failures: every reason of the contract's ErrorInfo table
//! produced the way a client meets it, with its `google.rpc.ErrorInfo`
//! (domain `ai-message`, no metadata) and, for throttling and overload, its
//! `google.rpc.RetryInfo`.

use std::{sync::Arc, time::Duration};

use ai_message::proto;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt as _;

use crate::helpers::{
    Backend, PASSWORD, TestApp, assert_code, spawn_app, spawn_app_on_clock, spawn_app_with,
    with_bearer,
};

backend_tests!(
    every_token_and_session_failure_names_its_reason,
    login_and_refresh_failures_name_their_reasons,
    permission_failures_name_their_reasons,
    throttled_logins_say_which_limit_and_when_to_retry,
    overload_and_oversized_requests_name_their_reasons,
    precondition_failures_name_their_reasons,
);

/// Asserts `status` has `code` and an ErrorInfo with `reason`, domain
/// `ai-message` and no metadata; returns the status.
#[track_caller]
pub fn assert_reason<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    reason: &str,
) -> Status {
    let status = assert_code(result, code);
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("{reason}: no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, "ai-message");
    assert!(
        info.metadata.is_empty(),
        "metadata reveals {:?}",
        info.metadata
    );
    status
}

fn retry_delay(status: &Status) -> Duration {
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .unwrap_or_else(|| panic!("no RetryInfo in {status:?}"))
}

async fn every_token_and_session_failure_names_its_reason(backend: Backend) {
    let real_now = ai_message::domain::Clock::now(&ai_message::domain::SystemClock);
    let clock = Arc::new(ai_message::domain::ManualClock::starting_at(real_now));
    let app = spawn_app_on_clock(backend, |_| {}, clock.clone()).await;
    let ivy = app.register_and_login("ivy").await;

    let missing = app
        .auth
        .clone()
        .get_me(Request::new(proto::GetMeRequest {}))
        .await;
    assert_reason(missing, Code::Unauthenticated, "TOKEN_MISSING");
    assert_reason(
        app.get_me("not.a.token").await,
        Code::Unauthenticated,
        "TOKEN_INVALID",
    );
    let mut doubled = with_bearer(proto::GetMeRequest {}, &ivy.access_token);
    doubled.metadata_mut().append(
        "authorization",
        format!("Bearer {}", ivy.access_token).parse().unwrap(),
    );
    assert_reason(
        app.auth.clone().get_me(doubled).await,
        Code::Unauthenticated,
        "TOKEN_INVALID",
    );
    // The public AuthService RPCs read the bearer in the handler: same reasons.
    let logout = app
        .auth
        .clone()
        .logout(with_bearer(proto::LogoutRequest {}, "forged"))
        .await;
    assert_reason(logout, Code::Unauthenticated, "TOKEN_INVALID");

    let second = app.login("ivy", PASSWORD).await.unwrap();
    app.auth
        .clone()
        .logout(with_bearer(proto::LogoutRequest {}, &second.access_token))
        .await
        .unwrap();
    assert_reason(
        app.get_me(&second.access_token).await,
        Code::Unauthenticated,
        "SESSION_REVOKED",
    );
    let stream = app
        .messages
        .clone()
        .stream_messages(with_bearer(
            proto::StreamMessagesRequest::default(),
            &second.access_token,
        ))
        .await;
    assert_reason(stream, Code::Unauthenticated, "SESSION_REVOKED");

    clock.advance(Duration::from_secs(30 * 60));
    assert_reason(
        app.get_me(&ivy.access_token).await,
        Code::Unauthenticated,
        "TOKEN_EXPIRED",
    );
    app.stop().await;
}

async fn login_and_refresh_failures_name_their_reasons(backend: Backend) {
    let app = spawn_app(backend).await;
    let ivy = app.register_and_login("ivy").await;
    // Unknown user and wrong password: one reason, the same details.
    let unknown = assert_reason(
        app.login("nobody", PASSWORD).await,
        Code::Unauthenticated,
        "LOGIN_FAILED",
    );
    let wrong = assert_reason(
        app.login("ivy", "not the password").await,
        Code::Unauthenticated,
        "LOGIN_FAILED",
    );
    assert_eq!(
        (unknown.message(), unknown.details()),
        (wrong.message(), wrong.details())
    );
    assert_reason(
        app.refresh("garbage").await,
        Code::Unauthenticated,
        "REFRESH_TOKEN_INVALID",
    );
    assert_reason(
        app.refresh("").await,
        Code::Unauthenticated,
        "REFRESH_TOKEN_INVALID",
    );
    app.refresh(&ivy.refresh_token).await.unwrap();
    assert_reason(
        app.refresh(&ivy.refresh_token).await,
        Code::Unauthenticated,
        "REFRESH_TOKEN_REUSED",
    );
    app.stop().await;
}

async fn permission_failures_name_their_reasons(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let listed = app
        .admin
        .clone()
        .list_users(with_bearer(
            proto::ListUsersRequest::default(),
            &ann.access_token,
        ))
        .await;
    assert_reason(listed, Code::PermissionDenied, "SUPERUSER_REQUIRED");
    let watched = app
        .auth
        .clone()
        .watch_revocations(with_bearer(
            proto::WatchRevocationsRequest::default(),
            &ann.access_token,
        ))
        .await;
    assert_reason(watched, Code::PermissionDenied, "ROLE_REQUIRED");
    let sent = app.send_text(&ann, bob.user_id, "hi").await.unwrap();
    let deleted = app
        .messages
        .clone()
        .delete_message(with_bearer(
            proto::DeleteMessageRequest {
                message_id: sent.id,
            },
            &bob.access_token,
        ))
        .await;
    assert_reason(deleted, Code::PermissionDenied, "NOT_MESSAGE_SENDER");
    app.admin
        .clone()
        .disable_user(with_bearer(
            proto::DisableUserRequest {
                user_id: bob.user_id,
            },
            &root.access_token,
        ))
        .await
        .unwrap();
    assert_reason(
        app.login("bob", PASSWORD).await,
        Code::PermissionDenied,
        "ACCOUNT_DISABLED",
    );
    app.stop().await;
}

async fn throttled_logins_say_which_limit_and_when_to_retry(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.login_account_failures = 2;
        c.login_address_failures = 4;
    })
    .await;
    app.register("ivy").await;
    for _ in 0..2 {
        assert_code(app.login("ivy", "wrong").await, Code::Unauthenticated);
    }
    let account = assert_reason(
        app.login("ivy", PASSWORD).await,
        Code::ResourceExhausted,
        "ACCOUNT_THROTTLED",
    );
    // The account's first delay is 15 s.
    let delay = retry_delay(&account);
    assert!(
        delay > Duration::from_secs(13) && delay <= Duration::from_secs(15),
        "{delay:?}"
    );
    // Two more failures from the address, on other names, fill its window.
    for name in ["x1", "x2"] {
        assert_code(app.login(name, "wrong").await, Code::Unauthenticated);
    }
    let address = assert_reason(
        app.login("x3", "wrong").await,
        Code::ResourceExhausted,
        "ADDRESS_THROTTLED",
    );
    let delay = retry_delay(&address);
    assert!(
        delay > Duration::from_secs(9 * 60) && delay <= Duration::from_secs(10 * 60),
        "until the 10-minute window ends: {delay:?}"
    );
    // Register from the throttled address says the same.
    let registered = app
        .auth
        .clone()
        .register(proto::RegisterRequest {
            username: "newcomer".into(),
            email: "newcomer@example.com".into(),
            password: PASSWORD.into(),
            full_name: None,
        })
        .await;
    retry_delay(&assert_reason(
        registered,
        Code::ResourceExhausted,
        "ADDRESS_THROTTLED",
    ));
    app.stop().await;
}

async fn overload_and_oversized_requests_name_their_reasons(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.bcrypt_cost = 10;
        c.max_pending_hashes = 1;
        // Shed attempts count as failures; keep the throttle out of the way.
        c.login_account_failures = 1000;
        c.login_address_failures = 1000;
    })
    .await;
    app.register("kim").await;
    let mut shed = None;
    for login in app.spawn_logins("kim", 40) {
        if let Err(status) = login.await.unwrap() {
            shed = Some(status);
        }
    }
    let shed = assert_reason(
        Err::<(), _>(shed.expect("some of 40 parallel logins are shed")),
        Code::ResourceExhausted,
        "SERVER_OVERLOADED",
    );
    assert_eq!(retry_delay(&shed), Duration::from_secs(1));

    // A request over 4 MiB, over gRPC.
    let body = crate::platform::oversized_register();
    assert_reason(
        crate::platform::call_raw(&app, "/aimessage.v1.AuthService/Register", body).await,
        Code::ResourceExhausted,
        "REQUEST_TOO_LARGE",
    );
    app.stop().await;
}

async fn precondition_failures_name_their_reasons(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let ann = app.register_and_login("ann").await;
    let disabled = app.register("gone").await;
    let mut admin = app.admin.clone();
    let own = admin
        .disable_user(with_bearer(
            proto::DisableUserRequest {
                user_id: root.user_id,
            },
            &root.access_token,
        ))
        .await;
    assert_reason(own, Code::FailedPrecondition, "CANNOT_MODIFY_SELF");
    admin
        .disable_user(with_bearer(
            proto::DisableUserRequest {
                user_id: disabled.id,
            },
            &root.access_token,
        ))
        .await
        .unwrap();
    assert_reason(
        app.send_text(&ann, disabled.id, "hello?").await,
        Code::FailedPrecondition,
        "RECIPIENT_DISABLED",
    );
    let never_issued = watch(&app, &root.access_token, "AAAAAAAAJxA").await;
    assert_reason(never_issued, Code::FailedPrecondition, "CURSOR_EXPIRED");
    app.stop().await;
}

/// Opens WatchRevocations after `cursor`.
pub async fn watch(
    app: &TestApp,
    token: &str,
    cursor: &str,
) -> Result<tonic::Streaming<proto::WatchRevocationsResponse>, Status> {
    app.auth
        .clone()
        .watch_revocations(with_bearer(
            proto::WatchRevocationsRequest {
                after_cursor: cursor.to_owned(),
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}
