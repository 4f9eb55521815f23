//! REST/JSON on the gRPC port, over plain HTTP/1.1 with a real HTTP client
//! (reqwest): the original backend's flows, every route of the OpenAPI
//! document, the status table with its exact error body, the JSON choices,
//! streamed events as NDJSON and SSE, and REST and gRPC seeing one state.

use std::time::{Duration, Instant};

use ai_message::proto;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tonic::Code;

use crate::helpers::{
    Backend, LoggedIn, PASSWORD, TestApp, spawn_app, spawn_app_with, with_bearer,
};

backend_tests!(
    the_original_backends_python_example_works_unchanged,
    every_route_of_the_openapi_document_answers_through_rest,
    json_answers_use_proto_names_string_int64s_printed_defaults_and_no_unset_optionals,
    requests_take_lower_camel_names_and_int64s_as_numbers_or_strings,
    malformed_json_and_wrong_types_are_400_naming_the_field,
    a_missing_or_bad_token_is_401_with_www_authenticate,
    a_normal_user_on_an_admin_route_is_403,
    unknown_paths_and_unknown_records_are_404,
    a_known_path_under_another_method_is_405_with_allow,
    a_taken_username_is_409,
    a_body_over_4_mib_is_413_and_the_server_keeps_serving,
    throttled_logins_are_429,
    a_streamed_event_arrives_as_ndjson_and_as_sse,
    a_stream_whose_session_ends_closes_with_an_error_line,
    rest_and_grpc_see_the_same_messages,
    logout_over_rest_is_enforced_over_grpc_and_the_reverse,
    rest_logins_record_the_user_agent_and_the_peer_address,
    a_trusted_proxy_forwards_the_client_address_over_rest,
    rest_is_served_over_http2_too,
    the_revocation_feed_streams_as_ndjson,
);

/// A REST client for one test server.
pub struct Rest {
    client: reqwest::Client,
    base: String,
}

/// One REST answer: status, headers and the JSON body (`Null` if none).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The gRPC code of an error body.
    pub fn code(&self) -> i64 {
        self.body["code"].as_i64().unwrap_or(0)
    }

    /// Asserts the exact error shape: `status`, `{code, message, details}`
    /// and nothing else, `application/json`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: Code) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        let fields = self.body.as_object().expect("an error body is an object");
        let mut keys: Vec<&str> = fields.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["code", "details", "message"], "{self:?}");
        assert_eq!(self.code(), code as i64, "{self:?}");
        assert!(
            !self.body["message"].as_str().unwrap().is_empty(),
            "{self:?}"
        );
        assert!(self.body["details"].is_array(), "{self:?}");
    }

    /// The `@type`d detail of an error body.
    pub fn detail(&self, type_name: &str) -> Option<&Value> {
        let url = format!("type.googleapis.com/{type_name}");
        self.body["details"]
            .as_array()?
            .iter()
            .find(|detail| detail["@type"] == url.as_str())
    }
}

impl Rest {
    pub fn new(app: &TestApp) -> Self {
        Self {
            client: reqwest::Client::builder()
                .http1_only()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            base: format!("http://127.0.0.1:{}", app.port),
        }
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request
    }

    pub async fn send(request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    /// `method path` with an optional bearer and JSON body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut request = self.request(method, path, token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        Self::send(request).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.call("GET", path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Answer {
        self.call("POST", path, token, Some(body)).await
    }

    /// Registers and logs in over REST.
    pub async fn register_and_login(&self, username: &str) -> LoggedIn {
        let registered = self
            .post(
                "/auth/register",
                None,
                json!({"username": username, "email": format!("{username}@example.com"), "password": PASSWORD}),
            )
            .await;
        assert_eq!(registered.status, 200, "{registered:?}");
        let login = self
            .post(
                "/auth/login",
                None,
                json!({"username": username, "password": PASSWORD}),
            )
            .await;
        assert_eq!(login.status, 200, "{login:?}");
        LoggedIn {
            user_id: id(&registered.body["user"]["id"]),
            access_token: login.body["access_token"].as_str().unwrap().to_owned(),
            refresh_token: login.body["refresh_token"].as_str().unwrap().to_owned(),
            session_id: id(&login.body["session_id"]),
        }
    }
}

