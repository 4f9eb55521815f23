//! Property tests in the role of a fuzzer: arbitrary bytes and arbitrary
//! well-formed requests go through decoding, validation and the handlers of
//! the real server (temporary SQLite database). Whatever arrives, the answer
//! is never INTERNAL or UNKNOWN and the server keeps serving.
//!
//! More cases: `PROPTEST_CASES=20000 cargo test --test api fuzz -- --nocapture`.

use ai_message::proto;
use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};
use prost::Message as _;
use tonic::{Code, Request};

use crate::helpers::{Backend, TestApp, spawn_app_with};

/// RPCs the fuzzer leaves out because they would end its own session.
const SELF_ENDING: [&str; 3] = [
    "/aimessage.v1.AuthService/Logout",
    "/aimessage.v1.AuthService/LogoutAll",
    "/aimessage.v1.SessionService/DeleteSession",
];

struct Fuzzing {
    runtime: tokio::runtime::Runtime,
    app: TestApp,
    token: String,
}

fn start() -> Fuzzing {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (app, token) = runtime.block_on(async {
        let app = spawn_app_with(Backend::Sqlite, |c| {
            c.login_account_failures = 1_000_000;
            c.login_address_failures = 1_000_000;
        })
        .await;
        let fuzzer = app.superuser("fuzzer").await;
        app.register("peer").await;
        (app, fuzzer.access_token)
    });
    Fuzzing {
        runtime,
        app,
        token,
    }
}

impl Fuzzing {
    fn assert_still_serving(&self) {
        assert_eq!(
            self.call("/aimessage.v1.AuthService/GetMe", Vec::new()),
            Code::Ok,
            "still serving"
        );
    }

    /// Sends `body` to `path` with the fuzzer's token; returns the status code.
    fn call(&self, path: &str, body: Vec<u8>) -> Code {
        self.runtime.block_on(async {
            let mut grpc = tonic::client::Grpc::new(self.app.channel.clone());
            grpc.ready().await.unwrap();
            let mut request = Request::new(body);
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", self.token).parse().unwrap(),
            );
            let path: http::uri::PathAndQuery = path.parse().unwrap();
            let result = if path.path().ends_with("/StreamMessages") {
                grpc.server_streaming(request, path, crate::platform::RawCodec)
                    .await
                    .map(|_| ())
            } else {
                grpc.unary(request, path, crate::platform::RawCodec)
                    .await
                    .map(|_| ())
            };
            result.err().map_or(Code::Ok, |status| status.code())
        })
    }
}

fn unary_rpcs() -> Vec<String> {
    crate::hardening::all_rpcs()
        .into_iter()
        .filter(|(path, streaming)| !streaming && !SELF_ENDING.contains(&path.as_str()))
        .map(|(path, _)| path)
        .collect()
}

fn runner() -> TestRunner {
    // PROPTEST_CASES overrides the default number of cases.
    TestRunner::new(Config {
        cases: Config::default().cases.max(128),
        failure_persistence: None,
        ..Config::default()
    })
}

#[test]
fn arbitrary_bytes_to_every_rpc_never_answer_internal_or_unknown() {
    let fuzzing = start();
    let rpcs = unary_rpcs();
    let strategy = (0..rpcs.len(), prop::collection::vec(any::<u8>(), 0..512));
    runner()
        .run(&strategy, |(index, bytes)| {
            let code = fuzzing.call(&rpcs[index], bytes);
            prop_assert!(
                !matches!(code, Code::Internal | Code::Unknown),
                "{} -> {code:?}",
                rpcs[index]
            );
            Ok(())
        })
        .unwrap();
    fuzzing.assert_still_serving();
}

/// Any string, biased toward the characters validation cares about.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9_.:@ -]{0,120}",
        "[\\x00-\\x7f]{0,40}",
        "\\PC{0,300}",
    ]
}

fn id() -> impl Strategy<Value = i64> {
    prop_oneof![any::<i64>(), -3i64..20]
}

