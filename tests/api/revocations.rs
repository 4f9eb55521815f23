//! The revocation feed (WatchRevocations) and ended sessions: each path
//! that ends a session records its reason and reaches the feed within a
//! second, on every instance; a reconnecting follower gets exactly what it
//! missed; cursors expire as the contract says.

use std::time::{Duration, Instant};

use ai_message::proto::{self, SessionEndReason};
use tonic::Code;

use crate::{
    errors::{assert_reason, watch},
    helpers::{
        Backend, LoggedIn, PASSWORD, TestApp, assert_code, spawn_app, spawn_app_on_clock,
        with_bearer,
    },
};

backend_tests!(
    a_logout_reaches_the_feed_within_a_second,
    every_way_a_session_ends_is_recorded_with_its_reason,
    a_follower_that_reconnects_with_its_cursor_gets_exactly_what_it_missed,
    service_role_holders_may_watch_and_others_may_not,
    the_feed_ends_with_its_callers_session,
    cursors_past_retention_expire_and_malformed_ones_are_invalid,
    ended_sessions_are_listed_with_their_reason_on_request,
    validate_token_reports_missing_roles_and_how_long_to_cache,
    validate_tokens_answers_in_request_order_up_to_100,
);

/// The feed's next event, within `limit`.
async fn next(
    feed: &mut tonic::Streaming<proto::WatchRevocationsResponse>,
    limit: Duration,
) -> proto::WatchRevocationsResponse {
    tokio::time::timeout(limit, feed.message())
        .await
        .expect("an event within the limit")
        .expect("a message, not an error")
        .expect("the feed is still open")
}

/// Asserts no event arrives within `wait`.
async fn quiet(feed: &mut tonic::Streaming<proto::WatchRevocationsResponse>, wait: Duration) {
    if let Ok(item) = tokio::time::timeout(wait, feed.message()).await {
        panic!("expected no event, got {item:?}");
    }
}

fn reason(event: &proto::WatchRevocationsResponse) -> SessionEndReason {
    SessionEndReason::try_from(event.reason).unwrap()
}

async fn logout(app: &TestApp, who: &LoggedIn) {
    app.auth
        .clone()
        .logout(with_bearer(proto::LogoutRequest {}, &who.access_token))
        .await
        .unwrap();
}

async fn a_logout_reaches_the_feed_within_a_second(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let ivy = app.register_and_login("ivy").await;
    let mut feed = watch(&app, &root.access_token, "").await.unwrap();
    let started = Instant::now();
    logout(&app, &ivy).await;
    let event = next(&mut feed, Duration::from_secs(1)).await;
    eprintln!("delivered after {:?}", started.elapsed());
    assert_eq!(
        (event.session_id, event.user_id, reason(&event)),
        (ivy.session_id, ivy.user_id, SessionEndReason::Logout)
    );
    assert!(!event.cursor.is_empty() && event.revoked_at.is_some());

    if backend == Backend::Postgres {
        // A follower on another instance hears of it just as fast.
        let sibling = app.spawn_sibling().await;
        let mut remote = watch(&sibling, &root.access_token, "").await.unwrap();
        let bob = app.register_and_login("bob").await;
        logout(&app, &bob).await;
        let event = next(&mut remote, Duration::from_secs(1)).await;
        assert_eq!(event.session_id, bob.session_id);
        sibling.stop().await;
    }
    app.stop().await;
}