/// A 64-bit id printed as a JSON string.
#[track_caller]
pub fn id(value: &Value) -> i64 {
    value
        .as_str()
        .unwrap_or_else(|| panic!("64-bit integers are strings: {value}"))
        .parse()
        .unwrap()
}

async fn the_original_backends_python_example_works_unchanged(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    // requests.post(".../auth/register", json={...})
    let registered = rest
        .post(
            "/auth/register",
            None,
            json!({"username": "alice", "email": "alice@example.com", "password": PASSWORD, "full_name": "Alice"}),
        )
        .await;
    assert_eq!(registered.status, 200, "{registered:?}");
    assert_eq!(registered.body["user"]["username"], "alice");
    // token = requests.post(".../auth/login", json={...}).json()["access_token"]
    let login = rest
        .post(
            "/auth/login",
            None,
            json!({"username": "alice", "password": PASSWORD}),
        )
        .await;
    assert_eq!(login.status, 200);
    assert_eq!(login.header("content-type"), Some("application/json"));
    assert_eq!(login.body["token_type"], "bearer");
    let token = login.body["access_token"].as_str().unwrap().to_owned();
    let refresh = login.body["refresh_token"].as_str().unwrap().to_owned();
    // requests.get(".../auth/me", headers={"Authorization": f"Bearer {token}"})
    let me = rest.get("/auth/me", &token).await;
    assert_eq!(me.status, 200);
    assert_eq!(me.body["user"]["username"], "alice");
    assert_eq!(me.body["user"]["full_name"], "Alice");

    let refreshed = rest
        .post("/auth/refresh", None, json!({"refresh_token": refresh}))
        .await;
    assert_eq!(refreshed.status, 200, "{refreshed:?}");
    let token = refreshed.body["access_token"].as_str().unwrap().to_owned();
    assert_ne!(refreshed.body["refresh_token"], json!(refresh), "rotated");
    let spent = rest
        .post("/auth/refresh", None, json!({"refresh_token": refresh}))
        .await;
    spent.assert_error(401, Code::Unauthenticated);

    // A spent refresh token revoked the session: log in again.
    let login = rest
        .post(
            "/auth/login",
            None,
            json!({"username": "alice@example.com", "password": PASSWORD}),
        )
        .await;
    assert_eq!(login.status, 200);
    let token_after = login.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(rest.get("/auth/me", &token).await.status, 401);
    let logout = rest
        .post("/auth/logout", Some(&token_after), json!({}))
        .await;
    assert_eq!((logout.status, &logout.body), (200, &json!({})));
    rest.get("/auth/me", &token_after)
        .await
        .assert_error(401, Code::Unauthenticated);
    app.stop().await;
}

/// Whether `path` fits the OpenAPI path template `template`.
fn fits(template: &str, path: &str) -> bool {
    let path = path.split('?').next().unwrap();
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| t == p || (t.starts_with('{') && t.ends_with('}') && !p.is_empty()))
}

