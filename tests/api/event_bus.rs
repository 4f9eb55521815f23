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
    helpers::{Backend, Cut, TestApp, nats_url, spawn_app_with, start_proxy_cutting},
    metrics::{scrape, value},
    outage::{assert_next_event_is, health, stream_end_status, wait_for_health},
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

    let for_bob = first
        .send_text(&ann, bob.user_id, "for bob only")
        .await
        .unwrap();
    assert_next_event_is(&mut bobs, &for_bob, "the first deployment's own stream").await;
    let leaked = tokio::time::timeout(Duration::from_millis(500), dans.message()).await;
    assert!(
        leaked.is_err(),
        "another deployment's event arrived: {leaked:?}"
    );
    // The second deployment's own events still arrive (the test can fail).
    let own = second
        .send_text(&cat, dan.user_id, "for dan")
        .await
        .unwrap();
    assert_next_event_is(&mut dans, &own, "dan's own message").await;
    first.stop().await;
    second.stop().await;
}

/// Instance A on NATS directly, and B, its sibling with metrics on, through
/// a proxy that cuts the way `cut` says; `None` where PostgreSQL or NATS is
/// not configured. The proxy's switch comes third.
async fn pair_with_b_behind_a_proxy(
    cut: Cut,
) -> Option<(TestApp, TestApp, tokio::sync::watch::Sender<bool>)> {
    let (Some(nats), true) = (nats_url(), Backend::Postgres.available()) else {
        eprintln!("skipped: TEST_NATS_URL or TEST_POSTGRES_URL is not set");
        return None;
    };
    let a = spawn_app_with(Backend::Postgres, |c| over_nats(c, &nats)).await;
    let (proxy_port, open) = start_proxy_cutting(host_port(&nats), cut).await;
    let b = a
        .spawn_sibling_with(|c| {
            over_nats(c, &format!("nats://127.0.0.1:{proxy_port}"));
            c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        })
        .await;
    Some((a, b, open))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cut_off_from_nats_ends_its_streams_keeps_serving_and_recovers_alone() {
    let Some((a, b, open)) = pair_with_b_behind_a_proxy(Cut::Close).await else {
        return;
    };
    let ann = a.register_and_login("ann").await;
    let bob = a.register_and_login("bob").await;
    wait_for_bus_gauge(&b, 1.0, Duration::from_secs(5)).await;

    let mut stream = b.open_stream(&bob).await.unwrap();
    let first = a
        .send_text(&ann, bob.user_id, "before the cut")
        .await
        .unwrap();
    assert_next_event_is(&mut stream, &first, "delivered from A to B through NATS").await;

    // B loses NATS: its stream ends UNAVAILABLE, never silently.
    open.send_replace(false);
    let ended = stream_end_status(&mut stream, "the stream on the cut-off instance").await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
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
    assert_next_event_is(&mut resumed, &next, "the resumed stream").await;
    wait_for_health(&b, ServingStatus::Serving, Duration::from_secs(1)).await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nats_connection_ends_streams_within_15_seconds() {
    let Some((a, b, open)) = pair_with_b_behind_a_proxy(Cut::Silence).await else {
        return;
    };
    let bob = a.register_and_login("bob").await;
    wait_for_bus_gauge(&b, 1.0, Duration::from_secs(5)).await;
    let mut stream = b.open_stream(&bob).await.unwrap();

    // The connection stays open but carries nothing: no error, no close.
    open.send_replace(false);
    let ended = stream_end_status(&mut stream, "the stream on a silent bus").await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    wait_for_bus_gauge(&b, 0.0, Duration::from_secs(5)).await;
    assert_eq!(health(&b).await, ServingStatus::Serving as i32);

    open.send_replace(true);
    wait_for_bus_gauge(&b, 1.0, Duration::from_secs(5)).await;
    assert!(b.open_stream(&bob).await.is_ok(), "streams open again");
    b.stop().await;
    a.stop().await;
}
