//! `spawn_app(backend)`: a real server on port 0 over a fresh database, typed
//! clients for it, and assertion helpers.

use std::{sync::Arc, time::Duration};

use ai_message::{
    config::{Config, DatabaseTarget},
    proto::{
        self, auth_service_client::AuthServiceClient, message_service_client::MessageServiceClient,
        session_service_client::SessionServiceClient,
        user_admin_service_client::UserAdminServiceClient,
    },
    services::AppState,
    startup::Application,
};
use sqlx::{Connection as _, Executor as _};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Code, Request, Status, transport::Channel};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub const POSTGRES_URL_VAR: &str = "TEST_POSTGRES_URL";
/// The NATS server of the `postgres_nats` runs (CI sets it).
pub const NATS_URL_VAR: &str = "TEST_NATS_URL";

/// Where `TEST_NATS_URL` names a NATS server, that URL.
pub fn nats_url() -> Option<String> {
    std::env::var(NATS_URL_VAR)
        .ok()
        .filter(|url| !url.is_empty())
}

tokio::task_local! {
    /// Set around a test run over the NATS bus: every server the test
    /// spawns (siblings included) then carries its events through NATS.
    pub static NATS_BUS: String;
}

impl Backend {
    /// PostgreSQL tests run only where `TEST_POSTGRES_URL` is set (CI sets it).
    pub fn available(self) -> bool {
        match self {
            Self::Sqlite => true,
            Self::Postgres => std::env::var(POSTGRES_URL_VAR).is_ok_and(|url| !url.is_empty()),
        }
    }
}

/// One `#[tokio::test]` per backend for each named `async fn name(backend:
/// Backend)`, plus one on PostgreSQL with NATS as the event bus.
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if !$crate::helpers::Backend::Postgres.available() {
                        eprintln!("skipped: {} is not set", $crate::helpers::POSTGRES_URL_VAR);
                        return;
                    }
                    super::$name($crate::helpers::Backend::Postgres).await;
                }
            )*
        }
        mod postgres_nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(nats) = $crate::helpers::nats_url().filter(|_| $crate::helpers::Backend::Postgres.available()) else {
                        eprintln!("skipped: {} or {} is not set", $crate::helpers::POSTGRES_URL_VAR, $crate::helpers::NATS_URL_VAR);
                        return;
                    };
                    $crate::helpers::NATS_BUS
                        .scope(nats, super::$name($crate::helpers::Backend::Postgres))
                        .await;
                }
            )*
        }
    };
}

/// A fresh PostgreSQL database, dropped when the test ends.
pub struct PostgresDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl PostgresDatabase {
    pub async fn create() -> Self {
        let admin_url = std::env::var(POSTGRES_URL_VAR).unwrap();
        let name = format!("ai_message_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("TEST_POSTGRES_URL must name a reachable PostgreSQL server");
        admin
            .execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .await
            .unwrap();
        admin.close().await.unwrap();
        let (without_query, _) = admin_url.split_once('?').unwrap_or((&admin_url, ""));
        let authority_end = without_query
            .find("://")
            .map(|scheme| scheme + 3)
            .and_then(|start| without_query[start..].find('/').map(|slash| start + slash))
            .unwrap_or(without_query.len());
        let url = format!("{}/{name}", &without_query[..authority_end]);
        Self {
            admin_url,
            name,
            url,
        }
    }
}

impl Drop for PostgresDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        clean_up_from_drop(async move {
            if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                let _ = admin
                    .execute(sqlx::AssertSqlSafe(format!(
                        r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
                    )))
                    .await;
            }
        });
    }
}

/// Runs `cleanup` to its end from a `Drop`, which runs inside the test's
/// runtime: on a thread with a runtime of its own.
fn clean_up_from_drop(cleanup: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(cleanup);
    })
    .join();
}

enum RawConnection {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

/// Evaluates `$body` with `$c` bound to the `&mut` connection of either backend.
macro_rules! on_connection {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            RawConnection::Sqlite($c) => $body,
            RawConnection::Postgres($c) => $body,
        }
    };
}

impl RawConnection {
    async fn execute_raw(&mut self, sql: &'static str) {
        on_connection!(self, c => {
            sqlx::raw_sql(sql).execute(&mut *c).await.unwrap();
        })
    }
}

/// A write lock taken by [`TestApp::hold_users_write_lock`].
pub struct WriteLock(RawConnection);

impl WriteLock {
    pub async fn release(mut self) {
        self.0.execute_raw("ROLLBACK").await;
    }
}