async fn every_route_of_the_openapi_document_answers_through_rest(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    let root = app.superuser("root").await;
    let bob = rest.register_and_login("bob").await;
    let carl = rest.register_and_login("carl").await;
    let (r, b, c) = (
        Some(root.access_token.as_str()),
        Some(bob.access_token.as_str()),
        Some(carl.access_token.as_str()),
    );
    let mut answered: Vec<(String, String)> = Vec::new();
    macro_rules! ok {
        ($method:expr, $path:expr, $token:expr, $body:expr) => {{
            let path: String = $path;
            let answer = rest.call($method, &path, $token, $body).await;
            assert_eq!(answer.status, 200, "{} {path}: {answer:?}", $method);
            answered.push(($method.to_owned(), path));
            answer
        }};
    }
    // AuthService
    let created = ok!(
        "POST",
        "/auth/register".into(),
        None,
        Some(json!({"username": "dora", "email": "dora@example.com", "password": PASSWORD}))
    );
    let dora = id(&created.body["user"]["id"]);
    let login = ok!(
        "POST",
        "/auth/login".into(),
        None,
        Some(json!({"username": "dora", "password": PASSWORD}))
    );
    let dora_token = login.body["access_token"].as_str().unwrap().to_owned();
    let d = Some(dora_token.as_str());
    ok!(
        "POST",
        "/auth/refresh".into(),
        None,
        Some(json!({"refresh_token": login.body["refresh_token"]}))
    );
    ok!("GET", "/auth/me".into(), b, None);
    let updated = ok!("PUT", "/auth/me".into(), b, Some(json!({"bio": "hi"})));
    assert_eq!(updated.body["user"]["bio"], "hi");
    ok!(
        "PUT",
        "/auth/me/password".into(),
        b,
        Some(json!({"current_password": PASSWORD, "new_password": "a brand new passphrase"}))
    );
    let validated = ok!(
        "POST",
        "/auth/validate".into(),
        None,
        Some(json!({"token": bob.access_token}))
    );
    assert_eq!(validated.body["active"], true);
    let batch = ok!(
        "POST",
        "/auth/validate:batch".into(),
        None,
        Some(json!({"tokens": [bob.access_token, "junk"]}))
    );
    assert_eq!(batch.body["results"][1]["active"], false);
    let keys = ok!("GET", "/.well-known/jwks.json".into(), None, None);
    assert!(keys.body["keys"].is_array());
    assert_eq!(keys.header("cache-control"), Some("max-age=300"));
    let feed = rest
        .request("GET", "/auth/revocations:watch", r)
        .send()
        .await
        .unwrap();
    assert_eq!(feed.status(), 200);
    drop(feed);
    answered.push(("GET".into(), "/auth/revocations:watch".into()));
    // MessageService
    let sent = ok!(
        "POST",
        "/messages".into(),
        b,
        Some(json!({"recipient_id": carl.user_id, "content": "hello carl"}))
    );
    let message = id(&sent.body["message"]["id"]);
    ok!("GET", format!("/messages/{message}"), c, None);
    ok!(
        "GET",
        format!("/messages?with_user_id={}", bob.user_id),
        c,
        None
    );
    ok!("GET", "/conversations".into(), c, None);
    let read = ok!(
        "POST",
        "/messages:markRead".into(),
        c,
        Some(json!({"message_ids": [message]}))
    );
    assert_eq!(read.body["updated_count"], 1);
    let edited = ok!(
        "PATCH",
        format!("/messages/{message}"),
        b,
        Some(json!({"content": "hello again, carl"}))
    );
    assert_eq!(edited.body["message"]["content"], "hello again, carl");
    assert!(edited.body["message"]["edited_at"].is_string());
    let found = ok!("GET", "/messages:search?query=AGAIN".into(), c, None);
    assert_eq!(found.body["messages"][0]["id"], sent.body["message"]["id"]);
    ok!(
        "POST",
        "/messages".into(),
        b,
        Some(json!({"recipient_id": carl.user_id, "content": "unread", "request_id": "r-1"}))
    );
    let unread = ok!("GET", "/messages:unreadCount".into(), c, None);
    assert_eq!(unread.body["total"], "1");
    let marked = ok!(
        "POST",
        "/conversations:markRead".into(),
        c,
        Some(json!({
            "conversation_id": sent.body["message"]["conversation_id"],
            "other_user_id": bob.user_id,
        }))
    );
    assert_eq!(marked.body["updated_count"], 1);
    ok!("DELETE", format!("/messages/{message}"), b, None);
    // The stream answers 200 with its headers; reading it is tested below.
    let stream = rest
        .request("GET", "/messages:stream", c)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    drop(stream);
    answered.push(("GET".into(), "/messages:stream".into()));
    // SessionService
    let sessions = ok!("GET", "/auth/sessions".into(), d, None);
    assert_eq!(sessions.body["sessions"].as_array().unwrap().len(), 1);
    let spare = app.login("dora", PASSWORD).await.unwrap().session_id;
    ok!("DELETE", format!("/auth/sessions/{spare}"), d, None);
    // UserAdminService
    let listed = ok!("GET", "/auth/users?page_size=2".into(), r, None);
    assert_eq!(listed.body["users"].as_array().unwrap().len(), 2);
    ok!("GET", format!("/auth/users/{dora}"), r, None);
    let made = ok!(
        "POST",
        "/auth/users".into(),
        r,
        Some(json!({"username": "eve", "email": "eve@example.com", "password": PASSWORD}))
    );
    let eve = id(&made.body["user"]["id"]);
    ok!(
        "PUT",
        format!("/auth/users/{dora}/disable"),
        r,
        Some(json!({}))
    );
    ok!("PUT", format!("/auth/users/{dora}/enable"), r, None);
    ok!(
        "PUT",
        format!("/auth/users/{dora}/superuser"),
        r,
        Some(json!({"is_superuser": true}))
    );
    let role = ok!(
        "POST",
        "/auth/roles".into(),
        r,
        Some(json!({"name": "editor"}))
    );
    let role = id(&role.body["role"]["id"]);
    ok!(
        "PUT",
        format!("/auth/users/{dora}/roles"),
        r,
        Some(json!({"role_ids": [role]}))
    );
    let roles = ok!("GET", format!("/auth/users/{dora}/roles"), r, None);
    assert_eq!(roles.body["roles"][0]["name"], "editor");
    ok!("GET", "/auth/roles".into(), r, None);
    ok!("DELETE", format!("/auth/roles/{role}"), r, None);
    ok!("DELETE", format!("/auth/users/{eve}"), r, None);
    // The session-ending calls last.
    let revoked = ok!("POST", "/auth/logout-all".into(), b, None);
    assert!(revoked.body["revoked_sessions"].as_i64().unwrap() >= 1);
    ok!("POST", "/auth/logout".into(), c, None);

    let document = rest.call("GET", "/openapi.json", None, None).await;
    assert_eq!(document.status, 200);
    assert_eq!(document.body["openapi"], "3.1.0");
    let mut missing = Vec::new();
    for (template, operations) in document.body["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            let method = method.to_ascii_uppercase();
            if template == "/health" {
                continue;
            }
            if !answered
                .iter()
                .any(|(m, path)| *m == method && fits(template, path))
            {
                missing.push(format!("{method} {template}"));
            }
        }
    }
    assert!(missing.is_empty(), "routes never called: {missing:?}");
    assert!(answered.len() >= 33, "every RPC at least once");
    app.stop().await;
}

