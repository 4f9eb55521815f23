//! Wiring: connect and migrate, resolve the signing key, bind (port 0 allowed),
//! then serve until a shutdown future resolves. Tests drive the same two steps.

use std::{io::Write as _, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore as _;
use tokio::{net::TcpListener, sync::watch};
use tonic::service::{Routes, interceptor::InterceptedService};
use tonic_health::ServingStatus;

use crate::{
    auth::{
        Authenticator, BearerInterceptor, PasswordHasher, TokenService, cache::SessionCache,
        throttle::Throttle,
    },
    config::{Config, DatabaseTarget, redact_password},
    connections::{self, ConnectionLimits},
    domain::{Clock, SystemClock},
    events::{EventHub, nats::NatsEventChannel},
    proto::{
        self, auth_service_server::AuthServiceServer, message_service_server::MessageServiceServer,
        session_service_server::SessionServiceServer,
        user_admin_service_server::UserAdminServiceServer,
    },
    services::{
        AppState,
        auth::AuthApi,
        health,
        http::{HttpFace, PlainHttpLayer},
        message::MessageApi,
        middleware::{AdmissionLayer, CallLogLayer, CallSlots, CorsLayer, MetricsLayer},
        reflection::{DescriptorIndex, ReflectionV1, ReflectionV1Alpha},
        session::SessionApi,
        user_admin::UserAdminApi,
    },
    storage::{self, Database, batch::MessageWriter},
};

/// Largest request the server decodes; larger ones get RESOURCE_EXHAUSTED.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// A well-formed database URL that cannot be reached stops startup within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens the configured database, with an error naming `DATABASE_URL`.
pub async fn connect_database(target: &DatabaseTarget) -> anyhow::Result<Arc<dyn Database>> {
    let described = match target {
        DatabaseTarget::Sqlite(Some(path)) => format!("sqlite://{}", path.display()),
        DatabaseTarget::Sqlite(None) => "sqlite::memory:".to_owned(),
        DatabaseTarget::Postgres(url) => redact_password(url),
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, storage::open(target)).await {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(error)) => Err(error.context(format!("DATABASE_URL: cannot open {described}"))),
        Err(_) => {
            anyhow::bail!("DATABASE_URL: no answer from {described} within {CONNECT_TIMEOUT:?}")
        }
    }
}

/// Reads a key file, naming `variable` if it cannot.
fn read_key_file(variable: &str, path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("{variable}: cannot read {}", path.display()))
}

/// EdDSA from `AI_MESSAGE_SIGNING_KEY_FILE` (and the keys of
/// `AI_MESSAGE_VERIFY_KEY_FILES`), else HS256 with the resolved secret.
pub fn token_service(config: &Config) -> anyhow::Result<TokenService> {
    let Some(signing_file) = &config.signing_key_file else {
        if !config.verify_key_files.is_empty() {
            tracing::warn!(
                "AI_MESSAGE_VERIFY_KEY_FILES is ignored without AI_MESSAGE_SIGNING_KEY_FILE (HS256)"
            );
        }
        let secret = resolve_secret_key(config)?;
        return Ok(TokenService::new(
            &secret,
            &config.domain,
            config.access_token_ttl,
        ));
    };
    const SIGNING: &str = "AI_MESSAGE_SIGNING_KEY_FILE";
    const VERIFY: &str = "AI_MESSAGE_VERIFY_KEY_FILES";
    let signing = crate::auth::tokens::read_signing_key(&read_key_file(SIGNING, signing_file)?)
        .with_context(|| format!("{SIGNING}: {}", signing_file.display()))?;
    let mut accepted = Vec::new();
    for path in &config.verify_key_files {
        accepted.push(
            crate::auth::tokens::read_verify_key(&read_key_file(VERIFY, path)?)
                .with_context(|| format!("{VERIFY}: {}", path.display()))?,
        );
    }
    let service =
        TokenService::ed25519(&signing, &accepted, &config.domain, config.access_token_ttl)
            .with_context(|| format!("{SIGNING}: {}", signing_file.display()))?;
    tracing::info!(
        kid = %crate::auth::tokens::thumbprint(&signing.verifying_key().to_bytes()),
        also_accepted = accepted.len(),
        "signing access tokens with EdDSA"
    );
    Ok(service)
}

