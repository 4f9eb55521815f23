//! SessionService: the caller's own sessions.

use std::time::Duration;

use ai_message::proto;
use tonic::Code;

use crate::helpers::{
    Backend, PASSWORD, TestApp, assert_code, spawn_app, spawn_app_on_clock, with_bearer,
};

backend_tests!(
    list_sessions_shows_active_sessions_newest_first_and_marks_the_current_one,
    delete_session_revokes_its_tokens_at_once,
    another_users_session_is_not_found_exactly_like_a_missing_one,
    deleting_the_calling_session_is_a_logout,
    last_used_at_follows_use_without_a_write_per_call,
    tokens_and_sessions_expire_on_the_servers_clock_without_sleeping,
);

async fn list(app: &TestApp, token: &str) -> Vec<proto::Session> {
    app.sessions
        .clone()
        .list_sessions(with_bearer(proto::ListSessionsRequest::default(), token))
        .await
        .unwrap()
        .into_inner()
        .sessions
}

async fn delete(app: &TestApp, token: &str, session_id: i64) -> Result<(), tonic::Status> {
    app.sessions
        .clone()
        .delete_session(with_bearer(
            proto::DeleteSessionRequest { session_id },
            token,
        ))
        .await
        .map(|_| ())
}

async fn list_sessions_shows_active_sessions_newest_first_and_marks_the_current_one(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    let gina = app.register_and_login("gina").await;
    let second = app.login("gina", PASSWORD).await.unwrap();
    let third = app.login("gina", PASSWORD).await.unwrap();
    app.auth
        .clone()
        .logout(with_bearer(proto::LogoutRequest {}, &third.access_token))
        .await
        .unwrap();
    app.register_and_login("stranger").await;
    let sessions = list(&app, &second.access_token).await;
    let ids: Vec<i64> = sessions.iter().map(|s| s.id).collect();
    assert_eq!(
        ids,
        [second.session_id, gina.session_id],
        "active only, newest first, own only"
    );
    assert!(sessions[0].current && !sessions[1].current);
    for session in &sessions {
        assert!(session.is_active);
        assert_eq!(session.ip_address.as_deref(), Some("127.0.0.1"));
        let created = session.created_at.unwrap().seconds;
        assert_eq!(session.expires_at.unwrap().seconds - created, 7 * 86_400);
    }
    app.stop().await;
}

async fn delete_session_revokes_its_tokens_at_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let hugo = app.register_and_login("hugo").await;
    let laptop = app.login("hugo", PASSWORD).await.unwrap();
    delete(&app, &hugo.access_token, laptop.session_id)
        .await
        .unwrap();
    app.assert_session_ended(&laptop.access_token, &laptop.refresh_token)
        .await;
    assert!(app.get_me(&hugo.access_token).await.is_ok());
    assert_eq!(list(&app, &hugo.access_token).await.len(), 1);
    app.stop().await;
}

async fn another_users_session_is_not_found_exactly_like_a_missing_one(backend: Backend) {
    let app = spawn_app(backend).await;
    let iris = app.register_and_login("iris").await;
    let jack = app.register_and_login("jack").await;
    let foreign = assert_code(
        delete(&app, &iris.access_token, jack.session_id).await,
        Code::NotFound,
    );
    let missing = assert_code(
        delete(&app, &iris.access_token, 987_654).await,
        Code::NotFound,
    );
    assert_eq!(foreign.message(), missing.message());
    assert!(
        app.get_me(&jack.access_token).await.is_ok(),
        "jack's session survives"
    );
    app.stop().await;
}

async fn deleting_the_calling_session_is_a_logout(backend: Backend) {
    let app = spawn_app(backend).await;
    let kate = app.register_and_login("kate").await;
    delete(&app, &kate.access_token, kate.session_id)
        .await
        .unwrap();
    app.assert_session_ended(&kate.access_token, &kate.refresh_token)
        .await;
    app.stop().await;
}

async fn last_used_at_follows_use_without_a_write_per_call(backend: Backend) {
    let app = spawn_app(backend).await;
    let liam = app.register_and_login("liam").await;
    let created = list(&app, &liam.access_token).await[0]
        .last_used_at
        .unwrap()
        .seconds;
    // Recently used: further calls do not move it.
    app.get_me(&liam.access_token).await.unwrap();
    assert_eq!(
        list(&app, &liam.access_token).await[0]
            .last_used_at
            .unwrap()
            .seconds,
        created
    );
    // Pretend the last use was an hour ago: the next call records a new one.
    let an_hour_ago = app.state.clock.now().micros() - 3_600_000_000;
    app.state
        .db
        .touch_session(liam.session_id, an_hour_ago)
        .await
        .unwrap();
    // The server may serve the session from its cache for up to a second.
    tokio::time::sleep(ai_message::auth::cache::ENTRY_LIFETIME + Duration::from_millis(100)).await;
    app.get_me(&liam.access_token).await.unwrap();
    let mut last_used = 0;
    for _ in 0..50 {
        last_used = app
            .state
            .db
            .list_live_sessions(liam.user_id, app.state.clock.now().micros())
            .await
            .unwrap()[0]
            .last_used_at;
        if last_used > an_hour_ago {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        app.state.clock.now().micros() - last_used < 10_000_000,
        "updated to about now"
    );
    app.stop().await;
}

/// The server takes "now" from its clock: moved by hand, the access token
/// dies at its 30th minute (cached session or not) and the refresh token
/// with its session at the 7th day.
async fn tokens_and_sessions_expire_on_the_servers_clock_without_sleeping(backend: Backend) {
    let real_now = ai_message::domain::Clock::now(&ai_message::domain::SystemClock);
    let clock = std::sync::Arc::new(ai_message::domain::ManualClock::starting_at(real_now));
    let app = spawn_app_on_clock(backend, |_| {}, clock.clone()).await;
    let ivy = app.register_and_login("ivy").await;
    assert!(app.get_me(&ivy.access_token).await.is_ok());

    clock.advance(Duration::from_secs(29 * 60 + 59));
    assert!(
        app.get_me(&ivy.access_token).await.is_ok(),
        "alive at 29:59"
    );
    clock.advance(Duration::from_secs(1));
    assert_code(app.get_me(&ivy.access_token).await, Code::Unauthenticated);

    // The session lives on: a refresh still works, until the seventh day.
    let refreshed = app.refresh(&ivy.refresh_token).await.unwrap();
    assert!(app.get_me(&refreshed.access_token).await.is_ok());
    clock.advance(Duration::from_secs(7 * 24 * 3600));
    app.assert_session_ended(&refreshed.access_token, &refreshed.refresh_token)
        .await;
    app.stop().await;
}