async fn json_answers_use_proto_names_string_int64s_printed_defaults_and_no_unset_optionals(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    let bob = rest.register_and_login("bob").await;
    let me = rest.get("/auth/me", &bob.access_token).await;
    let user = me.body["user"].as_object().unwrap();
    assert_eq!(
        user["id"],
        json!(bob.user_id.to_string()),
        "int64 as a string"
    );
    assert_eq!(user["is_superuser"], json!(false), "defaults are printed");
    assert_eq!(user["roles"], json!([]));
    assert!(
        user.contains_key("is_active") && !user.contains_key("isActive"),
        "proto names"
    );
    assert!(
        !user.contains_key("full_name") && !user.contains_key("bio"),
        "unset optionals absent"
    );
    let created = user["created_at"].as_str().unwrap();
    assert!(
        created.ends_with('Z') && created.contains('T'),
        "RFC 3339 in UTC: {created}"
    );
    // A message field left unset is absent, one set is an object.
    let sent = rest
        .post(
            "/messages",
            Some(&bob.access_token),
            json!({"recipient_id": bob.user_id, "content": "note"}),
        )
        .await;
    let message = sent.body["message"].as_object().unwrap();
    assert!(!message.contains_key("read_at") && !message.contains_key("parent_id"));
    assert_eq!(message["is_read"], json!(false));
    // "Nothing else" through REST: every other field holds its default.
    let inactive = rest
        .post("/auth/validate", None, json!({"token": "not a token"}))
        .await;
    assert_eq!(inactive.status, 200);
    assert_eq!(inactive.body["active"], json!(false));
    assert_eq!(inactive.body["user_id"], json!("0"));
    assert_eq!(inactive.body["roles"], json!([]));
    assert!(inactive.body.get("expires_at").is_none());
    app.stop().await;
}

