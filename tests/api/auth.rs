//! AuthService, rule by rule, including what an attacker would try.

use std::time::Duration;

use ai_message::{auth::TokenService, domain::Timestamp, proto};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use tonic::{Code, Request};

use crate::helpers::{
    Backend, PASSWORD, TEST_SECRET, assert_code, bad_request_fields, sign, sign_with, spawn_app,
    with_bearer,
};

backend_tests!(
    register_returns_the_new_user_without_roles,
    register_names_every_bad_field,
    register_refuses_taken_usernames_and_emails_in_any_case,
    register_refuses_passwords_longer_than_71_bytes,
    register_refuses_common_passwords_and_the_username_as_password,
    nul_characters_are_invalid_arguments,
    login_accepts_username_or_email_in_any_case,
    login_failures_for_unknown_users_and_wrong_passwords_are_identical,
    login_with_empty_fields_is_unauthenticated,
    login_by_a_disabled_user_is_permission_denied,
    login_records_device_info_and_peer_address,
    login_reports_lifetimes_in_whole_seconds,
    get_me_requires_a_valid_bearer_token,
    bearer_scheme_is_case_insensitive,
    forged_and_misused_tokens_are_unauthenticated,
    expired_access_tokens_are_unauthenticated,
    a_token_naming_another_users_session_is_unauthenticated,
    refresh_rotates_and_the_old_token_is_spent,
    replaying_a_spent_refresh_token_revokes_the_session,
    twenty_concurrent_refreshes_give_exactly_one_success,
    refresh_never_extends_the_session_lifetime,
    garbage_refresh_tokens_are_unauthenticated,
    logout_revokes_access_and_refresh_tokens_at_once,
    logout_all_revokes_every_session_and_counts_them,
    change_password_checks_the_current_password,
    change_password_revokes_other_sessions_but_keeps_the_caller,
    update_me_changes_only_the_given_fields,
    update_me_validates_and_refuses_a_taken_email,
    validate_token_reports_live_tokens_and_only_active_false_otherwise,
);

async fn register_returns_the_new_user_without_roles(backend: Backend) {
    let app = spawn_app(backend).await;
    let response = app
        .auth
        .clone()
        .register(proto::RegisterRequest {
            username: "Alice".into(),
            email: "Alice@Example.COM".into(),
            password: PASSWORD.into(),
            full_name: Some("Alice Liddell".into()),
        })
        .await
        .unwrap()
        .into_inner();
    let user = response.user.unwrap();
    assert!(user.id > 0);
    assert_eq!(user.username, "Alice");
    assert_eq!(
        user.email, "alice@example.com",
        "email is stored lower-cased"
    );
    assert_eq!(user.full_name.as_deref(), Some("Alice Liddell"));
    assert!(user.is_active);
    assert!(!user.is_superuser);
    assert!(user.roles.is_empty());
    assert!(user.created_at.is_some() && user.updated_at.is_some());
    app.stop().await;
}

async fn register_names_every_bad_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let status = assert_code(
        app.auth
            .clone()
            .register(proto::RegisterRequest {
                username: "a b".into(),
                email: "not-an-email".into(),
                password: "short".into(),
                full_name: Some("x".repeat(256)),
            })
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(
        bad_request_fields(&status),
        ["username", "email", "password", "full_name"]
    );
    assert!(status.message().contains("username"));
    app.stop().await;
}

async fn register_refuses_taken_usernames_and_emails_in_any_case(backend: Backend) {
    let app = spawn_app(backend).await;
    app.register("bob").await;
    let mut auth = app.auth.clone();
    let same_name = auth
        .register(proto::RegisterRequest {
            username: "BOB".into(),
            email: "other@example.com".into(),
            password: PASSWORD.into(),
            full_name: None,
        })
        .await;
    let status = assert_code(same_name, Code::AlreadyExists);
    assert!(status.message().contains("username"), "{status:?}");
    let same_email = auth
        .register(proto::RegisterRequest {
            username: "robert".into(),
            email: "BOB@example.com".into(),
            password: PASSWORD.into(),
            full_name: None,
        })
        .await;
    let status = assert_code(same_email, Code::AlreadyExists);
    assert!(status.message().contains("email"), "{status:?}");
    app.stop().await;
}

