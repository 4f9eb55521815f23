//! Accepting and serving connections. The server runs its own accept loop
//! (rather than tonic's) so that every connection is bounded from the moment
//! it is accepted, not only once HTTP/2 is up:
//!
//! - it has `handshake_timeout` to finish TLS and send its first request;
//! - with no call in progress for `idle_timeout` it gets a GOAWAY, and is
//!   dropped if the peer does not close it;
//! - at most `max_connections` are open; one more is closed at once;
//! - a failing `accept` (out of file descriptors) pauses the loop instead of
//!   spinning, and the connections already open keep being served;
//! - on shutdown the listener closes at once, connections get GOAWAY and are
//!   dropped as soon as their calls are done, and whatever still runs when
//!   `shutdown_grace` ends is cancelled, so no peer can hold the process.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body::Body as HttpBody;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{Notify, Semaphore, watch},
    task::JoinSet,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::TcpConnectInfo;
use tower::{Service, ServiceExt as _};

/// What the server serves: the layered gRPC routes as one tower service.
pub trait GrpcStack:
    Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> GrpcStack for S where
    S: Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// After a GOAWAY, how long a connection with no call left may take to
/// flush and close by itself before it is dropped.
const LINGER: Duration = Duration::from_millis(250);
/// How long the accept loop pauses after a failed accept (EMFILE and kin).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bounds on every connection; see the module comment.
#[derive(Clone)]
pub struct ConnectionLimits {
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    pub max_streams_per_connection: u32,
    /// The HTTP/2 setting; the contract's own limit is checked per call
    /// (`middleware::Admission`) so that it can answer with a gRPC status.
    pub h2_max_header_list_bytes: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

/// Serves `service` on `listener` until `shutdown` resolves, then drains as
/// the module comment says and returns.
pub async fn serve<S>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) where
    S: GrpcStack,
{
    let builder = Arc::new(http_builder(&limits));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    let mut last_accept_warning: Option<Instant> = None;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        tracing::debug!(%peer, "connection limit reached: closing a new connection");
                        continue;
                    };
                    let connection = Connection {
                        peer,
                        local: stream.local_addr().ok(),
                        limits: limits.clone(),
                        builder: Arc::clone(&builder),
                        closing: closing_rx.clone(),
                        activity: Arc::default(),
                    };
                    let service = service.clone();
                    let tls = tls.clone();
                    connections.spawn(async move {
                        connection.run(stream, tls, service).await;
                        drop(slot);
                    });
                }
                Err(error) => {
                    // The listener stays readable while descriptors are out:
                    // pause rather than spin, and warn at most once a minute.
                    if last_accept_warning.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                        tracing::warn!(%error, open = connections.len(), "accepting a connection failed; pausing accepts briefly");
                        last_accept_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    // Closing the listening socket refuses new connections at once.
    drop(listener);
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            grace = ?limits.shutdown_grace,
            "shutdown grace period over: closing the connections still open"
        );
        connections.shutdown().await;
    }
}

fn http_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    // HTTP/1.1 too, for gRPC-Web from browsers and proxies.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams_per_connection)
        .max_header_list_size(limits.h2_max_header_list_bytes)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        // Bounds on HTTP/2 reset floods (CVE-2023-44487 "rapid reset" and kin).
        .max_pending_accept_reset_streams(100)
        .max_local_error_reset_streams(1024);
    builder
}

/// What the connection's calls report to its loop.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    first_request_seen: AtomicBool,
    changed: Notify,
}

/// Held by a call from its first HEADERS until its response body is done
/// (or dropped), so open streams count as calls in progress.
struct CallInProgress(Arc<Activity>);

impl CallInProgress {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.first_request_seen.store(true, Ordering::Release);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.changed.notify_one();
        Self(Arc::clone(activity))
    }
}