async fn requests_take_lower_camel_names_and_int64s_as_numbers_or_strings(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    let bob = rest.register_and_login("bob").await;
    let carl = rest.register_and_login("carl").await;
    let token = Some(bob.access_token.as_str());
    let mut sent_ids = Vec::new();
    for (i, body) in [
        json!({"recipient_id": carl.user_id, "content": "as a number"}),
        json!({"recipientId": carl.user_id.to_string(), "content": "as a string, lowerCamel", "ignored": true}),
    ]
    .into_iter()
    .enumerate()
    {
        let sent = rest.post("/messages", token, body).await;
        assert_eq!(sent.status, 200, "body {i}: {sent:?}");
        assert_eq!(sent.body["message"]["recipient_id"], json!(carl.user_id.to_string()));
        sent_ids.push(id(&sent.body["message"]["id"]));
    }
    // Query parameters by either name; unknown ones are ignored.
    for query in [
        format!("with_user_id={}&page_size=1", carl.user_id),
        format!("withUserId={}&pageSize=1&nonsense=3", carl.user_id),
    ] {
        let listed = rest
            .get(&format!("/messages?{query}"), &bob.access_token)
            .await;
        assert_eq!(listed.status, 200, "{query}: {listed:?}");
        assert_eq!(
            listed.body["messages"].as_array().unwrap().len(),
            1,
            "{query}"
        );
        assert!(!listed.body["next_page_token"].as_str().unwrap().is_empty());
    }
    // A list of 64-bit integers may mix both forms.
    let read = rest
        .post(
            "/messages:markRead",
            Some(&carl.access_token),
            json!({"messageIds": [sent_ids[0].to_string(), sent_ids[1]]}),
        )
        .await;
    assert_eq!(read.status, 200, "{read:?}");
    assert_eq!(read.body["updated_count"], 2);
    app.stop().await;
}

async fn malformed_json_and_wrong_types_are_400_naming_the_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    let bob = rest.register_and_login("bob").await;
    let send = |body: &'static str| {
        Rest::send(
            rest.request("POST", "/messages", Some(&bob.access_token))
                .header("content-type", "application/json")
                .body(body),
        )
    };
    let malformed = send("{\"content\": ").await;
    malformed.assert_error(400, Code::InvalidArgument);
    let wrong_type = send(r#"{"recipient_id": "seven", "content": "x"}"#).await;
    wrong_type.assert_error(400, Code::InvalidArgument);
    let violation = &wrong_type.detail("google.rpc.BadRequest").unwrap()["field_violations"][0];
    assert_eq!(violation["field"], "recipient_id");
    assert!(
        wrong_type.body["message"]
            .as_str()
            .unwrap()
            .contains("recipient_id")
    );
    // A path variable that is not a valid value of its field.
    let bad_path = rest.get("/messages/twelve", &bob.access_token).await;
    bad_path.assert_error(400, Code::InvalidArgument);
    assert_eq!(
        bad_path.detail("google.rpc.BadRequest").unwrap()["field_violations"][0]["field"],
        "message_id"
    );
    // The service's own validation, with the same detail as over gRPC.
    let short = rest
        .post(
            "/auth/register",
            None,
            json!({"username": "x", "email": "nope", "password": "short"}),
        )
        .await;
    short.assert_error(400, Code::InvalidArgument);
    let fields: Vec<&str> = short.detail("google.rpc.BadRequest").unwrap()["field_violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["username", "email", "password"]);
    app.stop().await;
}

async fn a_missing_or_bad_token_is_401_with_www_authenticate(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    for token in [None, Some("forged.token.here")] {
        let answer = rest.call("GET", "/auth/me", token, None).await;
        answer.assert_error(401, Code::Unauthenticated);
        assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
    }
    // Every route but the public four refuses a call without a token.
    let document = rest.call("GET", "/openapi.json", None, None).await;
    let mut checked = 0;
    for (template, operations) in document.body["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            if operation["security"] == json!([]) {
                continue;
            }
            let path: Vec<&str> = template
                .split('/')
                .map(|segment| {
                    if segment.starts_with('{') {
                        "1"
                    } else {
                        segment
                    }
                })
                .collect();
            let answer = rest
                .call(&method.to_ascii_uppercase(), &path.join("/"), None, None)
                .await;
            answer.assert_error(401, Code::Unauthenticated);
            checked += 1;
        }
    }
    assert_eq!(checked, 37 - 6);
    app.stop().await;
}

async fn a_normal_user_on_an_admin_route_is_403(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    let bob = rest.register_and_login("bob").await;
    rest.get("/auth/users", &bob.access_token)
        .await
        .assert_error(403, Code::PermissionDenied);
    app.stop().await;
}

async fn unknown_paths_and_unknown_records_are_404(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    let bob = rest.register_and_login("bob").await;
    let nowhere = rest.get("/no/such/route", &bob.access_token).await;
    nowhere.assert_error(404, Code::NotFound);
    assert_eq!(nowhere.body["details"], json!([]));
    rest.get("/messages/999999", &bob.access_token)
        .await
        .assert_error(404, Code::NotFound);
    app.stop().await;
}

