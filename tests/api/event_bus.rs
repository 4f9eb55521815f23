//! NATS as the event bus (`AI_MESSAGE_NATS_URL`): deployments that share a
//! NATS server stay apart, and an instance cut off from NATS (through a TCP
//! proxy the test controls; the shared server is never stopped) ends its
//! streams, keeps answering unary calls, and recovers without a restart.
//! Every other behaviour runs over NATS too: `backend_tests!`'s
//! `postgres_nats` runs.

use std::time::{Duration, Instant};

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    helpers::{Backend, Cut, TestApp, nats_url, spawn_app_with, start_proxy, start_proxy_cutting},
    metrics::{scrape, value},
    outage::{health, wait_for_health},
};

/// `config` carrying its events through the NATS server at `url`.
fn over_nats(config: &mut ai_message::config::Config, url: &str) {
    config.nats_url = Some(ai_message::config::NatsUrl::parse(url).unwrap());
}

/// The `host:port` of a NATS URL.
fn host_port(url: &str) -> String {
    url.trim_start_matches("nats://").to_owned()
}

/// Waits up to `limit` for `ai_message_event_bus_connected` to read `expected`.
async fn wait_for_bus_gauge(app: &TestApp, expected: f64, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if value(&scrape(app).await, "ai_message_event_bus_connected") == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "the bus gauge did not read {expected} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The stream's next event within `limit`, if any.
async fn next_event(
    stream: &mut tonic::Streaming<ai_message::proto::StreamMessagesResponse>,
    limit: Duration,
) -> Option<Result<ai_message::proto::StreamMessagesResponse, tonic::Status>> {
    tokio::time::timeout(limit, stream.message())
        .await
        .ok()
        .map(|received| received.map(|event| event.expect("the stream ended without a status")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_sharing_one_nats_server_never_see_each_others_events() {
    let Some(nats) = nats_url() else {
        eprintln!("skipped: {} is not set", crate::helpers::NATS_URL_VAR);
        return;
    };
    // Two deployments (two SQLite databases) whose users have the same ids.
    let first = spawn_app_with(Backend::Sqlite, |c| over_nats(c, &nats)).await;
    let second = spawn_app_with(Backend::Sqlite, |c| over_nats(c, &nats)).await;
    assert_ne!(
        first.state.db.deployment_id().await.unwrap(),
        second.state.db.deployment_id().await.unwrap()
    );
    let (ann, bob) = (
        first.register_and_login("ann").await,
        first.register_and_login("bob").await,
    );
    let (cat, dan) = (
        second.register_and_login("cat").await,
        second.register_and_login("dan").await,
    );
    assert_eq!((ann.user_id, bob.user_id), (cat.user_id, dan.user_id));
    let mut dans = second.open_stream(&dan).await.unwrap();
    let mut bobs = first.open_stream(&bob).await.unwrap();

    first
        .send_text(&ann, bob.user_id, "for bob only")
        .await
        .unwrap();
    let delivered = next_event(&mut bobs, Duration::from_secs(2)).await;
    assert!(
        matches!(delivered, Some(Ok(_))),
        "the first deployment's own stream gets it: {delivered:?}"
    );
    let leaked = next_event(&mut dans, Duration::from_millis(500)).await;
    assert!(
        leaked.is_none(),
        "another deployment's event arrived: {leaked:?}"
    );
    // The second deployment's own events still arrive (the test can fail).
    let own = second
        .send_text(&cat, dan.user_id, "for dan")
        .await
        .unwrap();
    let event = next_event(&mut dans, Duration::from_secs(2))
        .await
        .expect("dan's own message arrives")
        .unwrap();
    assert_eq!(
        crate::message_log::message_of(&event.event.unwrap()).id,
        own.id
    );
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cut_off_from_nats_ends_its_streams_keeps_serving_and_recovers_alone() {
    let (Some(nats), true) = (nats_url(), Backend::Postgres.available()) else {
        eprintln!("skipped: TEST_NATS_URL or TEST_POSTGRES_URL is not set");
        return;
    };
    let a = spawn_app_with(Backend::Postgres, |c| over_nats(c, &nats)).await;
    let (proxy_port, open) = start_proxy(host_port(&nats)).await;
    let b = a
        .spawn_sibling_with(|c| {
            over_nats(c, &format!("nats://127.0.0.1:{proxy_port}"));
            c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        })
        .await;
    let ann = a.register_and_login("ann").await;
    let bob = a.register_and_login("bob").await;
    wait_for_bus_gauge(&b, 1.0, Duration::from_secs(5)).await;

    let mut stream = b.open_stream(&bob).await.unwrap();
    let first = a
        .send_text(&ann, bob.user_id, "before the cut")
        .await
        .unwrap();
    let event = next_event(&mut stream, Duration::from_secs(2))
        .await
        .expect("delivered from A to B through NATS")
        .unwrap();
    assert_eq!(
        crate::message_log::message_of(&event.event.unwrap()).id,
        first.id
    );

    // B loses NATS: its stream ends UNAVAILABLE, never silently.
    open.send_replace(false);
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream on the cut-off instance ends");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    eprintln!("stream ended after {:?}", started.elapsed());
    wait_for_bus_gauge(&b, 0.0, Duration::from_secs(5)).await;
    // New streams are refused until the bus is back ...
    let refused = b.open_stream(&bob).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    // ... while unary calls work and health stays SERVING.
    assert_eq!(health(&b).await, ServingStatus::Serving as i32);
    b.get_me(&bob.access_token).await.unwrap();
    let sent_from_b = b
        .send_text(&bob, ann.user_id, "sent while B is cut off")
        .await;
    assert!(sent_from_b.is_ok(), "{sent_from_b:?}");
    a.send_text(&ann, bob.user_id, "during the cut")
        .await
        .unwrap();

    // Back: within 5 s, B streams again and receives A's next message.
    open.send_replace(true);
    let took = wait_for_bus_gauge(&b, 1.0, Duration::from_secs(5)).await;
    eprintln!("bus back after {took:?}");
    let mut resumed = b.open_stream(&bob).await.unwrap();
    let next = a
        .send_text(&ann, bob.user_id, "after the cut")
        .await
        .unwrap();
    let event = next_event(&mut resumed, Duration::from_secs(2))
        .await
        .expect("the resumed stream receives the next message")
        .unwrap();
    assert_eq!(
        crate::message_log::message_of(&event.event.unwrap()).id,
        next.id
    );
    wait_for_health(&b, ServingStatus::Serving, Duration::from_secs(1)).await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nats_connection_ends_streams_within_15_seconds() {
    let (Some(nats), true) = (nats_url(), Backend::Postgres.available()) else {
        eprintln!("skipped: TEST_NATS_URL or TEST_POSTGRES_URL is not set");
        return;
    };
    let a = spawn_app_with(Backend::Postgres, |c| over_nats(c, &nats)).await;
    let (proxy_port, open) = start_proxy_cutting(host_port(&nats), Cut::Silence).await;
    let b = a
        .spawn_sibling_with(|c| {
            over_nats(c, &format!("nats://127.0.0.1:{proxy_port}"));
            c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        })
        .await;
    let bob = a.register_and_login("bob").await;
    wait_for_bus_gauge(&b, 1.0, Duration::from_secs(5)).await;
    let mut stream = b.open_stream(&bob).await.unwrap();

    // The connection stays open but carries nothing: no error, no close.
    open.send_replace(false);
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("a silent bus ends the stream within 15 s");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    eprintln!("stream ended after {:?}", started.elapsed());
    wait_for_bus_gauge(&b, 0.0, Duration::from_secs(5)).await;
    assert_eq!(health(&b).await, ServingStatus::Serving as i32);

    open.send_replace(true);
    wait_for_bus_gauge(&b, 1.0, Duration::from_secs(5)).await;
    assert!(b.open_stream(&bob).await.is_ok(), "streams open again");
    b.stop().await;
    a.stop().await;
}
