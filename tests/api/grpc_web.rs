//! gRPC-Web on the same port (HTTP/1.1, `application/grpc-web+proto`), CORS
//! for browsers (nothing allowed unless configured), and plain HTTP:
//! `GET /health` and the 404 of an unknown path.

use ai_message::{config::CorsOrigins, proto};
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::{Backend, TestApp, spawn_app, spawn_app_with};

backend_tests!(
    a_grpc_web_call_over_http1_gets_the_native_answer,
    health_over_plain_http_follows_grpc_health_and_unknown_paths_are_404,
);

/// One HTTP/1.1 exchange on a fresh connection: status, headers (lower-case
/// names) and the de-chunked body.
pub async fn http1(
    app: &TestApp,
    head: &str,
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .unwrap();
    let request = format!(
        "{head}\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(answer[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let mut raw = &answer[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if !chunked {
        return (status, headers, raw.to_vec());
    }
    let mut body = Vec::new();
    loop {
        let end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return (status, headers, body);
        }
        body.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 2 + size + 2..];
    }
}

pub fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[track_caller]
fn assert_no_cors_headers(headers: &[(String, String)]) {
    assert!(
        headers
            .iter()
            .all(|(n, _)| !n.starts_with("access-control-")),
        "{headers:?}"
    );
}

/// The message frame and the trailer frame of a gRPC-Web body.
fn grpc_web_frames(body: &[u8]) -> (Vec<u8>, String) {
    let (mut message, mut trailers) = (Vec::new(), String::new());
    let mut rest = body;
    while rest.len() >= 5 {
        let length = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let frame = &rest[5..5 + length];
        if rest[0] & 0x80 == 0 {
            message = frame.to_vec();
        } else {
            trailers = String::from_utf8(frame.to_vec()).unwrap();
        }
        rest = &rest[5 + length..];
    }
    (message, trailers)
}

pub fn framed(message: &impl prost::Message) -> Vec<u8> {
    let bytes = message.encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&bytes);
    frame
}

async fn a_grpc_web_call_over_http1_gets_the_native_answer(backend: Backend) {
    let app = spawn_app(backend).await;
    let mia = app.register_and_login("mia").await;
    let native = app.get_me(&mia.access_token).await.unwrap();

    let (status, headers, body) = http1(
        &app,
        &format!(
            "POST /aimessage.v1.AuthService/GetMe HTTP/1.1\r\ncontent-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\nauthorization: Bearer {}",
            mia.access_token
        ),
        &framed(&proto::GetMeRequest {}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        header(&headers, "content-type").is_some_and(|v| v.starts_with("application/grpc-web")),
        "{headers:?}"
    );
    let (message, trailers) = grpc_web_frames(&body);
    assert!(trailers.contains("grpc-status:0"), "{trailers:?}");
    let web = proto::GetMeResponse::decode(message.as_slice())
        .unwrap()
        .user
        .unwrap();
    assert_eq!(web, native);

    // An error travels the same way: a bad token is UNAUTHENTICATED (16).
    let (status, headers, body) = http1(
        &app,
        "POST /aimessage.v1.AuthService/GetMe HTTP/1.1\r\ncontent-type: application/grpc-web+proto\r\nauthorization: Bearer forged",
        &framed(&proto::GetMeRequest {}),
    )
    .await;
    assert_eq!(status, 200);
    let in_headers = header(&headers, "grpc-status") == Some("16");
    let in_trailers = grpc_web_frames(&body).1.contains("grpc-status:16");
    assert!(in_headers || in_trailers, "{headers:?} {body:?}");
    // No CORS header unless configured.
    assert_no_cors_headers(&headers);
    app.stop().await;
}

const PREFLIGHT: &str = "OPTIONS /aimessage.v1.AuthService/GetMe HTTP/1.1\r\naccess-control-request-method: POST\r\naccess-control-request-headers: content-type,x-grpc-web,authorization";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_is_answered_for_an_allowed_origin_only() {
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.cors_origins = CorsOrigins::List(vec!["https://app.example".into()]);
    })
    .await;
    let (status, headers, _) = http1(
        &app,
        &format!("{PREFLIGHT}\r\norigin: https://app.example"),
        b"",
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("https://app.example")
    );
    let allowed = header(&headers, "access-control-allow-headers").unwrap();
    for name in [
        "authorization",
        "content-type",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
    ] {
        assert!(allowed.contains(name), "{name} in {allowed}");
    }
    assert!(header(&headers, "access-control-allow-methods").is_some_and(|m| m.contains("POST")));
    assert!(header(&headers, "access-control-max-age").is_some());

    // A real call from the allowed origin exposes the gRPC status headers.
    let (_, headers, _) = http1(
        &app,
        "POST /grpc.health.v1.Health/Check HTTP/1.1\r\ncontent-type: application/grpc-web+proto\r\norigin: https://app.example",
        &framed(&tonic_health::pb::HealthCheckRequest::default()),
    )
    .await;
    assert!(
        header(&headers, "access-control-expose-headers")
            .is_some_and(|e| e.contains("grpc-status")),
        "{headers:?}"
    );

    // Another origin gets no Access-Control header at all.
    let (_, headers, _) = http1(
        &app,
        &format!("{PREFLIGHT}\r\norigin: https://evil.example"),
        b"",
    )
    .await;
    assert_no_cors_headers(&headers);
    app.stop().await;

    // By default no origin is allowed.
    let app = spawn_app(Backend::Sqlite).await;
    let (_, headers, _) = http1(
        &app,
        &format!("{PREFLIGHT}\r\norigin: https://app.example"),
        b"",
    )
    .await;
    assert_no_cors_headers(&headers);
    app.stop().await;
}

async fn health_over_plain_http_follows_grpc_health_and_unknown_paths_are_404(backend: Backend) {
    let app = spawn_app(backend).await;
    let (status, headers, body) = http1(&app, "GET /health HTTP/1.1", b"").await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body, serde_json::json!({"status": "SERVING"}));

    let (status, headers, _) = http1(&app, "POST /health HTTP/1.1", b"").await;
    assert_eq!(status, 405);
    assert_eq!(header(&headers, "allow"), Some("GET"));

    let (status, _, body) = http1(&app, "GET /no/such/route HTTP/1.1", b"").await;
    assert_eq!(status, 404);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["code"], 5);
    assert!(body["message"].as_str().unwrap().contains("/no/such/route"));
    assert_eq!(body["details"], serde_json::json!([]));
    app.stop().await;
}
