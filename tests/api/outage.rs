//! The database going away and coming back, through a TCP proxy that the test
//! cuts and restores (the shared PostgreSQL server itself is never stopped).

use std::time::{Duration, Instant};

use ai_message::{config::DatabaseTarget, proto};
use tokio::{net::TcpListener, sync::watch};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{Backend, TestApp, spawn_app_with, with_bearer};

/// Forwards connections to PostgreSQL while `open` is true; closing it drops
/// every forwarded connection and refuses new ones.
async fn start_proxy(upstream: String) -> (u16, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (open_tx, open_rx) = watch::channel(true);
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let mut open = open_rx.clone();
            if !*open.borrow() {
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = open.wait_for(|open| !open) => {}
                }
            });
        }
    });
    (port, open_tx)
}

async fn health(app: &TestApp) -> i32 {
    HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_or(-1, |r| r.into_inner().status)
}

/// Waits up to `limit` for the overall health to become `status`.
async fn wait_for_health(app: &TestApp, status: ServingStatus, limit: Duration) -> Duration {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_unavailable_and_not_serving_and_recovery_needs_no_restart() {
    if !Backend::Postgres.available() {
        eprintln!("skipped: {} is not set", crate::helpers::POSTGRES_URL_VAR);
        return;
    }
    let admin_url = std::env::var(crate::helpers::POSTGRES_URL_VAR).unwrap();
    let authority = admin_url
        .split("://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let host_port = authority.rsplit('@').next().unwrap().to_owned();
    let (proxy_port, open) = start_proxy(host_port.clone()).await;
    let app = spawn_app_with(Backend::Postgres, |config| {
        if let DatabaseTarget::Postgres(url) = &config.database {
            config.database = DatabaseTarget::Postgres(
                url.replace(&host_port, &format!("127.0.0.1:{proxy_port}")),
            );
        }
    })
    .await;
    let mia = app.register_and_login("mia").await;
    assert_eq!(health(&app).await, ServingStatus::Serving as i32);

    open.send_replace(false);
    let took = wait_for_health(&app, ServingStatus::NotServing, Duration::from_secs(5)).await;
    eprintln!("NOT_SERVING after {took:?}");
    // Past the session cache's second, a call needs the database.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = Instant::now();
    let status = app
        .auth
        .clone()
        .get_me(with_bearer(proto::GetMeRequest {}, &mia.access_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
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

    open.send_replace(true);
    let took = wait_for_health(&app, ServingStatus::Serving, Duration::from_secs(5)).await;
    eprintln!("SERVING again after {took:?}");
    assert!(
        app.get_me(&mia.access_token).await.is_ok(),
        "recovered without a restart"
    );
    app.stop().await;
}
