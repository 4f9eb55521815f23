//! Prometheus metrics on their own listener: after known calls, a scrape
//! finds each series of the contract with the right labels and values,
//! REST and gRPC-Web calls counted under the RPC they reach.

use std::collections::HashMap;

use ai_message::proto;
use tonic::Code;

use crate::helpers::{Backend, PASSWORD, TestApp, assert_code, spawn_app_with, with_bearer};

backend_tests!(a_scrape_after_known_calls_finds_every_series_with_its_values);

/// The scrape as `series{labels} -> value`.
pub async fn scrape(app: &TestApp) -> HashMap<String, f64> {
    let port = app.metrics_port.expect("metrics are on");
    let response = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
    );
    let text = response.text().await.unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn rpc(service: &str, method: &str, kind: &str) -> String {
    format!(r#"grpc_service="aimessage.v1.{service}",grpc_method="{method}",grpc_type="{kind}""#)
}

#[track_caller]
pub fn value(scraped: &HashMap<String, f64>, series: &str) -> f64 {
    *scraped.get(series).unwrap_or_else(|| {
        panic!(
            "no series {series} in {:#?}",
            scraped.keys().collect::<Vec<_>>()
        )
    })
}

async fn a_scrape_after_known_calls_finds_every_series_with_its_values(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        c.login_account_failures = 2;
    })
    .await;
    let ivy = app.register_and_login("ivy").await;
    // GetMe three ways: gRPC, REST, gRPC-Web.
    app.get_me(&ivy.access_token).await.unwrap();
    let rest = crate::rest::Rest::new(&app);
    assert_eq!(rest.get("/auth/me", &ivy.access_token).await.status, 200);
    let (status, _, _) = crate::grpc_web::http1(
        &app,
        &format!(
            "POST /aimessage.v1.AuthService/GetMe HTTP/1.1\r\ncontent-type: application/grpc-web+proto\r\nauthorization: Bearer {}",
            ivy.access_token
        ),
        &crate::grpc_web::framed(&proto::GetMeRequest {}),
    )
    .await;
    assert_eq!(status, 200);
    // Two failed logins, then the account is throttled.
    for _ in 0..2 {
        assert_code(app.login("ivy", "wrong").await, Code::Unauthenticated);
    }
    assert_code(app.login("ivy", PASSWORD).await, Code::ResourceExhausted);
    let _stream = app.open_stream(&ivy).await.unwrap();
    let other = app.login_after_throttle("ivy").await;
    app.auth
        .clone()
        .logout(with_bearer(proto::LogoutRequest {}, &other))
        .await
        .unwrap();

    let scraped = scrape(&app).await;
    let get_me = rpc("AuthService", "GetMe", "unary");
    assert_eq!(
        value(&scraped, &format!("grpc_server_started_total{{{get_me}}}")),
        3.0
    );
    assert_eq!(
        value(
            &scraped,
            &format!(r#"grpc_server_handled_total{{{get_me},grpc_code="OK"}}"#)
        ),
        3.0
    );
    assert_eq!(
        value(
            &scraped,
            &format!("grpc_server_handling_seconds_count{{{get_me}}}")
        ),
        3.0
    );
    let login = rpc("AuthService", "Login", "unary");
    assert_eq!(
        value(
            &scraped,
            &format!(r#"grpc_server_handled_total{{{login},grpc_code="UNAUTHENTICATED"}}"#)
        ),
        2.0
    );
    assert_eq!(
        value(
            &scraped,
            &format!(r#"grpc_server_handled_total{{{login},grpc_code="RESOURCE_EXHAUSTED"}}"#)
        ),
        1.0
    );
    let stream = rpc("MessageService", "StreamMessages", "server_stream");
    assert_eq!(
        value(&scraped, &format!("grpc_server_started_total{{{stream}}}")),
        1.0
    );
    assert_eq!(
        value(
            &scraped,
            r#"ai_message_streams_open{grpc_method="StreamMessages"}"#
        ),
        1.0
    );
    assert_eq!(value(&scraped, "ai_message_login_failures_total"), 2.0);
    assert_eq!(
        value(&scraped, r#"ai_message_throttled_total{scope="account"}"#),
        1.0
    );
    assert_eq!(value(&scraped, "ai_message_load_shed_total"), 0.0);
    assert_eq!(
        value(
            &scraped,
            r#"ai_message_sessions_revoked_total{reason="logout"}"#
        ),
        1.0
    );
    assert!(value(&scraped, r#"ai_message_db_connections{state="idle"}"#) >= 0.0);
    assert!(scraped.contains_key(r#"ai_message_db_connections{state="in_use"}"#));
    assert_eq!(
        value(
            &scraped,
            &format!(
                r#"ai_message_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    // Every instance's events reach this one (SQLite has no other instance).
    assert_eq!(value(&scraped, "ai_message_event_bus_connected"), 1.0);
    assert!(value(&scraped, "process_resident_memory_bytes") > 1e6);
    assert!(value(&scraped, "process_open_fds") > 3.0);
    app.stop().await;
}