async fn a_known_path_under_another_method_is_405_with_allow(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    let answer = rest.call("PATCH", "/auth/me", None, None).await;
    answer.assert_error(405, Code::Unimplemented);
    assert_eq!(answer.header("allow"), Some("GET, PUT"));
    let answer = rest.call("DELETE", "/auth/login", None, None).await;
    answer.assert_error(405, Code::Unimplemented);
    assert_eq!(answer.header("allow"), Some("POST"));
    app.stop().await;
}

async fn a_taken_username_is_409(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    rest.register_and_login("bob").await;
    let again = rest
        .post(
            "/auth/register",
            None,
            json!({"username": "BOB", "email": "other@example.com", "password": PASSWORD}),
        )
        .await;
    again.assert_error(409, Code::AlreadyExists);
    app.stop().await;
}

async fn a_body_over_4_mib_is_413_and_the_server_keeps_serving(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    let bob = rest.register_and_login("bob").await;
    let content = "x".repeat(4 * 1024 * 1024 + 1);
    let answer = rest
        .post(
            "/messages",
            Some(&bob.access_token),
            json!({"recipient_id": bob.user_id, "content": content}),
        )
        .await;
    answer.assert_error(413, Code::ResourceExhausted);
    // Without a length up front (chunked), the limit holds while reading.
    let chunks = futures::stream::iter(
        (0..5).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 1024 * 1024]))),
    );
    let chunked = Rest::send(
        rest.request("POST", "/messages", Some(&bob.access_token))
            .body(reqwest::Body::wrap_stream(chunks)),
    )
    .await;
    chunked.assert_error(413, Code::ResourceExhausted);
    assert_eq!(rest.get("/auth/me", &bob.access_token).await.status, 200);
    app.stop().await;
}

async fn throttled_logins_are_429(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.login_account_failures = 2).await;
    let rest = Rest::new(&app);
    rest.register_and_login("bob").await;
    for _ in 0..2 {
        rest.post(
            "/auth/login",
            None,
            json!({"username": "bob", "password": "wrong guess"}),
        )
        .await
        .assert_error(401, Code::Unauthenticated);
    }
    let throttled = rest
        .post(
            "/auth/login",
            None,
            json!({"username": "bob", "password": PASSWORD}),
        )
        .await;
    throttled.assert_error(429, Code::ResourceExhausted);
    // Retry-After comes with a RetryInfo detail, and only then.
    match throttled.detail("google.rpc.RetryInfo") {
        Some(_) => assert!(throttled.header("retry-after").is_some()),
        None => assert!(throttled.header("retry-after").is_none()),
    }
    app.stop().await;
}

/// Reads `stream` until it holds `count` complete lines (of NDJSON) or events
/// (of SSE: blank-line separated), within `limit`.
async fn read_events(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    separator: &str,
    count: usize,
    limit: Duration,
) -> Vec<String> {
    let mut text = String::new();
    let started = Instant::now();
    while text.matches(separator).count() < count {
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(chunk)) => text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap()),
            Ok(None) => break,
            Err(_) => panic!("only {text:?} within {limit:?}"),
        }
    }
    text.split(separator)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn a_streamed_event_arrives_as_ndjson_and_as_sse(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    let bob = rest.register_and_login("bob").await;
    let carl = rest.register_and_login("carl").await;
    // The headers come as soon as the subscription is in place, before any event.
    let lines = rest
        .request("GET", "/messages:stream", Some(&carl.access_token))
        .send()
        .await
        .unwrap();
    assert_eq!(lines.status(), 200);
    assert_eq!(lines.headers()["content-type"], "application/x-ndjson");
    let events = rest
        .request("GET", "/messages:stream", Some(&carl.access_token))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(events.headers()["content-type"], "text/event-stream");

    let before = rest
        .call("GET", "/messages", Some(&carl.access_token), None)
        .await;
    let last_event_id = id(&before.body["last_event_id"]);
    let sent = rest
        .post(
            "/messages",
            Some(&bob.access_token),
            json!({"recipient_id": carl.user_id, "content": "live"}),
        )
        .await;
    let expected = json!({"result": {
        "created": sent.body["message"],
        "event_id": (last_event_id + 1).to_string(),
    }});
    let mut lines = lines.bytes_stream();
    let line = read_events(&mut lines, "\n", 1, Duration::from_secs(2)).await;
    assert_eq!(serde_json::from_str::<Value>(&line[0]).unwrap(), expected);
    let mut events = events.bytes_stream();
    let event = read_events(&mut events, "\n\n", 1, Duration::from_secs(2)).await;
    let data = event[0].strip_prefix("data: ").expect("an SSE data event");
    assert_eq!(serde_json::from_str::<Value>(data).unwrap(), expected);
    // A bad token fails before the headers: a plain error answer.
    rest.call("GET", "/messages:stream", Some("bad"), None)
        .await
        .assert_error(401, Code::Unauthenticated);
    app.stop().await;
}

