//! Durability guard: the server process is killed with SIGKILL in the middle
//! of a concurrent SendMessage / Login / RefreshToken load, restarted on the
//! same database, and every write it answered OK is found again; the
//! contract's invariants hold (no session without its user, no refresh token
//! without its session, SQLite's integrity check). A few rounds, both
//! databases.

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ai_message::proto::{
    self, auth_service_client::AuthServiceClient, message_service_client::MessageServiceClient,
};
use sqlx::Connection as _;
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt as _;

use crate::helpers::{Backend, PASSWORD, PostgresDatabase, TEST_SECRET, with_bearer};

backend_tests!(writes_answered_ok_survive_sigkill_and_the_invariants_hold);

/// Where the killed server keeps its data, across restarts.
struct Store {
    dir: tempfile::TempDir,
    postgres: Option<PostgresDatabase>,
}

impl Store {
    fn database_url(&self) -> String {
        match &self.postgres {
            Some(database) => database.url.clone(),
            None => "sqlite://server.db".to_owned(),
        }
    }

    /// Counts rows with `sql` (a `SELECT COUNT(*)`), behind the server's back.
    async fn count(&self, sql: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.postgres {
            Some(database) => {
                let mut c = sqlx::PgConnection::connect(&database.url).await.unwrap();
                sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
            }
            None => {
                let path = self.dir.path().join("server.db");
                let mut c =
                    sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
                        .await
                        .unwrap();
                sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
            }
        }
    }

    async fn sqlite_integrity(&self) -> Option<String> {
        self.postgres.is_none().then_some(())?;
        let path = self.dir.path().join("server.db");
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        Some(
            sqlx::query_scalar("PRAGMA integrity_check")
                .fetch_one(&mut c)
                .await
                .unwrap(),
        )
    }
}

