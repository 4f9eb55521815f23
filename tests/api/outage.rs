//! The database going away and coming back, through a TCP proxy that the test
//! cuts and restores (the shared PostgreSQL server itself is never stopped).

use std::time::{Duration, Instant};

use ai_message::{config::DatabaseTarget, proto};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{Backend, TestApp, spawn_app, spawn_app_with, start_proxy, with_bearer};

pub async fn health(app: &TestApp) -> i32 {
    HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_or(-1, |r| r.into_inner().status)
}

/// Waits up to `limit` for the overall health to become `status`.
pub async fn wait_for_health(app: &TestApp, status: ServingStatus, limit: Duration) -> Duration {
    let started = Instant::now();
    while health(app).await != status as i32 {
        assert!(
            started.elapsed() < limit,
            "health did not become {status:?} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

/// The `host:port` of the PostgreSQL server the tests use.
fn postgres_host_port() -> String {
    let admin_url = std::env::var(crate::helpers::POSTGRES_URL_VAR).unwrap();
    let authority = admin_url
        .split("://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    authority.rsplit('@').next().unwrap().to_owned()
}

/// `config` with its PostgreSQL URL pointed at the proxy on `proxy_port`.
fn through_proxy(config: &mut ai_message::config::Config, proxy_port: u16) {
    if let DatabaseTarget::Postgres(url) = &config.database {
        config.database = DatabaseTarget::Postgres(
            url.replace(&postgres_host_port(), &format!("127.0.0.1:{proxy_port}")),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_unavailable_and_not_serving_and_recovery_needs_no_restart() {
    if !Backend::Postgres.available() {
        eprintln!("skipped: {} is not set", crate::helpers::POSTGRES_URL_VAR);
        return;
    }
    let (proxy_port, open) = start_proxy(postgres_host_port()).await;
    let app = spawn_app_with(Backend::Postgres, |config| {
        through_proxy(config, proxy_port)
    })
    .await;
    let mia = app.register_and_login("mia").await;
    assert_eq!(health(&app).await, ServingStatus::Serving as i32);

    open.send_replace(false);
    let took = wait_for_health(&app, ServingStatus::NotServing, Duration::from_secs(5)).await;
    eprintln!("NOT_SERVING after {took:?}");
    // Load balancers probing over plain HTTP see the same.
    let (status, _, body) = crate::grpc_web::http1(&app, "GET /health HTTP/1.1", b"").await;
    assert_eq!(
        (status, body.as_slice()),
        (503, br#"{"status":"NOT_SERVING"}"#.as_slice())
    );
    // Past the session cache's second, a call needs the database.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Once health says NOT_SERVING, calls fail at once, not after a pool timeout.
    for _ in 0..3 {
        let started = Instant::now();
        let status = app
            .auth
            .clone()
            .get_me(with_bearer(proto::GetMeRequest {}, &mia.access_token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "answered after {:?}",
            started.elapsed()
        );
        for driver_text in ["connection", "refused", "pool", "sqlx", "timed out"] {
            assert!(
                !status.message().contains(driver_text),
                "{}",
                status.message()
            );
        }
    }

    // REST callers get the same answer as 503 with the error body.
    crate::rest::Rest::new(&app)
        .call("GET", "/auth/me", Some(&mia.access_token), None)
        .await
        .assert_error(503, Code::Unavailable);

    open.send_replace(true);
    let took = wait_for_health(&app, ServingStatus::Serving, Duration::from_secs(5)).await;
    eprintln!("SERVING again after {took:?}");
    assert!(
        app.get_me(&mia.access_token).await.is_ok(),
        "recovered without a restart"
    );
    app.stop().await;
}

/// The stream's next event, within 2 s, is about `message`.
pub async fn assert_next_event_is(
    stream: &mut tonic::Streaming<proto::StreamMessagesResponse>,
    message: &proto::Message,
    what: &str,
) {
    let event = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 2 s"))
        .unwrap()
        .unwrap();
    let about = event
        .event
        .as_ref()
        .map(|e| crate::message_log::message_of(e).id);
    assert_eq!(about, Some(message.id), "{what}: {event:?}");
}

/// The status the stream ends with, within 15 s (the contract's bound for a
/// lost event channel); events before it are skipped.
pub async fn stream_end_status(
    stream: &mut tonic::Streaming<proto::StreamMessagesResponse>,
    what: &str,
) -> tonic::Status {
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("{what}: the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: the stream did not end within 15 s"));
    eprintln!("{what}: the stream ended after {:?}", started.elapsed());
    ended
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_an_instance_that_loses_its_event_channel_end_unavailable_and_resume_cleanly() {
    if !Backend::Postgres.available() {
        eprintln!("skipped: {} is not set", crate::helpers::POSTGRES_URL_VAR);
        return;
    }
    let a = spawn_app(Backend::Postgres).await;
    let (proxy_port, open) = start_proxy(postgres_host_port()).await;
    let b = a
        .spawn_sibling_with(|config| through_proxy(config, proxy_port))
        .await;
    let ann = a.register_and_login("ann").await;
    let bob = a.register_and_login("bob").await;

    let root = a.superuser("root").await;
    let early = a.register_and_login("early").await;
    let late = a.register_and_login("late").await;
    let revoked_meanwhile = a.register_and_login("meanwhile").await;
    assert!(b.get_me(&revoked_meanwhile.access_token).await.is_ok());
    let mut feed = crate::errors::watch(&b, &root.access_token, "")
        .await
        .unwrap();
    a.auth
        .clone()
        .logout(with_bearer(proto::LogoutRequest {}, &early.access_token))
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(2), feed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen.session_id, early.session_id);

    let mut stream = b.open_stream(&bob).await.unwrap();
    let first = a
        .send_text(&ann, bob.user_id, "before the cut")
        .await
        .unwrap();
    assert_next_event_is(&mut stream, &first, "delivered across instances").await;

    // B loses PostgreSQL while A keeps working: B's stream ends, never silently.
    open.send_replace(false);
    let ended = stream_end_status(&mut stream, "the stream on the cut instance").await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    // The revocation feed on B ends the same way, never silently.
    let feed_end = tokio::time::timeout(Duration::from_secs(15), feed.message())
        .await
        .expect("the feed on the cut instance ends");
    assert_eq!(feed_end.map(|_| ()).unwrap_err().code(), Code::Unavailable);
    a.auth
        .clone()
        .logout(with_bearer(proto::LogoutRequest {}, &late.access_token))
        .await
        .unwrap();
    // A revocation on A while B is cut off.
    a.auth
        .clone()
        .logout(with_bearer(
            proto::LogoutRequest {},
            &revoked_meanwhile.access_token,
        ))
        .await
        .unwrap();
    // While cut, B's calls are UNAVAILABLE, never INTERNAL or UNKNOWN.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = Instant::now();
    loop {
        let status = b.get_me(&bob.access_token).await.unwrap_err();
        assert!(
            !matches!(status.code(), Code::Internal | Code::Unknown),
            "{status:?}"
        );
        if status.code() == Code::Unavailable {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in 0..5 {
        a.send_text(&ann, bob.user_id, &format!("during the cut {n}"))
            .await
            .unwrap();
    }
    wait_for_health(&b, ServingStatus::NotServing, Duration::from_secs(5)).await;
    let refused = b.open_stream(&bob).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // Back: SERVING only once B listens again, so a stream opened the moment
    // health says SERVING receives the very next message.
    open.send_replace(true);
    wait_for_health(&b, ServingStatus::Serving, Duration::from_secs(5)).await;
    // The revocation made on A during the cut is enforced on B now.
    let refused = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if b.get_me(&revoked_meanwhile.access_token).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "B still accepts a session revoked on A");
    // Resumed from its cursor, the feed brings the revocation made during the cut.
    let mut feed = crate::errors::watch(&b, &root.access_token, &seen.cursor)
        .await
        .unwrap();
    let missed = tokio::time::timeout(Duration::from_secs(2), feed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(missed.session_id, late.session_id);
    let mut resumed = b.open_stream(&bob).await.unwrap();
    let next = a
        .send_text(&ann, bob.user_id, "after the cut")
        .await
        .unwrap();
    assert_next_event_is(
        &mut resumed,
        &next,
        "the resumed stream receives the next message",
    )
    .await;
    b.stop().await;
    a.stop().await;
}