async fn every_way_a_session_ends_is_recorded_with_its_reason(backend: Backend) {
    use SessionEndReason::*;
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let mut feed = watch(&app, &root.access_token, "").await.unwrap();
    let mut admin = app.admin.clone();
    let limit = Duration::from_secs(2);

    let a = app.register_and_login("user_a").await;
    logout(&app, &a).await;
    assert_eq!(reason(&next(&mut feed, limit).await), Logout);

    let b = app.register_and_login("user_b").await;
    let b2 = app.login("user_b", PASSWORD).await.unwrap();
    let all = app
        .auth
        .clone()
        .logout_all(with_bearer(proto::LogoutAllRequest {}, &b.access_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.revoked_sessions, 2);
    let ended = [next(&mut feed, limit).await, next(&mut feed, limit).await];
    let mut sessions: Vec<i64> = ended.iter().map(|e| e.session_id).collect();
    sessions.sort_unstable();
    assert_eq!(sessions, [b.session_id, b2.session_id]);
    assert!(ended.iter().all(|e| reason(e) == LogoutAll));

    let c = app.register_and_login("user_c").await;
    app.sessions
        .clone()
        .delete_session(with_bearer(
            proto::DeleteSessionRequest {
                session_id: c.session_id,
            },
            &c.access_token,
        ))
        .await
        .unwrap();
    assert_eq!(reason(&next(&mut feed, limit).await), SessionDeleted);

    let d = app.register_and_login("user_d").await;
    let d_other = app.login("user_d", PASSWORD).await.unwrap();
    app.auth
        .clone()
        .change_password(with_bearer(
            proto::ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: "another long passphrase".into(),
            },
            &d.access_token,
        ))
        .await
        .unwrap();
    let event = next(&mut feed, limit).await;
    assert_eq!(
        (event.session_id, reason(&event)),
        (d_other.session_id, PasswordChanged)
    );

    let e = app.register_and_login("user_e").await;
    admin
        .disable_user(with_bearer(
            proto::DisableUserRequest { user_id: e.user_id },
            &root.access_token,
        ))
        .await
        .unwrap();
    let event = next(&mut feed, limit).await;
    assert_eq!(
        (event.session_id, reason(&event)),
        (e.session_id, UserDisabled)
    );

    let f = app.register_and_login("user_f").await;
    admin
        .delete_user(with_bearer(
            proto::DeleteUserRequest { user_id: f.user_id },
            &root.access_token,
        ))
        .await
        .unwrap();
    let event = next(&mut feed, limit).await;
    assert_eq!(
        (event.session_id, event.user_id, reason(&event)),
        (f.session_id, f.user_id, UserDeleted)
    );

    let g = app.register_and_login("user_g").await;
    app.refresh(&g.refresh_token).await.unwrap();
    assert_code(app.refresh(&g.refresh_token).await, Code::Unauthenticated);
    let event = next(&mut feed, limit).await;
    assert_eq!(
        (event.session_id, reason(&event)),
        (g.session_id, RefreshTokenReused)
    );
    // Nothing else: ending an ended session again adds no event.
    app.auth
        .clone()
        .logout_all(with_bearer(proto::LogoutAllRequest {}, &d.access_token))
        .await
        .unwrap();
    let event = next(&mut feed, limit).await;
    assert_eq!(
        (event.session_id, reason(&event)),
        (d.session_id, LogoutAll)
    );
    quiet(&mut feed, Duration::from_millis(600)).await;
    app.stop().await;
}

async fn a_follower_that_reconnects_with_its_cursor_gets_exactly_what_it_missed(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let mut users = Vec::new();
    for i in 0..8 {
        users.push(app.register_and_login(&format!("user{i}")).await);
    }
    let mut feed = watch(&app, &root.access_token, "").await.unwrap();
    logout(&app, &users[0]).await;
    let seen = next(&mut feed, Duration::from_secs(2)).await;
    drop(feed);
    // Missed while away, ended concurrently.
    let missed: Vec<_> = users[1..5]
        .iter()
        .map(|user| {
            let (app_auth, token) = (app.auth.clone(), user.access_token.clone());
            tokio::spawn(async move {
                let mut auth = app_auth;
                auth.logout(with_bearer(proto::LogoutRequest {}, &token))
                    .await
                    .unwrap();
            })
        })
        .collect();
    for task in missed {
        task.await.unwrap();
    }
    let mut feed = watch(&app, &root.access_token, &seen.cursor).await.unwrap();
    let mut replayed = Vec::new();
    for _ in 0..4 {
        replayed.push(next(&mut feed, Duration::from_secs(2)).await);
    }
    let mut sessions: Vec<i64> = replayed.iter().map(|e| e.session_id).collect();
    sessions.sort_unstable();
    let mut expected: Vec<i64> = users[1..5].iter().map(|u| u.session_id).collect();
    expected.sort_unstable();
    assert_eq!(sessions, expected, "exactly the missed ones");
    let cursors: Vec<&str> = replayed.iter().map(|e| e.cursor.as_str()).collect();
    let mut unique = cursors.clone();
    unique.dedup();
    assert_eq!(unique.len(), 4, "no duplicate");
    // Then live ones, after the replay, with no repeat of the seam.
    logout(&app, &users[5]).await;
    let live = next(&mut feed, Duration::from_secs(1)).await;
    assert_eq!(live.session_id, users[5].session_id);
    quiet(&mut feed, Duration::from_millis(600)).await;
    app.stop().await;
}