async fn a_stream_whose_session_ends_closes_with_an_error_line(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    let carl = rest.register_and_login("carl").await;
    let stream = rest
        .request("GET", "/messages:stream", Some(&carl.access_token))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let logout = rest
        .post("/auth/logout", Some(&carl.access_token), json!({}))
        .await;
    assert_eq!(logout.status, 200);
    let mut stream = stream.bytes_stream();
    let lines = read_events(&mut stream, "\n", 1, Duration::from_secs(3)).await;
    let last: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        last["error"]["code"],
        Code::Unauthenticated as i32,
        "{last}"
    );
    assert!(last["error"]["details"].is_array());
    let end = tokio::time::timeout(Duration::from_secs(2), stream.next()).await;
    assert!(
        matches!(end, Ok(None)),
        "the stream ends after its error line"
    );
    app.stop().await;
}

async fn rest_and_grpc_see_the_same_messages(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    let bob = app.register_and_login("bob").await;
    let carl = rest.register_and_login("carl").await;
    // Sent over gRPC, read over REST.
    let sent = app
        .send_text(&bob, carl.user_id, "over grpc")
        .await
        .unwrap();
    let got = rest
        .get(&format!("/messages/{}", sent.id), &carl.access_token)
        .await;
    let message = &got.body["message"];
    assert_eq!(id(&message["id"]), sent.id);
    assert_eq!(id(&message["sender_id"]), bob.user_id);
    assert_eq!(message["content"], "over grpc");
    assert_eq!(message["conversation_id"], sent.conversation_id.as_str());
    // Sent over REST, read over gRPC.
    let posted = rest
        .post(
            "/messages",
            Some(&carl.access_token),
            json!({"recipient_id": bob.user_id, "content": "over rest"}),
        )
        .await;
    let listed = app
        .messages
        .clone()
        .list_messages(with_bearer(
            proto::ListMessagesRequest {
                with_user_id: Some(carl.user_id),
                ..Default::default()
            },
            &bob.access_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.messages[0].id, id(&posted.body["message"]["id"]));
    assert_eq!(listed.messages[0].content, "over rest");
    app.stop().await;
}

async fn logout_over_rest_is_enforced_over_grpc_and_the_reverse(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    let over_rest = app.register_and_login("bob").await;
    let logout = rest
        .post("/auth/logout", Some(&over_rest.access_token), json!({}))
        .await;
    assert_eq!(logout.status, 200);
    app.assert_session_ended(&over_rest.access_token, &over_rest.refresh_token)
        .await;

    let over_grpc = rest.register_and_login("carl").await;
    app.auth
        .clone()
        .logout(with_bearer(
            proto::LogoutRequest {},
            &over_grpc.access_token,
        ))
        .await
        .unwrap();
    rest.get("/auth/me", &over_grpc.access_token)
        .await
        .assert_error(401, Code::Unauthenticated);
    rest.post(
        "/auth/refresh",
        None,
        json!({"refresh_token": over_grpc.refresh_token}),
    )
    .await
    .assert_error(401, Code::Unauthenticated);
    app.stop().await;
}

async fn session_of(app: &TestApp, token: &str) -> proto::Session {
    let sessions = app
        .sessions
        .clone()
        .list_sessions(with_bearer(proto::ListSessionsRequest::default(), token))
        .await
        .unwrap()
        .into_inner()
        .sessions;
    sessions.into_iter().find(|s| s.current).unwrap()
}

async fn rest_logins_record_the_user_agent_and_the_peer_address(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    app.register("bob").await;
    let login = |agent: &'static str, body: Value| {
        Rest::send(
            rest.request("POST", "/auth/login", None)
                .header("user-agent", agent)
                .header("x-forwarded-for", "203.0.113.9")
                .json(&body),
        )
    };
    let answer = login(
        "requests/2.32",
        json!({"username": "bob", "password": PASSWORD}),
    )
    .await;
    let session = session_of(&app, answer.body["access_token"].as_str().unwrap()).await;
    assert_eq!(session.device_info.as_deref(), Some("requests/2.32"));
    assert_eq!(
        session.ip_address.as_deref(),
        Some("127.0.0.1"),
        "untrusted X-Forwarded-For ignored"
    );
    // The field wins over the header, as over gRPC.
    let answer = login(
        "requests/2.32",
        json!({"username": "bob", "password": PASSWORD, "device_info": "Pixel 9"}),
    )
    .await;
    let session = session_of(&app, answer.body["access_token"].as_str().unwrap()).await;
    assert_eq!(session.device_info.as_deref(), Some("Pixel 9"));
    app.stop().await;
}