fn start(store: &Store) -> (Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_ai-message"))
        .current_dir(store.dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "error")
        .env("DATABASE_URL", store.database_url())
        .env(
            "AI_MESSAGE_SECRET_KEY",
            String::from_utf8_lossy(TEST_SECRET).into_owned(),
        )
        .env("AI_MESSAGE_HOST", "127.0.0.1")
        .env("AI_MESSAGE_PORT", port.to_string())
        .env("AI_MESSAGE_BCRYPT_COST", "4")
        .env("AI_MESSAGE_LOGIN_ACCOUNT_FAILURES", "1000000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, port)
}

async fn connect(port: u16) -> Channel {
    let started = Instant::now();
    loop {
        if let Ok(channel) = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
        {
            return channel;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "server never listened"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

async fn login(channel: &Channel, username: &str) -> proto::LoginResponse {
    AuthServiceClient::new(channel.clone())
        .login(proto::LoginRequest {
            username: username.into(),
            password: PASSWORD.into(),
            device_info: None,
        })
        .await
        .unwrap_or_else(|status| panic!("{username} could not log in: {status:?}"))
        .into_inner()
}

/// What the load saw answered OK.
#[derive(Default)]
struct Acknowledged {
    messages: Vec<i64>,
    sessions: Vec<i64>,
    /// The newest refresh token each chain was given.
    refresh_tokens: Vec<String>,
}

async fn writes_answered_ok_survive_sigkill_and_the_invariants_hold(backend: Backend) {
    let store = Store {
        dir: tempfile::tempdir().unwrap(),
        postgres: match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(PostgresDatabase::create().await),
        },
    };
    let (mut child, port) = start(&store);
    let mut channel = connect(port).await;
    let mut auth = AuthServiceClient::new(channel.clone());
    let mut ids = Vec::new();
    for name in ["ann", "bob"] {
        let user = auth
            .register(proto::RegisterRequest {
                username: name.into(),
                email: format!("{name}@example.com"),
                password: PASSWORD.into(),
                full_name: None,
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        ids.push(user.id);
    }
    let bob = ids[1];
    for round in 0..3 {
        let ann = login(&channel, "ann").await;
        let acknowledged = Arc::new(Mutex::new(Acknowledged::default()));
        let mut load = Vec::new();
        for worker in 0..4 {
            let (channel, token, acked) = (
                channel.clone(),
                ann.access_token.clone(),
                Arc::clone(&acknowledged),
            );
            load.push(tokio::spawn(async move {
                let mut messages = MessageServiceClient::new(channel);
                for i in 0.. {
                    let request = with_bearer(
                        proto::SendMessageRequest {
                            recipient_id: bob,
                            content: format!("round {round} worker {worker} message {i}"),
                            parent_id: None,
                            conversation_id: None,
                            request_id: None,
                        },
                        &token,
                    );
                    match messages.send_message(request).await {
                        Ok(answer) => acked
                            .lock()
                            .unwrap()
                            .messages
                            .push(answer.into_inner().message.unwrap().id),
                        Err(_) => return,
                    }
                }
            }));
        }
        for _ in 0..2 {
            let (channel, acked) = (channel.clone(), Arc::clone(&acknowledged));
            load.push(tokio::spawn(async move {
                let mut auth = AuthServiceClient::new(channel);
                loop {
                    let request = proto::LoginRequest {
                        username: "bob".into(),
                        password: PASSWORD.into(),
                        device_info: None,
                    };
                    match auth.login(request).await {
                        Ok(answer) => acked
                            .lock()
                            .unwrap()
                            .sessions
                            .push(answer.into_inner().session_id),
                        Err(_) => return,
                    }
                }
            }));
        }
        for chain in 0..2 {
            let (channel, acked) = (channel.clone(), Arc::clone(&acknowledged));
            let first = login(&channel, "ann").await.refresh_token;
            acked.lock().unwrap().refresh_tokens.push(first.clone());
            load.push(tokio::spawn(async move {
                let mut auth = AuthServiceClient::new(channel);
                let mut current = first;
                loop {
                    match auth
                        .refresh_token(proto::RefreshTokenRequest {
                            refresh_token: current.clone(),
                        })
                        .await
                    {
                        Ok(answer) => {
                            current = answer.into_inner().refresh_token;
                            acked.lock().unwrap().refresh_tokens[chain] = current.clone();
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300 + 100 * round)).await;
        // SIGKILL: no shutdown code runs.
        child.kill().unwrap();
        let _ = child.wait();
        for task in load {
            let _ = task.await;
        }
        let acked = std::mem::take(&mut *acknowledged.lock().unwrap());
        assert!(
            !acked.messages.is_empty() && !acked.sessions.is_empty(),
            "round {round}: the load ran ({} messages, {} logins)",
            acked.messages.len(),
            acked.sessions.len()
        );

        let port;
        (child, port) = start(&store);
        channel = connect(port).await;
        let reader = login(&channel, "bob").await.access_token;
        let mut messages = MessageServiceClient::new(channel.clone());
        for id in &acked.messages {
            messages
                .get_message(with_bearer(
                    proto::GetMessageRequest { message_id: *id },
                    &reader,
                ))
                .await
                .unwrap_or_else(|status| {
                    panic!("round {round}: message {id} was answered OK but is gone: {status:?}")
                });
        }
        // Every acknowledged login's session exists.
        let listed: Vec<String> = acked.sessions.iter().map(i64::to_string).collect();
        let found = store
            .count(&format!(
                "SELECT COUNT(*) FROM sessions WHERE id IN ({})",
                listed.join(",")
            ))
            .await;
        assert_eq!(
            found,
            acked.sessions.len() as i64,
            "round {round}: a session answered OK is gone"
        );
        // The newest refresh token of each chain is known: still valid, or
        // spent by a rotation whose answer the kill swallowed, never unknown.
        for token in &acked.refresh_tokens {
            match AuthServiceClient::new(channel.clone())
                .refresh_token(proto::RefreshTokenRequest {
                    refresh_token: token.clone(),
                })
                .await
            {
                Ok(_) => {}
                Err(status) => {
                    assert_eq!(status.code(), Code::Unauthenticated);
                    let reason = status.get_details_error_info().map(|info| info.reason);
                    assert_eq!(
                        reason.as_deref(),
                        Some("REFRESH_TOKEN_REUSED"),
                        "round {round}: an acknowledged refresh token was lost"
                    );
                }
            }
        }
        assert_eq!(
            store
                .count("SELECT COUNT(*) FROM sessions s LEFT JOIN users u ON u.id = s.user_id WHERE u.id IS NULL")
                .await,
            0,
            "no session without its user"
        );
        assert_eq!(
            store
                .count("SELECT COUNT(*) FROM refresh_tokens r LEFT JOIN sessions s ON s.id = r.session_id WHERE s.id IS NULL")
                .await,
            0,
            "no refresh token without its session"
        );
        if let Some(check) = store.sqlite_integrity().await {
            assert_eq!(check, "ok");
        }
        eprintln!(
            "round {round}: {} messages, {} logins, {} refresh chains acknowledged and found",
            acked.messages.len(),
            acked.sessions.len(),
            acked.refresh_tokens.len()
        );
    }
    child.kill().unwrap();
    let _ = child.wait();
}

/// SIGTERM in the middle of a load: the process exits on its own, soon, and
/// no call in flight gets INTERNAL or UNKNOWN from the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_exits_cleanly() {
    let store = Store {
        dir: tempfile::tempdir().unwrap(),
        postgres: None,
    };
    let (mut child, port) = start(&store);
    let channel = connect(port).await;
    AuthServiceClient::new(channel.clone())
        .register(proto::RegisterRequest {
            username: "ann".into(),
            email: "ann@example.com".into(),
            password: PASSWORD.into(),
            full_name: None,
        })
        .await
        .unwrap();
    let ann = login(&channel, "ann").await;
    let ann_id = AuthServiceClient::new(channel.clone())
        .get_me(with_bearer(proto::GetMeRequest {}, &ann.access_token))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .id;
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for worker in 0..8 {
        let (channel, token, failures) = (
            channel.clone(),
            ann.access_token.clone(),
            Arc::clone(&failures),
        );
        load.push(tokio::spawn(async move {
            let mut auth = AuthServiceClient::new(channel.clone());
            let mut messages = MessageServiceClient::new(channel);
            for i in 0.. {
                let answer = if worker % 2 == 0 {
                    auth.get_me(with_bearer(proto::GetMeRequest {}, &token))
                        .await
                        .map(|_| ())
                } else {
                    messages
                        .send_message(with_bearer(
                            proto::SendMessageRequest {
                                recipient_id: ann_id,
                                content: format!("note {i}"),
                                parent_id: None,
                                conversation_id: None,
                                request_id: None,
                            },
                            &token,
                        ))
                        .await
                        .map(|_| ())
                };
                if let Err(status) = answer {
                    // The server's own answers; the client's transport errors
                    // (a stream refused by the GOAWAY) carry a source.
                    if std::error::Error::source(&status).is_none()
                        && matches!(status.code(), Code::Internal | Code::Unknown)
                    {
                        failures.lock().unwrap().push(format!("{status:?}"));
                    }
                    return;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = started.elapsed();
    eprintln!("exited {took:?} after SIGTERM, {status}");
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    for task in load {
        let _ = task.await;
    }
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(store.sqlite_integrity().await.as_deref(), Some("ok"));
}