async fn service_role_holders_may_watch_and_others_may_not(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let svc = app.register_and_login("svc").await;
    assert_reason(
        watch(&app, &svc.access_token, "").await,
        Code::PermissionDenied,
        "ROLE_REQUIRED",
    );
    app.grant_role(&root.access_token, svc.user_id, "service")
        .await;
    let mut feed = watch(&app, &svc.access_token, "").await.unwrap();
    let ivy = app.register_and_login("ivy").await;
    logout(&app, &ivy).await;
    assert_eq!(
        next(&mut feed, Duration::from_secs(1)).await.session_id,
        ivy.session_id
    );
    app.stop().await;
}

async fn the_feed_ends_with_its_callers_session(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let mut feed = watch(&app, &root.access_token, "").await.unwrap();
    logout(&app, &root).await;
    let last = next(&mut feed, Duration::from_secs(1)).await;
    assert_eq!(last.session_id, root.session_id);
    let ending = tokio::time::timeout(Duration::from_secs(1), feed.message())
        .await
        .expect("the feed ends at once");
    assert_reason(ending, Code::Unauthenticated, "SESSION_REVOKED");
    app.stop().await;
}

async fn cursors_past_retention_expire_and_malformed_ones_are_invalid(backend: Backend) {
    let real_now = ai_message::domain::Clock::now(&ai_message::domain::SystemClock);
    let clock = std::sync::Arc::new(ai_message::domain::ManualClock::starting_at(real_now));
    let app = spawn_app_on_clock(backend, |_| {}, clock.clone()).await;
    let root = app.superuser("root").await;
    let ivy = app.register_and_login("ivy").await;
    let mut feed = watch(&app, &root.access_token, "").await.unwrap();
    logout(&app, &ivy).await;
    let old = next(&mut feed, Duration::from_secs(2)).await;
    drop(feed);
    for malformed in ["not a cursor", "AAAA"] {
        let status = assert_code(
            watch(&app, &root.access_token, malformed).await,
            Code::InvalidArgument,
        );
        assert_eq!(
            crate::helpers::bad_request_fields(&status),
            ["after_cursor"]
        );
    }
    // Kept for the access-token lifetime plus 5 minutes (35 minutes here)...
    clock.advance(Duration::from_secs(34 * 60));
    ai_message::services::revocations::sweep_once(&app.state).await;
    let root_again = app.login("root", PASSWORD).await.unwrap();
    assert!(
        watch(&app, &root_again.access_token, &old.cursor)
            .await
            .is_ok()
    );
    // ...and not after.
    clock.advance(Duration::from_secs(2 * 60));
    ai_message::services::revocations::sweep_once(&app.state).await;
    assert_reason(
        watch(&app, &root_again.access_token, &old.cursor).await,
        Code::FailedPrecondition,
        "CURSOR_EXPIRED",
    );
    app.stop().await;
}