impl Drop for CallInProgress {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

struct Connection {
    peer: SocketAddr,
    local: Option<SocketAddr>,
    limits: ConnectionLimits,
    builder: Arc<auto::Builder<TokioExecutor>>,
    closing: watch::Receiver<bool>,
    activity: Arc<Activity>,
}

impl Connection {
    async fn run<S>(mut self, stream: TcpStream, tls: Option<TlsAcceptor>, service: S)
    where
        S: GrpcStack,
    {
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(self.limits.keepalive_interval);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let deadline = Instant::now() + self.limits.handshake_timeout;
        let tracked = Tracked {
            inner: service,
            activity: Arc::clone(&self.activity),
            info: TcpConnectInfo {
                local_addr: self.local,
                remote_addr: Some(self.peer),
            },
        };
        match tls {
            None => self.serve_http(stream, tracked, deadline).await,
            Some(acceptor) => {
                let handshake = tokio::time::timeout_at(deadline, acceptor.accept(stream));
                let mut closing = self.closing.clone();
                let closing = async move {
                    let _ = closing.wait_for(|closing| *closing).await;
                };
                tokio::select! {
                    shaken = handshake => match shaken {
                        Ok(Ok(stream)) => self.serve_http(stream, tracked, deadline).await,
                        Ok(Err(error)) => tracing::debug!(peer = %self.peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(peer = %self.peer, "TLS handshake not finished in time: closed"),
                    },
                    () = closing => {}
                }
            }
        }
    }

    /// Drives one HTTP/1.1 or HTTP/2 connection, closing it on the first deadline that
    /// passes: no first request by `first_request_by`, idle too long, or
    /// lingering after a GOAWAY with nothing left to finish.
    async fn serve_http<IO, S>(&mut self, io: IO, service: Tracked<S>, first_request_by: Instant)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: GrpcStack,
    {
        let builder = Arc::clone(&self.builder);
        let mut connection = pin!(builder.serve_connection(TokioIo::new(io), service));
        let activity = Arc::clone(&self.activity);
        let mut idle_since = Instant::now();
        let mut goaway_sent_at: Option<Instant> = None;
        let mut closing = false;
        loop {
            let calls = activity.in_flight.load(Ordering::Acquire);
            let started = activity.first_request_seen.load(Ordering::Acquire);
            if calls > 0 {
                idle_since = Instant::now();
            }
            if closing && !started {
                return; // nothing was ever asked: nothing to say goodbye to
            }
            if closing && goaway_sent_at.is_none() {
                connection.as_mut().graceful_shutdown();
                goaway_sent_at = Some(Instant::now());
            }
            let deadline = match (started, calls, goaway_sent_at) {
                (false, _, _) => first_request_by,
                (true, 0, Some(sent)) => sent.max(idle_since) + LINGER,
                // With calls running, `idle_since` is now: the timer only re-arms.
                (true, _, _) => idle_since + self.limits.idle_timeout,
            };
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(error) = served {
                        tracing::debug!(peer = %self.peer, error = %error, "connection ended with an error");
                    }
                    return;
                }
                () = activity.changed.notified() => {}
                changed = self.closing.changed(), if !closing => {
                    closing = changed.is_err() || *self.closing.borrow();
                }
                () = tokio::time::sleep_until(deadline) => {
                    if !activity.first_request_seen.load(Ordering::Acquire) {
                        tracing::debug!(peer = %self.peer, "no request within the handshake timeout: closed");
                        return;
                    }
                    if activity.in_flight.load(Ordering::Acquire) > 0 {
                        continue;
                    }
                    if goaway_sent_at.is_some() {
                        return; // the peer did not close after GOAWAY: drop it
                    }
                    tracing::debug!(peer = %self.peer, "idle connection: GOAWAY");
                    connection.as_mut().graceful_shutdown();
                    goaway_sent_at = Some(Instant::now());
                }
            }
        }
    }
}

/// The per-connection service: records calls in `Activity` and gives each
/// request the connection's addresses (what `Request::remote_addr` reads).
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    info: TcpConnectInfo,
}

impl<S> hyper::service::Service<http::Request<Incoming>> for Tracked<S>
where
    S: GrpcStack,
{
    type Response = http::Response<TrackedBody<tonic::body::Body>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, mut request: http::Request<Incoming>) -> Self::Future {
        let call = CallInProgress::start(&self.activity);
        request.extensions_mut().insert(self.info.clone());
        let answer = self
            .inner
            .clone()
            .oneshot(request.map(tonic::body::Body::new));
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| TrackedBody {
                inner: body,
                _call: call,
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its call counted until it is done.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        _call: CallInProgress,
    }
}

impl<B: HttpBody> HttpBody for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Raises the soft open-file limit to the hard one, so the connection limit
/// and not the descriptor limit is what bounds connections.
pub fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return;
            }
            if limit.rlim_cur < limit.rlim_max {
                let before = limit.rlim_cur;
                limit.rlim_cur = limit.rlim_max;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    tracing::debug!(before, after = limit.rlim_max, "raised the open-file limit");
                }
            }
        }
    }
}

/// A TLS acceptor (rustls, ring, ALPN h2) from PEM certificate chain and key.
pub fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<TlsAcceptor> {
    use tokio_rustls::rustls::{
        ServerConfig,
        crypto::ring,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    };
    let certs = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>()?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in the PEM file");
    let key = PrivateKeyDer::from_pem_slice(key_pem)?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
