//! What every service shares: health, reflection, message limits, the
//! services still to come, and shutdown.

use bytes::{Buf as _, BufMut as _};
use http::uri::PathAndQuery;
use tonic::{
    Code, Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use ai_message::proto;

use crate::helpers::{Backend, TestApp, assert_code, spawn_app, with_bearer};

backend_tests!(
    health_reports_serving_for_the_server_and_each_service,
    reflection_lists_the_services,
    reflection_serves_each_service_with_its_dependencies_and_http_rules,
    requests_over_4_mib_are_resource_exhausted_and_the_server_keeps_serving,
    undecodable_requests_are_invalid_argument,
    bearer_services_refuse_missing_and_forged_tokens,
    shutdown_finishes_cleanly,
    sends_in_flight_at_shutdown_are_answered_and_every_ok_one_is_stored,
);

#[tokio::test]
async fn sqlite_without_a_configured_key_keeps_a_generated_one_in_a_private_file() {
    use std::os::unix::fs::PermissionsExt as _;

    use ai_message::{
        config::{Config, DatabaseTarget},
        startup::resolve_secret_key,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(DatabaseTarget::Sqlite(Some(dir.path().join("app.db"))));
    config.secret_key = None;
    let first = resolve_secret_key(&config).unwrap();
    let file = dir.path().join("app.db.secret");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(first.len() >= 32);
    assert_eq!(
        resolve_secret_key(&config).unwrap(),
        first,
        "the same key on every start"
    );
}

async fn health_reports_serving_for_the_server_and_each_service(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut health = HealthClient::new(app.channel.clone());
    for service in [
        "",
        "aimessage.v1.AuthService",
        "aimessage.v1.UserAdminService",
        "aimessage.v1.SessionService",
        "aimessage.v1.MessageService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    app.stop().await;
}

async fn reflection_lists_the_services(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "aimessage.v1.AuthService",
        "aimessage.v1.UserAdminService",
        "aimessage.v1.SessionService",
        "aimessage.v1.MessageService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    app.stop().await;
}

/// Sends raw bytes as a request body, whatever they decode to.
#[derive(Clone, Copy, Default)]
pub(crate) struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = buf.chunk().to_vec();
        buf.advance(bytes.len());
        Ok(Some(bytes))
    }
}

/// A RegisterRequest whose `username` (field 1, wire type 2) is 5 MiB long.
pub(crate) fn oversized_register() -> Vec<u8> {
    let length = 5 * 1024 * 1024;
    let mut body = vec![0x0a];
    let mut remaining = length;
    while remaining >= 0x80 {
        body.push((remaining as u8 & 0x7f) | 0x80);
        remaining >>= 7;
    }
    body.push(remaining as u8);
    body.resize(body.len() + length, b'a');
    body
}

pub(crate) async fn call_raw(
    app: &TestApp,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.unwrap();
    grpc.unary(
        Request::new(body),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

async fn requests_over_4_mib_are_resource_exhausted_and_the_server_keeps_serving(backend: Backend) {
    let app = spawn_app(backend).await;
    let status = assert_code(
        call_raw(
            &app,
            "/aimessage.v1.AuthService/Register",
            oversized_register(),
        )
        .await,
        Code::ResourceExhausted,
    );
    assert!(!status.message().contains("tonic"));
    app.register("still-serving").await;
    app.stop().await;
}

async fn undecodable_requests_are_invalid_argument(backend: Backend) {
    let app = spawn_app(backend).await;
    for body in [vec![0xff, 0xff, 0xff, 0xff], vec![0x0a, 0x05, b'a']] {
        assert_code(
            call_raw(&app, "/aimessage.v1.AuthService/Login", body).await,
            Code::InvalidArgument,
        );
    }
    app.register("still-serving").await;
    app.stop().await;
}

async fn bearer_services_refuse_missing_and_forged_tokens(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_code(
        app.sessions
            .clone()
            .list_sessions(proto::ListSessionsRequest::default())
            .await,
        Code::Unauthenticated,
    );
    assert_code(
        app.sessions
            .clone()
            .list_sessions(with_bearer(proto::ListSessionsRequest::default(), "forged"))
            .await,
        Code::Unauthenticated,
    );
    app.stop().await;
}

async fn shutdown_finishes_cleanly(backend: Backend) {
    let app = spawn_app(backend).await;
    app.register("last-call").await;
    // `stop` fails the test unless the server returns Ok within 10 seconds.
    app.stop().await;
}

/// Sends in flight when a server shuts down: the shutdown waits for them and
/// for the group-commit writer, so every message answered OK is stored.
async fn sends_in_flight_at_shutdown_are_answered_and_every_ok_one_is_stored(backend: Backend) {
    let keeper = spawn_app(backend).await;
    let ann = keeper.register_and_login("ann").await;
    let bob = keeper.register_and_login("bob").await;
    let leaving = keeper.spawn_sibling().await;
    // The connection is up before the load starts.
    leaving
        .send_text(&ann, bob.user_id, "warm-up")
        .await
        .unwrap();
    let sends: Vec<_> = (0..200)
        .map(|i| {
            let mut messages = leaving.messages.clone();
            let token = ann.access_token.clone();
            tokio::spawn(async move {
                messages
                    .send_message(crate::helpers::with_bearer(
                        proto::SendMessageRequest {
                            recipient_id: bob.user_id,
                            content: format!("in flight {i}"),
                            parent_id: None,
                            conversation_id: None,
                            request_id: None,
                        },
                        &token,
                    ))
                    .await
                    .map(|answer| answer.into_inner().message.unwrap().id)
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    leaving.stop().await;
    let mut stored = Vec::new();
    for send in sends {
        match send.await.unwrap() {
            Ok(id) => stored.push(id),
            // Refused once the server stopped taking calls: UNAVAILABLE from
            // the server, or the client's own error for a stream the GOAWAY
            // left unprocessed (tonic calls that INTERNAL, with the transport
            // error as its source: the server never answered it).
            Err(status) => assert!(
                matches!(status.code(), Code::Unavailable | Code::Cancelled)
                    || std::error::Error::source(&status).is_some(),
                "{status:?}"
            ),
        }
    }
    eprintln!("{} of 200 answered OK before the shutdown", stored.len());
    for id in stored {
        assert_eq!(
            keeper
                .count("SELECT COUNT(*) FROM messages WHERE id = $1", id)
                .await,
            1,
            "message {id} was answered OK"
        );
    }
    keeper.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_served_when_certificate_and_key_exist() {
    use ai_message::config::TlsFiles;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};

    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_pem = certified.cert.pem();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let app = crate::helpers::spawn_app_with(Backend::Sqlite, |config| {
        config.tls = Some(TlsFiles { cert, key });
    })
    .await;

    let channel = Channel::from_shared(format!("https://localhost:{}", app.port))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(cert_pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_can_be_turned_off() {
    let app =
        crate::helpers::spawn_app_with(Backend::Sqlite, |config| config.reflection = false).await;
    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let answer = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await;
    assert_eq!(
        answer.err().map(|status| status.code()),
        Some(Code::Unimplemented)
    );
    app.register("still-works").await;
    app.stop().await;
}

/// Every RPC's REST mapping, as the API reference lists it.
const HTTP_RULES: &[(&str, &str, &str, bool)] = &[
    ("AuthService", "Register", "post /auth/register", true),
    ("AuthService", "Login", "post /auth/login", true),
    ("AuthService", "RefreshToken", "post /auth/refresh", true),
    ("AuthService", "Logout", "post /auth/logout", true),
    ("AuthService", "LogoutAll", "post /auth/logout-all", true),
    ("AuthService", "GetMe", "get /auth/me", false),
    ("AuthService", "UpdateMe", "put /auth/me", true),
    (
        "AuthService",
        "ChangePassword",
        "put /auth/me/password",
        true,
    ),
    ("AuthService", "ValidateToken", "post /auth/validate", true),
    (
        "AuthService",
        "ValidateTokens",
        "post /auth/validate:batch",
        true,
    ),
    (
        "AuthService",
        "GetJwks",
        "get /.well-known/jwks.json",
        false,
    ),
    (
        "AuthService",
        "WatchRevocations",
        "get /auth/revocations:watch",
        false,
    ),
    ("UserAdminService", "ListUsers", "get /auth/users", false),
    (
        "UserAdminService",
        "GetUser",
        "get /auth/users/{user_id}",
        false,
    ),
    ("UserAdminService", "CreateUser", "post /auth/users", true),
    (
        "UserAdminService",
        "DeleteUser",
        "delete /auth/users/{user_id}",
        false,
    ),
    (
        "UserAdminService",
        "DisableUser",
        "put /auth/users/{user_id}/disable",
        true,
    ),
    (
        "UserAdminService",
        "EnableUser",
        "put /auth/users/{user_id}/enable",
        true,
    ),
    (
        "UserAdminService",
        "SetSuperuser",
        "put /auth/users/{user_id}/superuser",
        true,
    ),
    (
        "UserAdminService",
        "SetUserRoles",
        "put /auth/users/{user_id}/roles",
        true,
    ),
    (
        "UserAdminService",
        "GetUserRoles",
        "get /auth/users/{user_id}/roles",
        false,
    ),
    ("UserAdminService", "ListRoles", "get /auth/roles", false),
    ("UserAdminService", "CreateRole", "post /auth/roles", true),
    (
        "UserAdminService",
        "DeleteRole",
        "delete /auth/roles/{role_id}",
        false,
    ),
    (
        "SessionService",
        "ListSessions",
        "get /auth/sessions",
        false,
    ),
    (
        "SessionService",
        "DeleteSession",
        "delete /auth/sessions/{session_id}",
        false,
    ),
    ("MessageService", "SendMessage", "post /messages", true),
    (
        "MessageService",
        "GetMessage",
        "get /messages/{message_id}",
        false,
    ),
    ("MessageService", "ListMessages", "get /messages", false),
    (
        "MessageService",
        "ListConversations",
        "get /conversations",
        false,
    ),
    (
        "MessageService",
        "MarkRead",
        "post /messages:markRead",
        true,
    ),
    (
        "MessageService",
        "DeleteMessage",
        "delete /messages/{message_id}",
        false,
    ),
    (
        "MessageService",
        "StreamMessages",
        "get /messages:stream",
        false,
    ),
    (
        "MessageService",
        "EditMessage",
        "patch /messages/{message_id}",
        true,
    ),
    (
        "MessageService",
        "GetUnreadCount",
        "get /messages:unreadCount",
        false,
    ),
    (
        "MessageService",
        "MarkConversationRead",
        "post /conversations:markRead",
        true,
    ),
    (
        "MessageService",
        "SearchMessages",
        "get /messages:search",
        false,
    ),
];

/// One reflection answer for `symbol`: the files it carries, raw.
async fn files_for_symbol(app: &TestApp, symbol: &str) -> Vec<Vec<u8>> {
    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_owned())),
    };
    let response = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("expected files for {symbol}, got {response:?}");
    };
    files.file_descriptor_proto
}

/// Each service fetched by reflection alone builds a descriptor pool (the
/// answer carries every dependency), and every RPC's `google.api.http` rule
/// is the one the API reference lists.
async fn reflection_serves_each_service_with_its_dependencies_and_http_rules(backend: Backend) {
    use prost_reflect::{DescriptorPool, Value};
    let app = spawn_app(backend).await;
    let mut checked = 0;
    for service in [
        "AuthService",
        "UserAdminService",
        "SessionService",
        "MessageService",
    ] {
        let files = files_for_symbol(&app, &format!("aimessage.v1.{service}")).await;
        // A FileDescriptorSet made of the raw answers (field 1, repeated), so
        // that options are kept.
        let mut encoded = Vec::new();
        for raw in &files {
            prost::encoding::encode_key(
                1,
                prost::encoding::WireType::LengthDelimited,
                &mut encoded,
            );
            prost::encoding::encode_varint(raw.len() as u64, &mut encoded);
            encoded.extend_from_slice(raw);
        }
        let pool = DescriptorPool::decode(encoded.as_slice())
            .unwrap_or_else(|e| panic!("{service} does not build a pool alone: {e}"));
        let http = pool.get_extension_by_name("google.api.http").unwrap();
        let descriptor = pool
            .get_service_by_name(&format!("aimessage.v1.{service}"))
            .unwrap();
        for method in descriptor.methods() {
            let options = method.options();
            let rule = options.get_extension(&http);
            let rule = rule.as_message().unwrap();
            let route = ["get", "put", "post", "delete", "patch"]
                .into_iter()
                .find_map(|verb| match rule.get_field_by_name(verb).as_deref() {
                    Some(Value::String(path)) if !path.is_empty() => Some(format!("{verb} {path}")),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{} has no HTTP rule", method.full_name()));
            let body = rule
                .get_field_by_name("body")
                .and_then(|b| b.as_str().map(str::to_owned))
                .unwrap_or_default();
            let expected = HTTP_RULES
                .iter()
                .find(|(s, m, _, _)| *s == service && *m == method.name())
                .unwrap_or_else(|| panic!("{} is not in the table", method.full_name()));
            assert_eq!(route, expected.2, "{}", method.full_name());
            assert_eq!(body == "*", expected.3, "{} body", method.full_name());
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        HTTP_RULES.len(),
        "every RPC of the table was served"
    );
    // Error details decode too.
    assert!(
        !files_for_symbol(&app, "google.rpc.BadRequest")
            .await
            .is_empty()
    );
    app.stop().await;
}