#[test]
fn arbitrary_well_formed_requests_never_answer_internal_or_unknown() {
    let fuzzing = start();
    let requests = prop_oneof![
        (text(), text(), text(), proptest::option::of(text())).prop_map(
            |(username, email, password, full_name)| {
                (
                    "/aimessage.v1.AuthService/Register",
                    proto::RegisterRequest {
                        username,
                        email,
                        password,
                        full_name,
                    }
                    .encode_to_vec(),
                )
            }
        ),
        (text(), text(), proptest::option::of(text())).prop_map(
            |(username, password, device_info)| {
                (
                    "/aimessage.v1.AuthService/Login",
                    proto::LoginRequest {
                        username,
                        password,
                        device_info,
                    }
                    .encode_to_vec(),
                )
            }
        ),
        text().prop_map(|refresh_token| (
            "/aimessage.v1.AuthService/RefreshToken",
            proto::RefreshTokenRequest { refresh_token }.encode_to_vec()
        )),
        text().prop_map(|token| (
            "/aimessage.v1.AuthService/ValidateToken",
            proto::ValidateTokenRequest {
                token,
                ..Default::default()
            }
            .encode_to_vec()
        )),
        (
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text())
        )
            .prop_map(|(email, full_name, bio)| {
                (
                    "/aimessage.v1.AuthService/UpdateMe",
                    proto::UpdateMeRequest {
                        email,
                        full_name,
                        bio,
                    }
                    .encode_to_vec(),
                )
            }),
        (any::<i32>(), text(), text()).prop_map(|(page_size, page_token, query)| {
            (
                "/aimessage.v1.UserAdminService/ListUsers",
                proto::ListUsersRequest {
                    page_size,
                    page_token,
                    query,
                }
                .encode_to_vec(),
            )
        }),
        (text(), proptest::option::of(text())).prop_map(|(name, description)| {
            (
                "/aimessage.v1.UserAdminService/CreateRole",
                proto::CreateRoleRequest { name, description }.encode_to_vec(),
            )
        }),
        (id(), prop::collection::vec(id(), 0..5)).prop_map(|(user_id, role_ids)| {
            (
                "/aimessage.v1.UserAdminService/SetUserRoles",
                proto::SetUserRolesRequest { user_id, role_ids }.encode_to_vec(),
            )
        }),
        (
            id(),
            text(),
            proptest::option::of(id()),
            proptest::option::of(text())
        )
            .prop_map(|(recipient_id, content, parent_id, conversation_id)| {
                (
                    "/aimessage.v1.MessageService/SendMessage",
                    proto::SendMessageRequest {
                        recipient_id,
                        content,
                        parent_id,
                        conversation_id,
                        request_id: None,
                    }
                    .encode_to_vec(),
                )
            }),
        (
            proptest::option::of(id()),
            proptest::option::of(text()),
            any::<bool>(),
            any::<i32>(),
            text()
        )
            .prop_map(
                |(with_user_id, conversation_id, unread_only, page_size, page_token)| {
                    (
                        "/aimessage.v1.MessageService/ListMessages",
                        proto::ListMessagesRequest {
                            with_user_id,
                            conversation_id,
                            unread_only,
                            page_size,
                            page_token,
                            parent_id: None,
                        }
                        .encode_to_vec(),
                    )
                }
            ),
        (any::<i32>(), text()).prop_map(|(page_size, page_token)| {
            (
                "/aimessage.v1.MessageService/ListConversations",
                proto::ListConversationsRequest {
                    page_size,
                    page_token,
                }
                .encode_to_vec(),
            )
        }),
        prop::collection::vec(id(), 0..1100).prop_map(|message_ids| {
            (
                "/aimessage.v1.MessageService/MarkRead",
                proto::MarkReadRequest { message_ids }.encode_to_vec(),
            )
        }),
    ];
    runner()
        .run(&requests, |(path, body)| {
            let code = fuzzing.call(path, body);
            prop_assert!(
                !matches!(code, Code::Internal | Code::Unknown),
                "{path} -> {code:?}"
            );
            Ok(())
        })
        .unwrap();
    fuzzing.assert_still_serving();
}
