//! The example verifier (examples/verifier), run against the real server:
//! it verifies tokens offline with the published keys and refuses a revoked
//! session's token within a second, also after its feed reconnects.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ai_message::proto;

use crate::helpers::{Backend, PASSWORD, TestApp, spawn_app_with, with_bearer};

#[path = "../../examples/verifier/verifier.rs"]
#[allow(dead_code)]
mod example;

use example::{Refused, Verifier};

backend_tests!(an_offline_verifier_refuses_a_revoked_sessions_token_within_a_second);

/// A user holding the `service` role.
async fn service_account(app: &TestApp, name: &str) {
    let root = app.superuser("root").await;
    let user = app.register(name).await;
    app.grant_role(&root.access_token, user.id, "service").await;
}

/// Polls `verify` until it refuses, at most `limit`; how long it took.
async fn refused_within(verifier: &Verifier, token: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match verifier.verify(token) {
            Err(Refused::Revoked) => return started.elapsed(),
            Err(other) => panic!("refused for another reason: {other:?}"),
            Ok(_) => {}
        }
        assert!(started.elapsed() < limit, "still accepted after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn an_offline_verifier_refuses_a_revoked_sessions_token_within_a_second(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = crate::keys::key_file(&dir, "signing.pem", 11);
    let app = spawn_app_with(backend, |c| c.signing_key_file = Some(path)).await;
    service_account(&app, "svc").await;
    let verifier = Verifier::new(app.channel.clone(), &app.config.domain)
        .await
        .unwrap();
    let follower = tokio::spawn(Arc::clone(&verifier).follow("svc".into(), PASSWORD.into()));

    let ivy = app.register_and_login("ivy").await;
    let verified = verifier.verify(&ivy.access_token).unwrap();
    assert_eq!(
        (verified.user_id, verified.session_id),
        (ivy.user_id, ivy.session_id)
    );
    assert!(matches!(
        verifier.verify("not.a.token"),
        Err(Refused::Invalid(_))
    ));

    // The follower must be listening before the revocation it is to see.
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.auth
        .clone()
        .logout(with_bearer(proto::LogoutRequest {}, &ivy.access_token))
        .await
        .unwrap();
    let took = refused_within(&verifier, &ivy.access_token, Duration::from_secs(1)).await;
    eprintln!("revoked token refused offline after {took:?}");

    // The follower's own session ends (LogoutAll of its account), so its
    // stream ends; a revocation happens while it logs in again, and the
    // resumed feed (from its cursor) still brings it.
    let svc = app.login("svc", PASSWORD).await.unwrap();
    let bob = app.register_and_login("bob").await;
    assert!(verifier.verify(&bob.access_token).is_ok());
    app.auth
        .clone()
        .logout_all(with_bearer(proto::LogoutAllRequest {}, &svc.access_token))
        .await
        .unwrap();
    app.auth
        .clone()
        .logout(with_bearer(proto::LogoutRequest {}, &bob.access_token))
        .await
        .unwrap();
    let took = refused_within(&verifier, &bob.access_token, Duration::from_secs(3)).await;
    eprintln!("across a reconnect, refused after {took:?}");
    assert!(
        verifier
            .verify(&app.register_and_login("cyd").await.access_token)
            .is_ok()
    );
    follower.abort();
    app.stop().await;
}