async fn register_refuses_passwords_longer_than_71_bytes(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut auth = app.auth.clone();
    let register = |username: &str, password: String| proto::RegisterRequest {
        username: username.into(),
        email: format!("{username}@example.com"),
        password,
        full_name: None,
    };
    let status = assert_code(
        auth.register(register("long", "Zq7".repeat(24))).await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_request_fields(&status), ["password"]);
    assert!(status.message().contains("71 bytes"));
    // Exactly 71 bytes is accepted, and the whole of it counts at login.
    let seventy_one = "Zq7".repeat(23) + "xy";
    auth.register(register("exact", seventy_one.clone()))
        .await
        .unwrap();
    assert!(app.login("exact", &seventy_one).await.is_ok());
    let mut altered = seventy_one.clone();
    altered.replace_range(70..71, "Y");
    assert_code(app.login("exact", &altered).await, Code::Unauthenticated);
    assert_code(
        app.login("exact", &(seventy_one + "!")).await,
        Code::Unauthenticated,
    );
    app.stop().await;
}

async fn register_refuses_common_passwords_and_the_username_as_password(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut auth = app.auth.clone();
    for (username, password) in [("carol", "password123"), ("dave.long", "DAVE.LONG")] {
        let status = assert_code(
            auth.register(proto::RegisterRequest {
                username: username.into(),
                email: format!("{username}@example.com"),
                password: password.into(),
                full_name: None,
            })
            .await,
            Code::InvalidArgument,
        );
        assert_eq!(bad_request_fields(&status), ["password"], "{password}");
    }
    app.stop().await;
}