async fn list_sessions(app: &TestApp, who: &LoggedIn, include_ended: bool) -> Vec<proto::Session> {
    app.sessions
        .clone()
        .list_sessions(with_bearer(
            proto::ListSessionsRequest { include_ended },
            &who.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .sessions
}

async fn ended_sessions_are_listed_with_their_reason_on_request(backend: Backend) {
    let real_now = ai_message::domain::Clock::now(&ai_message::domain::SystemClock);
    let clock = std::sync::Arc::new(ai_message::domain::ManualClock::starting_at(real_now));
    let app = spawn_app_on_clock(backend, |_| {}, clock.clone()).await;
    let first = app.register_and_login("ivy").await;
    let second = app.login("ivy", PASSWORD).await.unwrap();
    let me = LoggedIn {
        user_id: first.user_id,
        access_token: second.access_token.clone(),
        refresh_token: second.refresh_token.clone(),
        session_id: second.session_id,
    };
    logout(&app, &first).await;
    let live = list_sessions(&app, &me, false).await;
    assert_eq!(live.len(), 1);
    assert!(live[0].ended_at.is_none());
    assert_eq!(live[0].end_reason, SessionEndReason::Unspecified as i32);
    let all = list_sessions(&app, &me, true).await;
    assert_eq!(
        all.iter().map(|s| s.id).collect::<Vec<_>>(),
        [second.session_id, first.session_id],
        "live first, then ended"
    );
    let ended = &all[1];
    assert!(!ended.is_active && ended.ended_at.is_some());
    assert_eq!(ended.end_reason, SessionEndReason::Logout as i32);

    // A session that ran out is EXPIRED, ended at its expiry.
    let third = app.login("ivy", PASSWORD).await.unwrap();
    clock.advance(Duration::from_secs(7 * 24 * 3600 + 1));
    let fresh = app.login("ivy", PASSWORD).await.unwrap();
    let fresh = LoggedIn {
        user_id: first.user_id,
        access_token: fresh.access_token,
        refresh_token: fresh.refresh_token,
        session_id: fresh.session_id,
    };
    let all = list_sessions(&app, &fresh, true).await;
    let expired = all.iter().find(|s| s.id == third.session_id).unwrap();
    assert_eq!(expired.end_reason, SessionEndReason::Expired as i32);
    assert_eq!(expired.ended_at, expired.expires_at);
    // Past 30 days ended sessions are no longer listed.
    clock.advance(Duration::from_secs(31 * 24 * 3600));
    let latest = app.login("ivy", PASSWORD).await.unwrap();
    let latest = LoggedIn {
        user_id: first.user_id,
        access_token: latest.access_token,
        refresh_token: latest.refresh_token,
        session_id: latest.session_id,
    };
    let all = list_sessions(&app, &latest, true).await;
    assert!(all.iter().all(|s| s.id != first.session_id), "{all:?}");
    app.stop().await;
}

async fn validate_token_reports_missing_roles_and_how_long_to_cache(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let ivy = app.register_and_login("ivy").await;
    app.grant_role(&root.access_token, ivy.user_id, "editor")
        .await;
    let answer = app
        .validate(&ivy.access_token, &["editor", "admin", "billing"])
        .await;
    assert!(answer.active, "missing roles leave the token active");
    assert_eq!(answer.missing_roles, ["admin", "billing"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let until = answer.cache_until.unwrap();
    let until = until.seconds as f64 + f64::from(until.nanos) / 1e9;
    assert!(
        until > now && until <= now + 1.5,
        "about one second ahead: {until} vs {now}"
    );
    assert!(until <= answer.expires_at.unwrap().seconds as f64);
    let inactive = app.validate("junk", &["editor"]).await;
    assert!(
        !inactive.active && inactive.missing_roles.is_empty() && inactive.cache_until.is_none()
    );
    app.stop().await;
}

async fn validate_tokens_answers_in_request_order_up_to_100(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    logout(&app, &bob).await;
    let mut auth = app.auth.clone();
    let results = auth
        .validate_tokens(proto::ValidateTokensRequest {
            tokens: vec![
                ann.access_token.clone(),
                "junk".into(),
                bob.access_token.clone(),
                "a\u{0}b".into(),
                ann.access_token.clone(),
            ],
            required_roles: vec!["service".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let active: Vec<bool> = results.iter().map(|r| r.active).collect();
    assert_eq!(active, [true, false, false, false, true]);
    assert_eq!(results[0].user_id, ann.user_id);
    assert_eq!(results[0].missing_roles, ["service"]);
    let too_many = auth
        .validate_tokens(proto::ValidateTokensRequest {
            tokens: vec![ann.access_token.clone(); 101],
            required_roles: Vec::new(),
        })
        .await;
    let status = assert_code(too_many, Code::InvalidArgument);
    assert_eq!(crate::helpers::bad_request_fields(&status), ["tokens"]);
    app.stop().await;
}
