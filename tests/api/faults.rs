//! Defects found by fault injection and attack, each kept fixed by a test:
//! JWT edge cases, calls without a request message, oversized metadata, a
//! full SQLite disk, a WAL left to grow, silent and surplus connections, idle connections, and
//! shutdown despite peers that never finish.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ai_message::proto;
use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tonic::{Code, transport::Channel};
use tower::{Service as _, ServiceExt as _};

use crate::helpers::{
    Backend, TEST_SECRET, TestApp, assert_code, sign, spawn_app, spawn_app_with, with_bearer,
};

backend_tests!(
    tokens_with_a_future_nbf_or_a_crit_header_are_unauthenticated,
    two_authorization_entries_are_unauthenticated,
    a_call_without_a_request_message_is_invalid_argument,
    metadata_over_the_limit_is_resource_exhausted_as_a_grpc_status,
);

async fn is_active(app: &TestApp, token: &str) -> bool {
    app.auth
        .clone()
        .validate_token(proto::ValidateTokenRequest {
            token: token.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .active
}

async fn tokens_with_a_future_nbf_or_a_crit_header_are_unauthenticated(backend: Backend) {
    let app = spawn_app(backend).await;
    let mia = app.register_and_login("mia").await;
    let now = app.state.clock.now().seconds();
    let claims = |extra: &str| {
        format!(
            r#"{{"sub":"{}","sid":"{}","iat":{now},"exp":{},"iss":"localhost","aud":"ai-message","jti":"j"{extra}}}"#,
            mia.user_id,
            mia.session_id,
            now + 600
        )
    };
    let header = r#"{"alg":"HS256","typ":"at+jwt"}"#;
    // The forging works: a past nbf is fine.
    let past_nbf = sign(
        header,
        &claims(&format!(r#","nbf":{}"#, now - 5)),
        TEST_SECRET,
    );
    assert!(app.get_me(&past_nbf).await.is_ok());
    assert!(is_active(&app, &past_nbf).await);

    let attacks = [
        (
            "nbf in a year",
            sign(
                header,
                &claims(&format!(r#","nbf":{}"#, now + 365 * 86_400)),
                TEST_SECRET,
            ),
        ),
        (
            "nbf in a minute",
            sign(
                header,
                &claims(&format!(r#","nbf":{}"#, now + 60)),
                TEST_SECRET,
            ),
        ),
        (
            "crit naming an unknown extension",
            sign(
                r#"{"alg":"HS256","typ":"at+jwt","crit":["exp-ext"],"exp-ext":1}"#,
                &claims(""),
                TEST_SECRET,
            ),
        ),
        (
            "empty crit",
            sign(
                r#"{"alg":"HS256","typ":"at+jwt","crit":[]}"#,
                &claims(""),
                TEST_SECRET,
            ),
        ),
    ];
    for (attack, token) in attacks {
        let status = app.get_me(&token).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{attack}: {status:?}");
        assert!(!is_active(&app, &token).await, "{attack}");
    }
    app.stop().await;
}

async fn two_authorization_entries_are_unauthenticated(backend: Backend) {
    let app = spawn_app(backend).await;
    let mia = app.register_and_login("mia").await;
    let lee = app.register_and_login("lee").await;
    let twice = |first: &str, second: &str| {
        let mut request = with_bearer(proto::GetMeRequest {}, first);
        request
            .metadata_mut()
            .append("authorization", format!("Bearer {second}").parse().unwrap());
        request
    };
    // The same good token twice, and two users' tokens in either order.
    for (first, second) in [
        (&mia.access_token, &mia.access_token),
        (&mia.access_token, &lee.access_token),
        (&lee.access_token, &mia.access_token),
    ] {
        assert_code(
            app.auth.clone().get_me(twice(first, second)).await,
            Code::Unauthenticated,
        );
    }
    // A service where every RPC needs a bearer refuses it in the interceptor.
    let mut sessions = with_bearer(proto::ListSessionsRequest::default(), &mia.access_token);
    sessions.metadata_mut().append(
        "authorization",
        format!("Bearer {}", mia.access_token).parse().unwrap(),
    );
    assert_code(
        app.sessions.clone().list_sessions(sessions).await,
        Code::Unauthenticated,
    );
    assert!(
        app.get_me(&mia.access_token).await.is_ok(),
        "one entry works"
    );
    app.stop().await;
}

/// The `grpc-status` of a call made with a raw HTTP/2 request whose body is
/// empty (no gRPC message at all): from the headers of a trailers-only
/// answer, else from the trailers.
async fn grpc_status_of_empty_call(app: &TestApp, path: &str, bearer: Option<&str>) -> Code {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{}{path}", app.port))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request.body(tonic::body::Body::empty()).unwrap();
    let mut channel: Channel = app.channel.clone();
    let response = channel.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK, "{path}");
    let code = |headers: &http::HeaderMap| {
        headers
            .get("grpc-status")
            .map(|v| Code::from_i32(v.to_str().unwrap().parse().unwrap()))
    };
    if let Some(code) = code(response.headers()) {
        return code;
    }
    let mut body = response.into_body();
    loop {
        let frame = std::future::poll_fn(|cx| {
            http_body::Body::poll_frame(std::pin::Pin::new(&mut body), cx)
        })
        .await
        .expect("the answer ends with trailers")
        .unwrap();
        if let Ok(trailers) = frame.into_trailers() {
            return code(&trailers).expect("grpc-status in the trailers");
        }
    }
}

async fn a_call_without_a_request_message_is_invalid_argument(backend: Backend) {
    let app = spawn_app(backend).await;
    let mia = app.register_and_login("mia").await;
    let token = Some(mia.access_token.as_str());
    for (path, bearer) in [
        ("/grpc.health.v1.Health/Check", None),
        ("/aimessage.v1.AuthService/Login", None),
        ("/aimessage.v1.AuthService/GetMe", token),
        ("/aimessage.v1.SessionService/ListSessions", token),
        ("/aimessage.v1.MessageService/SendMessage", token),
        // Server streaming too.
        ("/aimessage.v1.MessageService/StreamMessages", token),
    ] {
        assert_eq!(
            grpc_status_of_empty_call(&app, path, bearer).await,
            Code::InvalidArgument,
            "{path}"
        );
    }
    assert!(app.get_me(&mia.access_token).await.is_ok());
    app.stop().await;
}

async fn metadata_over_the_limit_is_resource_exhausted_as_a_grpc_status(backend: Backend) {
    let app = spawn_app(backend).await;
    let mia = app.register_and_login("mia").await;
    let with_metadata = |bytes: usize| {
        let mut request = with_bearer(proto::GetMeRequest {}, &mia.access_token);
        request
            .metadata_mut()
            .insert("x-padding", "a".repeat(bytes).parse().unwrap());
        request
    };
    for bytes in [17 * 1024, 20 * 1024, 40 * 1024, 60 * 1024] {
        let status = app
            .auth
            .clone()
            .get_me(with_metadata(bytes))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "{bytes} bytes: {status:?}"
        );
    }
    // Just under the limit is served, and so is everything after.
    assert!(
        app.auth
            .clone()
            .get_me(with_metadata(15 * 1024))
            .await
            .is_ok()
    );
    assert!(app.get_me(&mia.access_token).await.is_ok());
    app.stop().await;
}

/// Mounts a tmpfs of `megabytes` on a fresh directory; `None` where this
/// process may not mount (the test then says it was skipped).
fn small_file_system(megabytes: u32) -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
        .arg(dir.path())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    mounted.then_some(dir)
}

/// Fills the file system holding `dir` with one file, until it is full.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    while file.write_all(&chunk).and_then(|()| file.flush()).is_ok() {}
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sqlite_disk_makes_writes_unavailable_and_they_succeed_again_without_a_restart() {
    let Some(mount) = small_file_system(4) else {
        eprintln!("skipped: this process cannot mount a tmpfs");
        return;
    };
    let path = mount.path().join("full.db");
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.database = ai_message::config::DatabaseTarget::Sqlite(Some(path));
    })
    .await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    app.send_text(&ann, bob.user_id, "before").await.unwrap();

    let filler = fill(mount.path());
    let content = "x".repeat(8000);
    let mut refused = 0;
    for _ in 0..400 {
        match app.send_text(&ann, bob.user_id, &content).await {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                refused += 1;
                if refused >= 20 {
                    break;
                }
            }
        }
    }
    assert!(refused >= 20, "the full disk refused {refused} writes");
    // Login writes a session: refused the same way, never INTERNAL.
    let login = app.login("ann", crate::helpers::PASSWORD).await;
    if let Err(status) = &login {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    // Reads keep working.
    let listed = app
        .messages
        .clone()
        .list_messages(with_bearer(
            proto::ListMessagesRequest::default(),
            &bob.access_token,
        ))
        .await;
    assert!(listed.is_ok(), "{listed:?}");

    std::fs::remove_file(filler).unwrap();
    for attempt in 0..30 {
        let sent = app
            .send_text(&ann, bob.user_id, &format!("after {attempt}"))
            .await;
        assert!(
            sent.is_ok(),
            "write {attempt} after room returned: {sent:?}"
        );
    }
    assert!(app.login("ann", crate::helpers::PASSWORD).await.is_ok());
    assert!(app.register_and_login("cyd").await.user_id > 0);
    app.stop().await;
    let _ = Command::new("umount").arg("-l").arg(mount.path()).status();
}

/// Commits no longer copy SQLite's WAL back into the database file (a
/// background task does, off the writer's path): the WAL must still stay
/// bounded, as it did when the commits did it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_wal_is_copied_back_in_the_background_and_stays_bounded() {
    const ROUNDS: usize = 20;
    const PER_ROUND: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.db");
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.database = ai_message::config::DatabaseTarget::Sqlite(Some(path.clone()));
    })
    .await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let content = "x".repeat(8000);
    // In WAL mode only a checkpoint writes to the database file itself.
    let written_at = || std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    for round in 0..ROUNDS {
        let before = written_at();
        for _ in 0..PER_ROUND {
            app.send_text(&ann, bob.user_id, &content).await.unwrap();
        }
        // Wait for a checkpoint to copy the round into the database file
        // (on a loaded machine it may come late), after which the next write
        // starts the WAL over. Nothing else copies it: commits do not.
        let copied = async {
            while written_at() <= before {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), copied)
            .await
            .unwrap_or_else(|_| panic!("round {round} was not copied back within 10 s"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Each message is written three times (the message and both
    // participants' events): without checkpoints the WAL would hold at least
    // all of that (49 MB here, for 3.2 MB of contents). With them it holds
    // the set-up and a round or two at its high-water mark (2.4-5 MB).
    let contents = (ROUNDS * PER_ROUND * content.len()) as u64;
    let written = 3 * contents;
    let mut wal = path.clone().into_os_string();
    wal.push("-wal");
    let wal_size = std::fs::metadata(&wal).unwrap().len();
    assert!(
        wal_size < written,
        "the WAL grew to {wal_size} bytes for {written} bytes of messages and events"
    );
    app.stop().await;
}

/// Reads until the peer closes; how long that took, or `None` within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + limit),
            stream.read(&mut buffer),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {} // the server's SETTINGS or GOAWAY: keep reading
        }
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_handshake_timeout() {
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.transport.handshake_timeout = Duration::from_secs(1);
    })
    .await;
    let address = format!("127.0.0.1:{}", app.port);
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(&address).await.unwrap());
    }
    // A peer that sends the HTTP/2 preface and SETTINGS but no request.
    let mut preface_only = TcpStream::connect(&address).await.unwrap();
    preface_only.write_all(PREFACE).await.unwrap();
    // Real clients are served meanwhile.
    let mia = app.register_and_login("mia").await;

    let opened = Instant::now();
    for stream in silent.iter_mut().chain(std::iter::once(&mut preface_only)) {
        let closed = closed_within(stream, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "a silent connection was not closed");
    }
    let took = opened.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "closed only after {took:?} (timeout 1 s)"
    );
    assert!(app.get_me(&mia.access_token).await.is_ok());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_beyond_the_limit_is_closed_at_once() {
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.transport.max_connections = 3;
    })
    .await;
    let address = format!("127.0.0.1:{}", app.port);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(&address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut surplus = TcpStream::connect(&address).await.unwrap();
    let closed = closed_within(&mut surplus, Duration::from_secs(1)).await;
    assert!(closed.is_some(), "the fourth connection was kept open");
    for stream in &mut held {
        assert!(
            closed_within(stream, Duration::from_millis(100))
                .await
                .is_none(),
            "connections within the limit stay open"
        );
    }
    // Once one is gone, a real client gets in.
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let answer = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    assert!(answer.is_ok(), "{answer:?}");
    app.stop().await;
}