pub struct TestApp {
    pub backend: Backend,
    pub port: u16,
    /// Where `GET /metrics` answers, when the test turned it on.
    pub metrics_port: Option<u16>,
    pub config: Config,
    pub state: Arc<AppState>,
    pub channel: Channel,
    pub auth: AuthServiceClient<Channel>,
    pub admin: UserAdminServiceClient<Channel>,
    pub sessions: SessionServiceClient<Channel>,
    pub messages: MessageServiceClient<Channel>,
    /// `DATABASE_URL` of this test's database, in a form the CLI accepts.
    pub database_url: String,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
    _postgres: Option<PostgresDatabase>,
    /// Deleted with the test's database (`None` for a sibling or without NATS).
    bus_stream: Option<BusStream>,
}

pub const TEST_SECRET: &[u8] = b"test-secret-key-of-at-least-32-bytes!";

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

/// Like `spawn_app`, with a chance to change the configuration first.
pub async fn spawn_app_with(backend: Backend, customize: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_on_clock(
        backend,
        customize,
        Arc::new(ai_message::domain::SystemClock),
    )
    .await
}

/// Like `spawn_app_with`, with `clock` as the server's "now" (a
/// `ManualClock` lets a test move time instead of sleeping).
pub async fn spawn_app_on_clock(
    backend: Backend,
    customize: impl FnOnce(&mut Config),
    clock: Arc<dyn ai_message::domain::Clock>,
) -> TestApp {
    if std::env::var("TEST_LOG").is_ok() {
        ai_message::telemetry::init();
    }
    let dir = tempfile::tempdir().unwrap();
    let postgres = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(PostgresDatabase::create().await),
    };
    let target = match &postgres {
        None => DatabaseTarget::Sqlite(Some(dir.path().join("test.db"))),
        Some(database) => DatabaseTarget::Postgres(database.url.clone()),
    };
    let database_url = match &target {
        DatabaseTarget::Sqlite(Some(path)) => format!("sqlite:///{}", path.display()),
        DatabaseTarget::Postgres(url) => url.clone(),
        DatabaseTarget::Sqlite(None) => unreachable!("tests use files"),
    };
    let mut config = Config::for_tests(target);
    config.secret_key = Some(TEST_SECRET.to_vec().into());
    if let Ok(url) = NATS_BUS.try_with(Clone::clone) {
        config.nats_url = Some(ai_message::config::NatsUrl::parse(&url).unwrap());
    }
    customize(&mut config);
    let app = Application::build_with_clock(config.clone(), clock)
        .await
        .unwrap();
    let bus_stream = match &config.nats_url {
        Some(url) => Some(BusStream {
            url: url.as_str().to_owned(),
            name: ai_message::events::nats::stream_name(
                &app.state().db.deployment_id().await.unwrap(),
            ),
        }),
        None => None,
    };
    let port = app.port();
    let metrics_port = app.metrics_port();
    let state = app.state();
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = shutdown_rx.await;
    }));
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    TestApp {
        backend,
        port,
        metrics_port,
        config,
        state,
        auth: AuthServiceClient::new(channel.clone()),
        admin: UserAdminServiceClient::new(channel.clone()),
        sessions: SessionServiceClient::new(channel.clone()),
        messages: MessageServiceClient::new(channel.clone()),
        database_url,
        channel,
        shutdown: Some(shutdown_tx),
        server: Some(server),
        _dir: dir,
        _postgres: postgres,
        bus_stream,
    }
}

/// The JetStream stream a test's deployment made on the shared NATS server:
/// deleted when the test ends, so test runs leave nothing behind.
pub struct BusStream {
    url: String,
    name: String,
}

impl Drop for BusStream {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        clean_up_from_drop(async move {
            if let Ok(client) = async_nats::connect(url).await {
                let _ = async_nats::jetstream::new(client).delete_stream(name).await;
            }
        });
    }
}

/// Credentials of a registered, logged-in user.
#[derive(Debug, Clone)]
pub struct LoggedIn {
    pub user_id: i64,
    pub access_token: String,
    pub refresh_token: String,
    pub session_id: i64,
}

pub const PASSWORD: &str = "correct-horse-battery";