async fn a_trusted_proxy_forwards_the_client_address_over_rest(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.trusted_proxies = ai_message::config::parse_networks("127.0.0.1/32").unwrap();
    })
    .await;
    let rest = Rest::new(&app);
    app.register("bob").await;
    let answer = Rest::send(
        rest.request("POST", "/auth/login", None)
            .header("x-forwarded-for", "203.0.113.9")
            .json(&json!({"username": "bob", "password": PASSWORD})),
    )
    .await;
    let session = session_of(&app, answer.body["access_token"].as_str().unwrap()).await;
    assert_eq!(session.ip_address.as_deref(), Some("203.0.113.9"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_behind_a_held_sqlite_lock_is_503_over_rest() {
    let app = spawn_app(Backend::Sqlite).await;
    let rest = Rest::new(&app);
    let bob = rest.register_and_login("bob").await;
    let lock = app.hold_users_write_lock().await;
    let answer = Rest::send(
        rest.request("PUT", "/auth/me", Some(&bob.access_token))
            .json(&json!({"full_name": "Bob"})),
    )
    .await;
    answer.assert_error(503, Code::Unavailable);
    lock.release().await;
    assert!(app.get_me(&bob.access_token).await.is_ok());
    app.stop().await;
}

async fn rest_is_served_over_http2_too(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    let bob = rest.register_and_login("bob").await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2
        .get(format!("http://127.0.0.1:{}/auth/me", app.port))
        .bearer_auth(&bob.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(id(&body["user"]["id"]), bob.user_id);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_from_an_allowed_origin_may_call_rest_and_others_get_no_cors_header() {
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.cors_origins =
            ai_message::config::CorsOrigins::List(vec!["https://app.example".into()]);
    })
    .await;
    let rest = Rest::new(&app);
    let preflight = Rest::send(
        rest.request("OPTIONS", "/auth/login", None)
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type"),
    )
    .await;
    assert_eq!(preflight.status, 204);
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let allowed = Rest::send(
        rest.request("POST", "/auth/login", None)
            .header("origin", "https://app.example")
            .json(&json!({"username": "nobody", "password": "wrong"})),
    )
    .await;
    allowed.assert_error(401, Code::Unauthenticated);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let refused = Rest::send(
        rest.request("POST", "/auth/login", None)
            .header("origin", "https://evil.example")
            .json(&json!({"username": "nobody", "password": "wrong"})),
    )
    .await;
    assert!(
        refused
            .headers
            .keys()
            .all(|name| !name.as_str().starts_with("access-control-")),
        "{refused:?}"
    );
    app.stop().await;
}

async fn the_revocation_feed_streams_as_ndjson(backend: Backend) {
    let app = spawn_app(backend).await;
    let rest = Rest::new(&app);
    let root = app.superuser("root").await;
    let feed = rest
        .request("GET", "/auth/revocations:watch", Some(&root.access_token))
        .send()
        .await
        .unwrap();
    assert_eq!(feed.headers()["content-type"], "application/x-ndjson");
    let ivy = rest.register_and_login("ivy").await;
    rest.post("/auth/logout", Some(&ivy.access_token), json!({}))
        .await;
    let mut feed = feed.bytes_stream();
    let line = read_events(&mut feed, "\n", 1, Duration::from_secs(2)).await;
    let event: Value = serde_json::from_str(&line[0]).unwrap();
    assert_eq!(id(&event["result"]["session_id"]), ivy.session_id);
    assert_eq!(event["result"]["reason"], "SESSION_END_REASON_LOGOUT");
    assert!(!event["result"]["cursor"].as_str().unwrap().is_empty());
    app.stop().await;
}