/// An HTTP/2 connection made with the `h2` crate, to act as peers tonic
/// would not: ones that keep a call open forever or ignore GOAWAY.
async fn raw_h2(port: u16) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, driver)
}

fn grpc_request(port: u16, path: &str, bearer: Option<&str>) -> http::Request<()> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request.body(()).unwrap()
}

/// An empty protobuf message as one gRPC frame.
const EMPTY_MESSAGE: &[u8] = &[0, 0, 0, 0, 0];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_an_open_stream_keeps_one_alive() {
    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.transport.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let mia = app.register_and_login("mia").await;

    // One health check, then nothing: closed about a second later.
    let (mut idle, idle_driver) = raw_h2(app.port).await;
    let (answer, mut body) = idle
        .send_request(
            grpc_request(app.port, "/grpc.health.v1.Health/Check", None),
            false,
        )
        .unwrap();
    body.send_data(Bytes::from_static(EMPTY_MESSAGE), true)
        .unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), http::StatusCode::OK);
    let mut answer_body = answer.into_body();
    while answer_body.data().await.is_some() {}
    let _ = answer_body.trailers().await;

    // A StreamMessages stream on another connection: still open after 2.5 s.
    let (mut streaming, stream_driver) = raw_h2(app.port).await;
    let (stream_answer, mut stream_body) = streaming
        .send_request(
            grpc_request(
                app.port,
                "/aimessage.v1.MessageService/StreamMessages",
                Some(&mia.access_token),
            ),
            false,
        )
        .unwrap();
    stream_body
        .send_data(Bytes::from_static(EMPTY_MESSAGE), true)
        .unwrap();
    assert_eq!(stream_answer.await.unwrap().status(), http::StatusCode::OK);

    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(4), idle_driver)
        .await
        .expect("the idle connection is closed")
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700),
        "closed after {took:?}, before the idle timeout"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !stream_driver.is_finished(),
        "a connection with an open stream is not idle"
    );
    drop(streaming);
    app.stop().await;
}