impl TestApp {
    pub async fn register(&self, username: &str) -> proto::User {
        self.auth
            .clone()
            .register(proto::RegisterRequest {
                username: username.to_owned(),
                email: format!("{username}@example.com"),
                password: PASSWORD.to_owned(),
                full_name: None,
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap()
    }

    pub async fn login(&self, login: &str, password: &str) -> Result<proto::LoginResponse, Status> {
        self.auth
            .clone()
            .login(proto::LoginRequest {
                username: login.to_owned(),
                password: password.to_owned(),
                device_info: None,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Registers `username` and logs in once.
    pub async fn register_and_login(&self, username: &str) -> LoggedIn {
        let user = self.register(username).await;
        let login = self.login(username, PASSWORD).await.unwrap();
        LoggedIn {
            user_id: user.id,
            access_token: login.access_token,
            refresh_token: login.refresh_token,
            session_id: login.session_id,
        }
    }

    pub async fn get_me(&self, token: &str) -> Result<proto::User, Status> {
        self.auth
            .clone()
            .get_me(with_bearer(proto::GetMeRequest {}, token))
            .await
            .map(|r| r.into_inner().user.unwrap())
    }

    pub async fn refresh(
        &self,
        refresh_token: &str,
    ) -> Result<proto::RefreshTokenResponse, Status> {
        self.auth
            .clone()
            .refresh_token(proto::RefreshTokenRequest {
                refresh_token: refresh_token.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Registers `username` as a superuser (promoted in the database) and logs in.
    /// Asserts that neither the access token nor the refresh token of a
    /// session works any more.
    pub async fn assert_session_ended(&self, access_token: &str, refresh_token: &str) {
        assert_code(self.get_me(access_token).await, Code::Unauthenticated);
        assert_code(self.refresh(refresh_token).await, Code::Unauthenticated);
    }

    pub async fn superuser(&self, username: &str) -> LoggedIn {
        let user = self.register(username).await;
        self.state
            .db
            .set_superuser(user.id, true, self.state.clock.now().micros())
            .await
            .unwrap();
        let login = self.login(username, PASSWORD).await.unwrap();
        LoggedIn {
            user_id: user.id,
            access_token: login.access_token,
            refresh_token: login.refresh_token,
            session_id: login.session_id,
        }
    }

    /// A direct connection to this test's database, behind the server's back.
    async fn raw_connection(&self) -> RawConnection {
        match self.backend {
            Backend::Sqlite => {
                let path = self.database_url.trim_start_matches("sqlite:///");
                RawConnection::Sqlite(
                    sqlx::SqliteConnection::connect(&format!("sqlite://{path}"))
                        .await
                        .unwrap(),
                )
            }
            Backend::Postgres => RawConnection::Postgres(
                sqlx::PgConnection::connect(&self.database_url)
                    .await
                    .unwrap(),
            ),
        }
    }

    /// Runs one statement (with `$1` bound to `id`) directly on the database.
    pub async fn execute(&self, sql: &str, id: i64) {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        on_connection!(&mut self.raw_connection().await, c => {
            sqlx::query(sql).bind(id).execute(&mut *c).await.unwrap();
        })
    }

    /// Runs SQL without parameters (`ANALYZE`, say) directly on the database.
    pub async fn execute_unbound(&self, sql: &'static str) {
        self.raw_connection().await.execute_raw(sql).await;
    }

    /// Runs one `SELECT COUNT(*) ...` (with `$1` bound to `id`) directly on the database.
    pub async fn count(&self, sql: &str, id: i64) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        on_connection!(&mut self.raw_connection().await, c => {
            sqlx::query_scalar(sql).bind(id).fetch_one(&mut *c).await.unwrap()
        })
    }

    /// Takes the database's write lock on the `users` table behind the server's
    /// back, so that profile writes wait until the returned guard is released.
    pub async fn hold_users_write_lock(&self) -> WriteLock {
        let mut conn = self.raw_connection().await;
        conn.execute_raw(match self.backend {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            // EXCLUSIVE blocks writers but still lets readers in, like SQLite's lock.
            Backend::Postgres => "BEGIN; LOCK TABLE users IN EXCLUSIVE MODE",
        })
        .await;
        WriteLock(conn)
    }

    /// `count` Logins of `username` (with the right password) at once.
    pub fn spawn_logins(
        &self,
        username: &str,
        count: usize,
    ) -> Vec<JoinHandle<Result<tonic::Response<proto::LoginResponse>, Status>>> {
        (0..count)
            .map(|_| {
                let mut auth = self.auth.clone();
                let username = username.to_owned();
                tokio::spawn(async move {
                    auth.login(proto::LoginRequest {
                        username,
                        password: PASSWORD.to_owned(),
                        device_info: None,
                    })
                    .await
                })
            })
            .collect()
    }

    /// Logs `username` in once its throttle delay is over (ended by hand, as
    /// if the time had passed); returns the access token.
    pub async fn login_after_throttle(&self, username: &str) -> String {
        self.execute("UPDATE login_account_throttle SET locked_until = $1", 0)
            .await;
        self.login(username, PASSWORD).await.unwrap().access_token
    }

    /// Creates the role `name` (as the superuser `root_token`) and gives it
    /// to `user_id`; returns the role's id.
    pub async fn grant_role(&self, root_token: &str, user_id: i64, name: &str) -> i64 {
        let mut admin = self.admin.clone();
        let role = admin
            .create_role(with_bearer(
                proto::CreateRoleRequest {
                    name: name.to_owned(),
                    description: None,
                },
                root_token,
            ))
            .await
            .unwrap()
            .into_inner()
            .role
            .unwrap();
        admin
            .set_user_roles(with_bearer(
                proto::SetUserRolesRequest {
                    user_id,
                    role_ids: vec![role.id],
                },
                root_token,
            ))
            .await
            .unwrap();
        role.id
    }

    /// ValidateToken's answer for `token`, requiring `roles`.
    pub async fn validate(&self, token: &str, roles: &[&str]) -> proto::ValidateTokenResponse {
        self.auth
            .clone()
            .validate_token(proto::ValidateTokenRequest {
                token: token.to_owned(),
                required_roles: roles.iter().map(|role| (*role).to_owned()).collect(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// A second server on this test's database, as another instance would be.
    pub async fn spawn_sibling(&self) -> TestApp {
        self.spawn_sibling_with(|_| {}).await
    }

    /// Like `spawn_sibling`, with a chance to change its configuration first.
    pub async fn spawn_sibling_with(&self, customize: impl FnOnce(&mut Config)) -> TestApp {
        let config = self.config.clone();
        let mut sibling = spawn_app_with(self.backend, |c| {
            *c = config;
            customize(c);
        })
        .await;
        // The sibling shares this database: it must not drop it when it stops.
        sibling._postgres = None;
        // Nor delete its bus stream (forgotten, not dropped: dropping deletes).
        std::mem::forget(sibling.bus_stream.take());
        sibling.database_url = self.database_url.clone();
        sibling
    }

    /// Sends `content` from `from` to the user `to` (default conversation).
    pub async fn send_text(
        &self,
        from: &LoggedIn,
        to: i64,
        content: &str,
    ) -> Result<proto::Message, Status> {
        self.messages
            .clone()
            .send_message(with_bearer(
                proto::SendMessageRequest {
                    recipient_id: to,
                    content: content.to_owned(),
                    parent_id: None,
                    conversation_id: None,
                    request_id: None,
                },
                &from.access_token,
            ))
            .await
            .map(|r| r.into_inner().message.unwrap())
    }

    /// Opens a StreamMessages stream for `who`.
    pub async fn open_stream(
        &self,
        who: &LoggedIn,
    ) -> Result<tonic::Streaming<proto::StreamMessagesResponse>, Status> {
        self.messages
            .clone()
            .stream_messages(with_bearer(
                proto::StreamMessagesRequest::default(),
                &who.access_token,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("server stops within 10 s")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// How a proxy cuts its connections when told to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Every forwarded connection is closed, as when a server goes away.
    Close,
    /// Forwarded connections stay open but carry nothing more, as when a
    /// network drops packets: only a missing answer shows it.
    Silence,
}

/// A TCP proxy to `upstream` (PostgreSQL, NATS) that forwards connections
/// while `open` is true; closing it drops every forwarded connection and
/// refuses new ones.
pub async fn start_proxy(upstream: String) -> (u16, tokio::sync::watch::Sender<bool>) {
    start_proxy_cutting(upstream, Cut::Close).await
}

/// Like `start_proxy`, cutting its connections the way `cut` says.
pub async fn start_proxy_cutting(
    upstream: String,
    cut: Cut,
) -> (u16, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (open_tx, open_rx) = tokio::sync::watch::channel(true);
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
                if cut == Cut::Silence {
                    // Held open, never read or written again.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                drop((client, server));
            });
        }
    });
    (port, open_tx)
}

pub fn with_bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
    match result {
        Ok(value) => panic!("expected {code:?}, got Ok({value:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "unexpected status: {status:?}");
            status
        }
    }
}

/// The fields named by the status's `google.rpc.BadRequest` detail.
#[track_caller]
pub fn bad_request_fields(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt as _;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("INVALID_ARGUMENT carries a BadRequest detail")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// Signs `claims` JSON under `header` JSON with `key` (HS256), as a forger
/// who knows the key would.
pub fn sign(header: &str, claims: &str, key: &[u8]) -> String {
    sign_with(jsonwebtoken::Algorithm::HS256, header, claims, key)
}

/// Like `sign`, with any HMAC algorithm (to try the ones the server refuses).
pub fn sign_with(
    algorithm: jsonwebtoken::Algorithm,
    header: &str,
    claims: &str,
    key: &[u8],
) -> String {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &jsonwebtoken::EncodingKey::from_secret(key),
        algorithm,
    )
    .unwrap();
    format!("{input}.{signature}")
}