/// The HS256 key: the configured one, else (SQLite) one generated once and
/// kept in a 0600 file beside the database, else (in-memory) a random one.
pub fn resolve_secret_key(config: &Config) -> anyhow::Result<Vec<u8>> {
    if let Some(key) = &config.secret_key {
        return Ok(key.expose().to_vec());
    }
    let generated = || {
        let mut bytes = [0u8; 48];
        rand::rng().fill_bytes(&mut bytes);
        URL_SAFE_NO_PAD.encode(bytes).into_bytes()
    };
    let Some(path) = config.database.secret_file() else {
        return Ok(generated());
    };
    match std::fs::read(&path) {
        Ok(key) if key.len() >= crate::config::MIN_SECRET_KEY_BYTES => return Ok(key),
        Ok(_) => anyhow::bail!(
            "AI_MESSAGE_SECRET_KEY: the key file {} is shorter than 32 bytes",
            path.display()
        ),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error)
                .with_context(|| format!("AI_MESSAGE_SECRET_KEY: cannot read {}", path.display()));
        }
    }
    let key = generated();
    write_private_file(&path, &key)
        .with_context(|| format!("AI_MESSAGE_SECRET_KEY: cannot write {}", path.display()))?;
    tracing::info!(path = %path.display(), "generated a signing key");
    Ok(key)
}

fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// A built server: database open and migrated, port bound, not yet serving.
pub struct Application {
    listener: TcpListener,
    /// `GET /metrics`, when AI_MESSAGE_METRICS_ADDR is set.
    metrics_listener: Option<TcpListener>,
    address: SocketAddr,
    state: Arc<AppState>,
    /// Set to true on shutdown: streams end, background tasks stop.
    stop: watch::Sender<bool>,
    /// Tasks to wait for after the server stops (the event listener).
    background: Vec<tokio::task::JoinHandle<()>>,
    /// Set to true once the last call is done: the writers below drain.
    closing: watch::Sender<bool>,
    /// The group-commit writer and the session-touch writer.
    writers: Vec<tokio::task::JoinHandle<()>>,
}