async fn nul_characters_are_invalid_arguments(backend: Backend) {
    let app = spawn_app(backend).await;
    let status = assert_code(
        app.auth
            .clone()
            .register(proto::RegisterRequest {
                username: "nul".into(),
                email: "nul@example.com".into(),
                password: "good password\0".into(),
                full_name: Some("a\0b".into()),
            })
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_request_fields(&status), ["password", "full_name"]);
    let status = assert_code(app.login("nul\0", PASSWORD).await, Code::InvalidArgument);
    assert_eq!(bad_request_fields(&status), ["username"]);
    // Token fields follow their RPC's token rules instead.
    assert_code(app.refresh("abc\0").await, Code::Unauthenticated);
    let validated = app
        .auth
        .clone()
        .validate_token(proto::ValidateTokenRequest {
            token: "a\0b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!validated.active);
    app.stop().await;
}

async fn login_accepts_username_or_email_in_any_case(backend: Backend) {
    let app = spawn_app(backend).await;
    app.register("erin").await;
    for login in ["erin", "ERIN", "erin@example.com", "Erin@Example.Com"] {
        let response = app.login(login, PASSWORD).await.unwrap();
        assert_eq!(response.token_type, "bearer", "{login}");
        assert!(!response.access_token.is_empty() && !response.refresh_token.is_empty());
        assert!(response.session_id > 0);
    }
    app.stop().await;
}

async fn login_failures_for_unknown_users_and_wrong_passwords_are_identical(backend: Backend) {
    let app = spawn_app(backend).await;
    app.register("frank").await;
    let unknown = assert_code(app.login("nobody", PASSWORD).await, Code::Unauthenticated);
    let wrong = assert_code(
        app.login("frank", "wrong password!").await,
        Code::Unauthenticated,
    );
    assert_eq!(unknown.message(), wrong.message());
    assert_eq!(unknown.details(), wrong.details());
    app.stop().await;
}

async fn login_with_empty_fields_is_unauthenticated(backend: Backend) {
    let app = spawn_app(backend).await;
    app.register("grace").await;
    assert_code(app.login("", "").await, Code::Unauthenticated);
    assert_code(app.login("grace", "").await, Code::Unauthenticated);
    assert_code(app.login("", PASSWORD).await, Code::Unauthenticated);
    app.stop().await;
}

async fn login_by_a_disabled_user_is_permission_denied(backend: Backend) {
    let app = spawn_app(backend).await;
    let heidi = app.register_and_login("heidi").await;
    app.state
        .db
        .set_user_active(heidi.user_id, false, app.state.clock.now().micros())
        .await
        .unwrap();
    assert_code(app.login("heidi", PASSWORD).await, Code::PermissionDenied);
    // A wrong password still says nothing about the account's state.
    assert_code(
        app.login("heidi", "wrong password!").await,
        Code::Unauthenticated,
    );
    // Disabling revoked the session the user already had.
    assert_code(app.get_me(&heidi.access_token).await, Code::Unauthenticated);
    app.stop().await;
}

async fn login_records_device_info_and_peer_address(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app.register("ivan").await;
    let mut auth = app.auth.clone();
    auth.login(proto::LoginRequest {
        username: "ivan".into(),
        password: PASSWORD.into(),
        device_info: Some("Ivan's phone".into()),
    })
    .await
    .unwrap();
    let mut request = Request::new(proto::LoginRequest {
        username: "ivan".into(),
        password: PASSWORD.into(),
        device_info: None,
    });
    request
        .metadata_mut()
        .insert("user-agent", "curl-ish/1.0".parse().unwrap());
    // An untrusted peer cannot choose its recorded address.
    request
        .metadata_mut()
        .insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    auth.login(request).await.unwrap();
    let sessions = app
        .state
        .db
        .list_live_sessions(user.id, app.state.clock.now().micros())
        .await
        .unwrap();
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions[1].device_info.as_deref(), Some("Ivan's phone"));
    let agent = sessions[0].device_info.as_deref().unwrap();
    assert!(agent.starts_with("curl-ish/1.0"), "{agent}");
    for session in &sessions {
        assert_eq!(session.ip_address.as_deref(), Some("127.0.0.1"));
    }
    app.stop().await;
}

async fn login_reports_lifetimes_in_whole_seconds(backend: Backend) {
    let app = spawn_app(backend).await;
    app.register("judy").await;
    let response = app.login("judy", PASSWORD).await.unwrap();
    assert!(
        (1798..=1800).contains(&response.expires_in),
        "{}",
        response.expires_in
    );
    let week = 7 * 86_400;
    assert!((week - 2..=week).contains(&response.refresh_expires_in));
    app.stop().await;
}

async fn get_me_requires_a_valid_bearer_token(backend: Backend) {
    let app = spawn_app(backend).await;
    let kim = app.register_and_login("kim").await;
    let me = app.get_me(&kim.access_token).await.unwrap();
    assert_eq!(me.id, kim.user_id);
    assert_eq!(me.username, "kim");
    let missing = assert_code(
        app.auth.clone().get_me(proto::GetMeRequest {}).await,
        Code::Unauthenticated,
    );
    assert!(missing.message().contains("missing"));
    assert_code(app.get_me("not.a.jwt").await, Code::Unauthenticated);
    app.stop().await;
}

async fn bearer_scheme_is_case_insensitive(backend: Backend) {
    let app = spawn_app(backend).await;
    let lee = app.register_and_login("lee").await;
    for scheme in ["bearer", "BEARER", "bEaReR"] {
        let mut request = Request::new(proto::GetMeRequest {});
        request.metadata_mut().insert(
            "authorization",
            format!("{scheme} {}", lee.access_token).parse().unwrap(),
        );
        assert!(app.auth.clone().get_me(request).await.is_ok(), "{scheme}");
    }
    let mut basic = Request::new(proto::GetMeRequest {});
    basic.metadata_mut().insert(
        "authorization",
        format!("Basic {}", lee.access_token).parse().unwrap(),
    );
    assert_code(app.auth.clone().get_me(basic).await, Code::Unauthenticated);
    app.stop().await;
}

async fn forged_and_misused_tokens_are_unauthenticated(backend: Backend) {
    let app = spawn_app(backend).await;
    let mia = app.register_and_login("mia").await;
    let now = app.state.clock.now().seconds();
    let claims = |iss: &str, aud: &str| {
        format!(
            r#"{{"sub":"{}","sid":"{}","iat":{now},"exp":{},"iss":"{iss}","aud":"{aud}","jti":"j"}}"#,
            mia.user_id,
            mia.session_id,
            now + 600
        )
    };
    let at_header = r#"{"alg":"HS256","typ":"at+jwt"}"#;
    // The hand-made token is accepted when everything is right...
    let genuine = sign(at_header, &claims("localhost", "ai-message"), TEST_SECRET);
    assert!(app.get_me(&genuine).await.is_ok());
    // ...and refused when any one thing is off.
    let alg_none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"at+jwt"}"#),
        URL_SAFE_NO_PAD.encode(claims("localhost", "ai-message"))
    );
    let attacks = [
        ("alg none", alg_none),
        (
            "wrong key",
            sign(
                at_header,
                &claims("localhost", "ai-message"),
                b"an-attacker-guessed-this-key-0000",
            ),
        ),
        (
            "typ JWT",
            sign(
                r#"{"alg":"HS256","typ":"JWT"}"#,
                &claims("localhost", "ai-message"),
                TEST_SECRET,
            ),
        ),
        (
            "no typ",
            sign(
                r#"{"alg":"HS256"}"#,
                &claims("localhost", "ai-message"),
                TEST_SECRET,
            ),
        ),
        (
            "HS512",
            sign_with(
                jsonwebtoken::Algorithm::HS512,
                r#"{"alg":"HS512","typ":"at+jwt"}"#,
                &claims("localhost", "ai-message"),
                TEST_SECRET,
            ),
        ),
        (
            "wrong issuer",
            sign(
                at_header,
                &claims("evil.example", "ai-message"),
                TEST_SECRET,
            ),
        ),
        (
            "wrong audience",
            sign(
                at_header,
                &claims("localhost", "other-service"),
                TEST_SECRET,
            ),
        ),
        ("refresh token as access token", mia.refresh_token.clone()),
        ("tampered payload", {
            let mut parts: Vec<String> = mia.access_token.split('.').map(str::to_owned).collect();
            let forged_claims = claims("localhost", "ai-message")
                .replace(&format!(r#""sub":"{}""#, mia.user_id), r#""sub":"1""#);
            parts[1] = URL_SAFE_NO_PAD.encode(forged_claims);
            parts.join(".")
        }),
    ];
    for (attack, token) in attacks {
        assert_code(app.get_me(&token).await, Code::Unauthenticated);
        assert!(!app.validate(&token, &[]).await.active, "{attack}");
    }
    // An access token is not a refresh token either.
    assert_code(app.refresh(&mia.access_token).await, Code::Unauthenticated);
    app.stop().await;
}

async fn expired_access_tokens_are_unauthenticated(backend: Backend) {
    let app = spawn_app(backend).await;
    let nick = app.register_and_login("nick").await;
    let tokens = TokenService::new(TEST_SECRET, "localhost", Duration::from_secs(60));
    let issued = app.state.clock.now().plus(Duration::ZERO);
    let an_hour_ago = Timestamp::from_micros(issued.micros() - 3_600_000_000);
    let (expired, exp) = tokens
        .issue_access(
            nick.user_id,
            nick.session_id,
            an_hour_ago,
            issued.plus(Duration::from_secs(3600)),
        )
        .unwrap();
    assert!(exp < issued.seconds());
    assert_code(app.get_me(&expired).await, Code::Unauthenticated);
    // A token whose `exp` is this very second is already dead (no leeway).
    let (dying, exp) = tokens
        .issue_access(
            nick.user_id,
            nick.session_id,
            Timestamp::from_micros(issued.micros() - 60_000_000),
            issued.plus(Duration::from_secs(3600)),
        )
        .unwrap();
    assert!(exp <= app.state.clock.now().seconds());
    assert_code(app.get_me(&dying).await, Code::Unauthenticated);
    app.stop().await;
}

async fn a_token_naming_another_users_session_is_unauthenticated(backend: Backend) {
    let app = spawn_app(backend).await;
    let olga = app.register_and_login("olga").await;
    let pete = app.register_and_login("pete").await;
    let tokens = TokenService::new(TEST_SECRET, "localhost", Duration::from_secs(600));
    let now = app.state.clock.now();
    let (mixed, _) = tokens
        .issue_access(
            pete.user_id,
            olga.session_id,
            now,
            now.plus(Duration::from_secs(3600)),
        )
        .unwrap();
    assert_code(app.get_me(&mixed).await, Code::Unauthenticated);
    app.stop().await;
}

async fn refresh_rotates_and_the_old_token_is_spent(backend: Backend) {
    let app = spawn_app(backend).await;
    let quinn = app.register_and_login("quinn").await;
    let rotated = app.refresh(&quinn.refresh_token).await.unwrap();
    assert_ne!(rotated.refresh_token, quinn.refresh_token);
    assert_eq!(rotated.token_type, "bearer");
    assert!(rotated.expires_in > 0);
    let me = app.get_me(&rotated.access_token).await.unwrap();
    assert_eq!(me.id, quinn.user_id);
    // The new refresh token works in turn.
    let again = app.refresh(&rotated.refresh_token).await.unwrap();
    assert!(app.get_me(&again.access_token).await.is_ok());
    app.stop().await;
}

async fn replaying_a_spent_refresh_token_revokes_the_session(backend: Backend) {
    let app = spawn_app(backend).await;
    let rita = app.register_and_login("rita").await;
    let thief = app.register_and_login("thief").await;
    let rotated = app.refresh(&rita.refresh_token).await.unwrap();
    // Someone presents the spent token again: the whole session dies.
    assert_code(
        app.refresh(&rita.refresh_token).await,
        Code::Unauthenticated,
    );
    assert_code(
        app.get_me(&rotated.access_token).await,
        Code::Unauthenticated,
    );
    assert_code(app.get_me(&rita.access_token).await, Code::Unauthenticated);
    assert_code(
        app.refresh(&rotated.refresh_token).await,
        Code::Unauthenticated,
    );
    // Other users' sessions are untouched.
    assert!(app.get_me(&thief.access_token).await.is_ok());
    app.stop().await;
}

async fn twenty_concurrent_refreshes_give_exactly_one_success(backend: Backend) {
    let app = spawn_app(backend).await;
    let sam = app.register_and_login("sam").await;
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let mut auth = app.auth.clone();
            let token = sam.refresh_token.clone();
            tokio::spawn(async move {
                auth.refresh_token(proto::RefreshTokenRequest {
                    refresh_token: token,
                })
                .await
                .map(tonic::Response::into_inner)
            })
        })
        .collect();
    let mut successes = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => successes += 1,
            Err(status) => assert_eq!(status.code(), Code::Unauthenticated, "{status:?}"),
        }
    }
    assert_eq!(successes, 1);
    // The losers presented a spent token: the session is revoked.
    assert_code(app.get_me(&sam.access_token).await, Code::Unauthenticated);
    app.stop().await;
}