/// A free port on loopback (bound, then released for the child to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct ServerProcess {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    async fn start(grace: &str) -> Self {
        Self::start_with(grace, &[], None).await
    }

    /// With extra variables and, if given, an open-file limit (soft and hard).
    async fn start_with(grace: &str, env: &[(&str, &str)], open_files: Option<u64>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_ai-message"));
        command
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env("DATABASE_URL", "sqlite://server.db")
            .env("AI_MESSAGE_HOST", "127.0.0.1")
            .env("AI_MESSAGE_PORT", port.to_string())
            .env("AI_MESSAGE_BCRYPT_COST", "4")
            .env("AI_MESSAGE_SHUTDOWN_GRACE", grace)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(limit) = open_files {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: only setrlimit, which is async-signal-safe, runs in the child.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = command.spawn().unwrap();
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "server never listened"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://127.0.0.1:{}", self.port))
            .unwrap()
            .connect_lazy()
    }

    /// Sends SIGTERM and waits up to `limit` for the exit; how long it took.
    async fn terminate(&mut self, limit: Duration) -> Duration {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit status {status}");
                return started.elapsed();
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!("not exited {limit:?} after SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn log_in(channel: Channel, name: &str) -> String {
    let mut auth = proto::auth_service_client::AuthServiceClient::new(channel);
    auth.register(proto::RegisterRequest {
        username: name.to_owned(),
        email: format!("{name}@example.com"),
        password: crate::helpers::PASSWORD.to_owned(),
        full_name: None,
    })
    .await
    .unwrap();
    auth.login(proto::LoginRequest {
        username: name.to_owned(),
        password: crate::helpers::PASSWORD.to_owned(),
        device_info: None,
    })
    .await
    .unwrap()
    .into_inner()
    .access_token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_at_once_despite_silent_peers_and_within_the_grace_despite_stuck_calls() {
    // Silent TCP peers and an open stream: the exit does not wait for them,
    // and the stream ends with UNAVAILABLE.
    let mut server = ServerProcess::start("30s").await;
    let token = log_in(server.channel(), "mia").await;
    let mut stream = proto::message_service_client::MessageServiceClient::new(server.channel())
        .stream_messages(with_bearer(proto::StreamMessagesRequest::default(), &token))
        .await
        .unwrap()
        .into_inner();
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(
            TcpStream::connect(("127.0.0.1", server.port))
                .await
                .unwrap(),
        );
    }
    let mut preface_only = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    preface_only.write_all(PREFACE).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = server.terminate(Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    let ended = tokio::time::timeout(Duration::from_secs(1), stream.message())
        .await
        .expect("the stream ended");
    assert_eq!(ended.unwrap_err().code(), Code::Unavailable);

    // A peer that starts a unary call and never finishes its request, on a
    // connection that never acknowledges anything: cancelled at the grace.
    let mut server = ServerProcess::start("2s").await;
    let token = log_in(server.channel(), "mia").await;
    let (mut stuck, _driver) = raw_h2(server.port).await;
    let (_answer, _body_never_ended) = stuck
        .send_request(
            grpc_request(server.port, "/aimessage.v1.AuthService/GetMe", Some(&token)),
            false,
        )
        .unwrap();
    for _ in 0..20 {
        silent.push(
            TcpStream::connect(("127.0.0.1", server.port))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = server.terminate(Duration::from_secs(10)).await;
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
        "exit took {took:?} with a 2 s grace"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_behind_another_processes_sqlite_lock_is_unavailable_within_5_seconds() {
    let app = spawn_app(Backend::Sqlite).await;
    let ivy = app.register_and_login("ivy").await;
    let lock = app.hold_users_write_lock().await;
    let started = Instant::now();
    let answer = app
        .auth
        .clone()
        .update_me(with_bearer(
            proto::UpdateMeRequest {
                email: None,
                full_name: Some("Ivy".into()),
                bio: None,
            },
            &ivy.access_token,
        ))
        .await;
    let took = started.elapsed();
    assert_code(answer, Code::Unavailable);
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    lock.release().await;
    assert!(app.get_me(&ivy.access_token).await.is_ok());
    app.stop().await;
}

/// CPU seconds (user and system) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf only reads a system constant.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_server_keeps_its_connections_and_does_not_spin() {
    let server =
        ServerProcess::start_with("5s", &[("AI_MESSAGE_HANDSHAKE_TIMEOUT", "3s")], Some(128)).await;
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", server.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = log_in(channel.clone(), "mia").await;
    let mut auth = proto::auth_service_client::AuthServiceClient::new(channel);

    // More silent connections than descriptors: accept starts failing.
    let mut silent = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect(("127.0.0.1", server.port)).await {
            Ok(stream) => silent.push(stream),
            Err(_) => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = server.child.id();
    let cpu_before = cpu_seconds(pid);
    let wall = Instant::now();
    for _ in 0..20 {
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            auth.get_me(with_bearer(proto::GetMeRequest {}, &token)),
        )
        .await
        .expect("an open connection is still served (no answer in 2 s)");
        assert!(
            answer.is_ok(),
            "an open connection is still served: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let busy = (cpu_seconds(pid) - cpu_before) / wall.elapsed().as_secs_f64();
    assert!(
        busy < 0.25,
        "the server used {:.0}% of a core while out of descriptors",
        busy * 100.0
    );

    // The silent ones are closed after the handshake timeout; then new
    // clients are accepted again.
    drop(silent);
    let fresh = Channel::from_shared(format!("http://127.0.0.1:{}", server.port))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect_lazy();
    let started = Instant::now();
    loop {
        let answer = tonic_health::pb::health_client::HealthClient::new(fresh.clone())
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await;
        if answer.is_ok() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut server = server;
    server.terminate(Duration::from_secs(10)).await;
}