impl Application {
    /// Builds the server on the system clock.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// Builds the server with `clock` as every rule's "now" (tests move time).
    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        if config.bcrypt_cost < 10 {
            tracing::warn!(
                cost = config.bcrypt_cost,
                "AI_MESSAGE_BCRYPT_COST is below 10: passwords are cheap to crack"
            );
        }
        connections::raise_open_file_limit();
        let db = connect_database(&config.database).await?;
        db.migrate()
            .await
            .context("DATABASE_URL: applying migrations failed")?;
        let tokens = Arc::new(token_service(&config)?);
        let hasher = PasswordHasher::new(config.bcrypt_cost, config.max_pending_hashes);
        let listener = TcpListener::bind((config.host, config.port))
            .await
            .with_context(|| {
                format!(
                    "AI_MESSAGE_PORT: cannot listen on {}:{}",
                    config.host, config.port
                )
            })?;
        let address = listener.local_addr()?;
        let metrics_listener =
            match config.metrics_addr {
                Some(metrics) => Some(TcpListener::bind(metrics).await.with_context(|| {
                    format!("AI_MESSAGE_METRICS_ADDR: cannot listen on {metrics}")
                })?),
                None => None,
            };
        let (stop_tx, stop_rx) = watch::channel(false);
        // Turns true once no call is left: the writers drain and end.
        let (closing_tx, closing_rx) = watch::channel(false);
        let (message_writer, writer_task) =
            MessageWriter::start(Arc::clone(&db), closing_rx.clone())?;
        let sessions = Arc::new(SessionCache::default());
        let (authenticator, touch_task) =
            Authenticator::new(Arc::clone(&db), Arc::clone(&sessions), closing_rx);
        // Events between instances: the NATS bus when configured, else the
        // database's own channel (none for SQLite).
        let (event_channel, bus_is_database) = match &config.nats_url {
            Some(url) => {
                let deployment_id = db
                    .deployment_id()
                    .await
                    .context("DATABASE_URL: cannot read the deployment id")?;
                let bus: Arc<dyn crate::storage::EventChannel> =
                    NatsEventChannel::connect(url, &deployment_id).await?;
                (Some(bus), false)
            }
            None => (db.event_channel(), true),
        };
        let events = EventHub::new(
            event_channel.clone(),
            Arc::clone(&sessions),
            Arc::clone(&clock),
            bus_is_database,
        );
        // Listening before the first call, so a stream is subscribed on every
        // instance from the moment its headers go out.
        let event_listener = match event_channel {
            Some(channel) => {
                let hub = Arc::clone(&events);
                let deliver = Arc::new(move |payload: String| hub.deliver_payload(&payload));
                Some(
                    channel
                        .start_listener(
                            deliver,
                            events.connection_reporter(),
                            {
                                let clock = Arc::clone(&clock);
                                Arc::new(move || clock.now().micros())
                            },
                            stop_rx.clone(),
                        )
                        .await
                        .context("cannot listen for stream events")?,
                )
            }
            None => None,
        };
        Ok(Self {
            listener,
            metrics_listener,
            address,
            stop: stop_tx,
            closing: closing_tx,
            writers: vec![writer_task, touch_task],
            background: event_listener.into_iter().collect(),
            state: Arc::new(AppState {
                throttle: Throttle::new(Arc::clone(&db), &config, Arc::clone(&clock)),
                message_writer,
                auth: authenticator,
                clock,
                db,
                tokens,
                hasher,
                events,
                sessions,
                call_slots: CallSlots::new(config.max_concurrent_calls),
                config,
                shutdown: stop_rx,
                readiness: Arc::default(),
                metrics: crate::metrics::Metrics::new(&served_rpcs()),
            }),
        })
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// The port `GET /metrics` listens on, when it does.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
            .map(|address| address.port())
    }

    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.state)
    }

    /// Serves until `shutdown` resolves; then health turns NOT_SERVING, new
    /// connections stop, and in-flight calls finish before this returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            metrics_listener,
            address,
            state,
            stop: stop_tx,
            mut background,
            closing,
            writers,
        } = self;
        let config = &state.config;

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        // Every name is registered before the first call can arrive; the probe
        // then keeps them current.
        let initial = if state.db.ping().await.is_ok() && *state.events.health_state().borrow() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health::report(&health_reporter, &state.readiness, initial).await;
        background.push(tokio::spawn(
            state.throttle.clone().sweep_regularly(stop_tx.subscribe()),
        ));
        background.push(tokio::spawn(crate::services::revocations::sweep_regularly(
            Arc::clone(&state),
            stop_tx.subscribe(),
        )));
        background.push(tokio::spawn(crate::services::message::sweep_log_regularly(
            Arc::clone(&state),
            stop_tx.subscribe(),
        )));
        background.push(tokio::spawn(
            crate::services::message::index_text_regularly(Arc::clone(&state), stop_tx.subscribe()),
        ));
        background.push(tokio::spawn(health::probe_database(
            Arc::clone(&state.db),
            health_reporter.clone(),
            Arc::clone(&state.readiness),
            state.events.health_state(),
            stop_tx.subscribe(),
        )));

        let required =
            BearerInterceptor::required(Arc::clone(&state.tokens), Arc::clone(&state.clock));
        let optional =
            BearerInterceptor::optional(Arc::clone(&state.tokens), Arc::clone(&state.clock));
        let auth = AuthServiceServer::new(AuthApi::new(Arc::clone(&state)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let user_admin = UserAdminServiceServer::new(UserAdminApi::new(Arc::clone(&state)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let session = SessionServiceServer::new(SessionApi::new(Arc::clone(&state)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let message = MessageServiceServer::new(MessageApi::new(Arc::clone(&state)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);

        let limits = &config.transport;
        let tls = match &config.tls {
            None => None,
            Some(tls) => {
                let cert = std::fs::read(&tls.cert).with_context(|| {
                    format!("AI_MESSAGE_SSL_CERT: cannot read {}", tls.cert.display())
                })?;
                let key = std::fs::read(&tls.key).with_context(|| {
                    format!("AI_MESSAGE_SSL_KEY: cannot read {}", tls.key.display())
                })?;
                Some(
                    connections::tls_acceptor(&cert, &key)
                        .context("AI_MESSAGE_SSL_CERT: invalid certificate or key")?,
                )
            }
        };
        if let Some(listener) = metrics_listener {
            tracing::info!(address = ?listener.local_addr().ok(), "serving metrics");
            background.push(tokio::spawn(serve_metrics(
                listener,
                Arc::clone(&state),
                stop_tx.subscribe(),
            )));
        }
        let mut routes = Routes::builder();
        routes.add_service(health_service);
        if config.reflection {
            use tonic_reflection::pb::{v1, v1alpha};
            let index = Arc::new(
                DescriptorIndex::new(&[
                    proto::FILE_DESCRIPTOR_SET,
                    tonic_health::pb::FILE_DESCRIPTOR_SET,
                    v1::FILE_DESCRIPTOR_SET,
                    v1alpha::FILE_DESCRIPTOR_SET,
                ])
                .context("the embedded descriptor sets do not decode")?,
            );
            routes
                .add_service(v1::server_reflection_server::ServerReflectionServer::new(
                    ReflectionV1(Arc::clone(&index)),
                ))
                .add_service(
                    v1alpha::server_reflection_server::ServerReflectionServer::new(
                        ReflectionV1Alpha(index),
                    ),
                );
        }
        routes
            .add_service(InterceptedService::new(auth, optional))
            .add_service(InterceptedService::new(user_admin, required.clone()))
            .add_service(InterceptedService::new(session, required.clone()))
            .add_service(InterceptedService::new(message, required));
        // gRPC-Web is translated to gRPC first, so every later layer and the
        // handlers see one protocol; CORS answers browsers before all that.
        let service = tower::ServiceBuilder::new()
            .layer(CorsLayer::new(config.cors_origins.clone()))
            .layer(PlainHttpLayer::new(Arc::new(HttpFace::new(Arc::clone(
                &state.readiness,
            ))?)))
            .layer(tonic_web::GrpcWebLayer::new())
            // Recorded only when someone can scrape them.
            .option_layer(config.metrics_addr.map(|_| MetricsLayer {
                metrics: Arc::clone(&state.metrics),
            }))
            .layer(CallLogLayer)
            .layer(AdmissionLayer {
                max_header_list_bytes: limits.max_header_list_bytes as usize,
                request_timeout: limits.request_timeout,
                readiness: Arc::clone(&state.readiness),
                slots: state.call_slots.clone(),
            })
            .service(routes.routes().prepare());
        let connection_limits = ConnectionLimits {
            handshake_timeout: limits.handshake_timeout,
            idle_timeout: limits.idle_timeout,
            max_connections: limits.max_connections,
            shutdown_grace: limits.shutdown_grace,
            max_streams_per_connection: limits.max_streams_per_connection,
            // Four times the contract's limit, which `Admission` enforces
            // with a gRPC status; beyond this HTTP/2 itself refuses.
            h2_max_header_list_bytes: limits.max_header_list_bytes.saturating_mul(4),
            keepalive_interval: limits.keepalive_interval,
            keepalive_timeout: limits.keepalive_timeout,
        };

        let scheme = if tls.is_some() { "TLS" } else { "plaintext" };
        tracing::info!(%address, scheme, "serving gRPC");
        let reporter = health_reporter.clone();
        let readiness = Arc::clone(&state.readiness);
        let on_shutdown = async move {
            shutdown.await;
            tracing::info!("shutting down: reporting NOT_SERVING, finishing in-flight calls");
            health::report(&reporter, &readiness, ServingStatus::NotServing).await;
            let _ = stop_tx.send(true);
        };
        connections::serve(listener, tls, service, connection_limits, on_shutdown).await;
        // No call is left: what the writers hold is written, then they end.
        let _ = closing.send(true);
        for task in background.into_iter().chain(writers) {
            let _ = task.await;
        }
        state.db.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Every RPC the server routes, as (service, method, server-streaming), for
/// the per-RPC metrics: the four services, health and reflection.
fn served_rpcs() -> Vec<(String, String, bool)> {
    let mut rpcs = Vec::new();
    for set in [
        proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(pool) = prost_reflect::DescriptorPool::decode(set) else {
            continue;
        };
        for service in pool.services() {
            for method in service.methods() {
                rpcs.push((
                    service.full_name().to_owned(),
                    method.name().to_owned(),
                    method.is_server_streaming(),
                ));
            }
        }
    }
    rpcs.sort();
    rpcs.dedup();
    rpcs
}

/// Serves `GET /metrics` on `listener` until `stop` turns true.
async fn serve_metrics(
    listener: TcpListener,
    state: Arc<AppState>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let state = Arc::clone(&state);
                    async move {
                        let (status, body) = if request.uri().path() == "/metrics" {
                            (
                                http::StatusCode::OK,
                                state.metrics.render(
                                    state.db.pool_state(),
                                    *state.events.connection_state().borrow(),
                                ),
                            )
                        } else {
                            (
                                http::StatusCode::NOT_FOUND,
                                "only /metrics is here\n".to_owned(),
                            )
                        };
                        let mut answer = http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        ));
                        *answer.status_mut() = status;
                        answer.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static(
                                "text/plain; version=0.0.4; charset=utf-8",
                            ),
                        );
                        Ok::<_, std::convert::Infallible>(answer)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