async fn refresh_never_extends_the_session_lifetime(backend: Backend) {
    let app = spawn_app(backend).await;
    let tess = app.register_and_login("tess").await;
    let first = app.login("tess", PASSWORD).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let rotated = app.refresh(&first.refresh_token).await.unwrap();
    assert!(
        rotated.refresh_expires_in < first.refresh_expires_in,
        "{} then {}",
        first.refresh_expires_in,
        rotated.refresh_expires_in
    );
    drop(tess);
    app.stop().await;
}

async fn garbage_refresh_tokens_are_unauthenticated(backend: Backend) {
    let app = spawn_app(backend).await;
    let unknown = URL_SAFE_NO_PAD.encode([7u8; 32]);
    for token in ["", "garbage", "a.b.c", &unknown, &"x".repeat(10_000)] {
        assert_code(app.refresh(token).await, Code::Unauthenticated);
    }
    app.stop().await;
}

async fn logout_revokes_access_and_refresh_tokens_at_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let uma = app.register_and_login("uma").await;
    let other_device = app.login("uma", PASSWORD).await.unwrap();
    app.auth
        .clone()
        .logout(with_bearer(proto::LogoutRequest {}, &uma.access_token))
        .await
        .unwrap();
    app.assert_session_ended(&uma.access_token, &uma.refresh_token)
        .await;
    assert!(
        app.get_me(&other_device.access_token).await.is_ok(),
        "only one session ends"
    );
    assert_code(
        app.auth.clone().logout(proto::LogoutRequest {}).await,
        Code::Unauthenticated,
    );
    app.stop().await;
}

async fn logout_all_revokes_every_session_and_counts_them(backend: Backend) {
    let app = spawn_app(backend).await;
    let vic = app.register_and_login("vic").await;
    let second = app.login("vic", PASSWORD).await.unwrap();
    let third = app.login("vic", PASSWORD).await.unwrap();
    let bystander = app.register_and_login("walt").await;
    let response = app
        .auth
        .clone()
        .logout_all(with_bearer(
            proto::LogoutAllRequest {},
            &second.access_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.revoked_sessions, 3);
    for token in [&vic.access_token, &second.access_token, &third.access_token] {
        assert_code(app.get_me(token).await, Code::Unauthenticated);
    }
    assert_code(
        app.refresh(&third.refresh_token).await,
        Code::Unauthenticated,
    );
    assert!(app.get_me(&bystander.access_token).await.is_ok());
    app.stop().await;
}

async fn change_password_checks_the_current_password(backend: Backend) {
    let app = spawn_app(backend).await;
    let xena = app.register_and_login("xena").await;
    let status = assert_code(
        app.auth
            .clone()
            .change_password(with_bearer(
                proto::ChangePasswordRequest {
                    current_password: "not my password".into(),
                    new_password: "a brand new secret".into(),
                },
                &xena.access_token,
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_request_fields(&status), ["current_password"]);
    let status = assert_code(
        app.auth
            .clone()
            .change_password(with_bearer(
                proto::ChangePasswordRequest {
                    current_password: PASSWORD.into(),
                    new_password: "short".into(),
                },
                &xena.access_token,
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_request_fields(&status), ["new_password"]);
    assert!(
        app.login("xena", PASSWORD).await.is_ok(),
        "the password did not change"
    );
    app.stop().await;
}

async fn change_password_revokes_other_sessions_but_keeps_the_caller(backend: Backend) {
    let app = spawn_app(backend).await;
    let yara = app.register_and_login("yara").await;
    let other = app.login("yara", PASSWORD).await.unwrap();
    app.auth
        .clone()
        .change_password(with_bearer(
            proto::ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: "a brand new secret".into(),
            },
            &yara.access_token,
        ))
        .await
        .unwrap();
    assert!(app.get_me(&yara.access_token).await.is_ok());
    assert!(app.refresh(&yara.refresh_token).await.is_ok());
    app.assert_session_ended(&other.access_token, &other.refresh_token)
        .await;
    assert_code(app.login("yara", PASSWORD).await, Code::Unauthenticated);
    assert!(app.login("yara", "a brand new secret").await.is_ok());
    app.stop().await;
}

async fn update_me_changes_only_the_given_fields(backend: Backend) {
    let app = spawn_app(backend).await;
    let zoe = app.register_and_login("zoe").await;
    let mut auth = app.auth.clone();
    let updated = auth
        .update_me(with_bearer(
            proto::UpdateMeRequest {
                email: None,
                full_name: None,
                bio: Some("Writes tests.".into()),
            },
            &zoe.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(updated.bio.as_deref(), Some("Writes tests."));
    assert_eq!(updated.email, "zoe@example.com");
    let updated = auth
        .update_me(with_bearer(
            proto::UpdateMeRequest {
                email: Some("Zoe.New@Example.com".into()),
                full_name: Some("Zoe Z".into()),
                bio: None,
            },
            &zoe.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(updated.email, "zoe.new@example.com");
    assert_eq!(updated.full_name.as_deref(), Some("Zoe Z"));
    assert_eq!(updated.bio.as_deref(), Some("Writes tests."));
    assert!(app.login("zoe.new@example.com", PASSWORD).await.is_ok());
    app.stop().await;
}

async fn update_me_validates_and_refuses_a_taken_email(backend: Backend) {
    let app = spawn_app(backend).await;
    let amy = app.register_and_login("amy").await;
    app.register("ben").await;
    let mut auth = app.auth.clone();
    let status = assert_code(
        auth.update_me(with_bearer(
            proto::UpdateMeRequest {
                email: Some("nope".into()),
                full_name: None,
                bio: Some("b".repeat(10_001)),
            },
            &amy.access_token,
        ))
        .await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_request_fields(&status), ["email", "bio"]);
    assert_code(
        auth.update_me(with_bearer(
            proto::UpdateMeRequest {
                email: Some("BEN@example.com".into()),
                full_name: None,
                bio: None,
            },
            &amy.access_token,
        ))
        .await,
        Code::AlreadyExists,
    );
    assert_eq!(
        app.get_me(&amy.access_token).await.unwrap().email,
        "amy@example.com"
    );
    app.stop().await;
}

async fn validate_token_reports_live_tokens_and_only_active_false_otherwise(backend: Backend) {
    let app = spawn_app(backend).await;
    let cleo = app.register_and_login("cleo").await;
    let mut auth = app.auth.clone();
    let live = auth
        .validate_token(proto::ValidateTokenRequest {
            token: cleo.access_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(live.active);
    assert_eq!(live.user_id, cleo.user_id);
    assert_eq!(live.username, "cleo");
    assert_eq!(live.session_id, cleo.session_id);
    assert!(!live.is_superuser);
    assert!(live.roles.is_empty());
    let exp = live.expires_at.unwrap().seconds;
    let now = app.state.clock.now().seconds();
    assert!(
        (now + 1795..=now + 1800).contains(&exp),
        "expires_at is the token's exp"
    );

    app.auth
        .clone()
        .logout(with_bearer(proto::LogoutRequest {}, &cleo.access_token))
        .await
        .unwrap();
    for token in [cleo.access_token.as_str(), "", "garbage"] {
        let revoked = auth
            .validate_token(proto::ValidateTokenRequest {
                token: token.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            revoked,
            proto::ValidateTokenResponse::default(),
            "only active: false"
        );
    }
    app.stop().await;
}
