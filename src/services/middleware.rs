//! Tower layers around every gRPC call:
//! - `CallLog`: a log line per call with method, status code and latency (at
//!   `info` for failures, `debug` for successes), and three corrections to
//!   tonic's codes the contract asks for (an oversized request is
//!   RESOURCE_EXHAUSTED, not OUT_OF_RANGE; an undecodable one, or one with no
//!   request message, is INVALID_ARGUMENT, not INTERNAL);
//! - `Admission`: whether a call may start (metadata size, database known
//!   down, unary calls beyond the concurrency limit) and its deadline.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderMap, HeaderValue};
use tonic::Code;
use tower::{Layer, Service};

use crate::error::{OVERLOAD_RETRY, Reason, refusal};

/// The service that was polled ready serves the call; a fresh clone stays
/// behind for the next one (the tower idiom for services moved into futures).
pub(super) fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

#[derive(Clone, Copy, Default)]
pub struct CallLogLayer;

impl<S> Layer<S> for CallLogLayer {
    type Service = CallLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallLog { inner }
    }
}

#[derive(Clone)]
pub struct CallLog<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for CallLog<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let started = tokio::time::Instant::now();
        let request_id = crate::error::new_request_id();
        let trace_id = trace_id(request.headers());
        // The call's span: every log line of the handler nests under it.
        let span = tracing::info_span!(
            target: "ai_message::call",
            "call",
            method = %request.uri().path(),
            %request_id,
            %trace_id,
        );
        let mut inner = take_ready(&mut self.inner);
        let call = async move {
            let mut response = inner.call(request).await?;
            let code = correct_status(response.headers_mut());
            let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
            // One line per failed call at the default level; per call at debug.
            if code == Code::Ok {
                tracing::debug!(target: "ai_message::call", code = ?code, latency_ms, "call");
            } else {
                tracing::info!(target: "ai_message::call", code = ?code, latency_ms, "call");
            }
            Ok(response)
        };
        Box::pin(
            crate::error::REQUEST_ID.scope(request_id, tracing::Instrument::instrument(call, span)),
        )
    }
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`,
/// from gRPC metadata or an HTTP header: the same header map), or a fresh
/// one. An exporter (tracing-opentelemetry) would take the parent from the
/// same header.
pub fn trace_id(headers: &HeaderMap) -> String {
    let parent = headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let mut parts = value.trim().split('-');
            let (version, trace, span, flags) =
                (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
            let hex = |text: &str, length: usize| {
                text.len() == length && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            };
            let nonzero = |text: &str| text.bytes().any(|b| b != b'0');
            (hex(version, 2)
                && version != "ff"
                && hex(trace, 32)
                && nonzero(trace)
                && hex(span, 16)
                && nonzero(span)
                && hex(flags, 2))
            .then(|| trace.to_owned())
        });
    parent.unwrap_or_else(|| {
        use rand::RngCore as _;
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    })
}

/// The code in a `grpc-status` header, if there is one.
fn grpc_code(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .map(Code::from_i32)
}

/// Words of tonic's own messages for requests it could not decode
/// (protobuf errors, bad framing or compression flags, truncated bodies).
const CODEC_WORDS: [&str; 4] = ["decod", "protocol", "decompress", "EOF"];

/// Rewrites the two codes tonic picks itself for undecodable or oversized
/// requests, and returns the call's code as sent in the headers (a unary
/// error is always "trailers-only", so it is there; OK otherwise).
fn correct_status(headers: &mut HeaderMap) -> Code {
    let Some(code) = grpc_code(headers) else {
        return Code::Ok;
    };
    let message = headers
        .get("grpc-message")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let corrected = match code {
        // `grpc-message` is percent-encoded, so match single words.
        Code::OutOfRange if message.contains("large") => Some(refusal(
            Reason::RequestTooLarge,
            "request message is larger than the server accepts",
            None,
        )),
        Code::Internal if message.contains("Missing") => Some(tonic::Status::invalid_argument(
            "the call carries no request message",
        )),
        Code::Internal if CODEC_WORDS.iter().any(|word| message.contains(word)) => Some(
            tonic::Status::invalid_argument("request message could not be decoded"),
        ),
        _ => None,
    };
    let Some(status) = corrected else {
        return code;
    };
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        headers.remove(name);
    }
    // The texts are fixed and ASCII, so the headers always encode.
    let _ = status.add_header(headers);
    status.code()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(code: Code, message: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from(code as i32));
        headers.insert("grpc-message", HeaderValue::from_str(message).unwrap());
        headers
    }

    #[test]
    fn a_valid_traceparent_keeps_its_trace_id_and_anything_else_gets_a_fresh_one() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("traceparent", HeaderValue::from_str(value).unwrap());
            trace_id(&headers)
        };
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(with(&format!("00-{trace}-00f067aa0ba902b7-01")), trace);
        for bad in [
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
            format!("00-{trace}-0000000000000000-01"),
            format!("ff-{trace}-00f067aa0ba902b7-01"),
            format!("00-{}-00f067aa0ba902b7-01", trace.to_uppercase()),
            "garbage".to_owned(),
        ] {
            let fresh = with(&bad);
            assert_ne!(fresh, trace, "{bad}");
            assert_eq!(fresh.len(), 32);
        }
        assert_ne!(trace_id(&HeaderMap::new()), trace_id(&HeaderMap::new()));
    }

    #[test]
    fn oversized_requests_become_resource_exhausted() {
        let mut h = headers(
            Code::OutOfRange,
            "Error,%20decoded%20message%20length%20too%20large:%20found%205242880%20bytes",
        );
        assert_eq!(correct_status(&mut h), Code::ResourceExhausted);
        assert_eq!(h["grpc-status"], "8");
    }

    #[test]
    fn undecodable_requests_become_invalid_argument() {
        let mut h = headers(Code::Internal, "failed%20to%20decode%20Protobuf%20message");
        assert_eq!(correct_status(&mut h), Code::InvalidArgument);
        assert_eq!(h["grpc-status"], "3");
    }

    #[test]
    fn a_call_without_a_request_message_is_invalid_argument() {
        let mut h = headers(Code::Internal, "Missing%20request%20message.");
        assert_eq!(correct_status(&mut h), Code::InvalidArgument);
        assert_eq!(h["grpc-status"], "3");
    }

    #[test]
    fn header_list_size_counts_pseudo_headers_and_32_bytes_per_field() {
        let request = http::Request::builder()
            .method("POST")
            .uri("http://h/p")
            .header("ab", "cd")
            .body(())
            .unwrap();
        // :method POST, :scheme http, :authority h, :path /p, ab: cd
        let expected = (7 + 4) + (7 + 4) + (10 + 1) + (5 + 2) + (2 + 2) + 5 * 32;
        assert_eq!(header_list_size(&request), expected);
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        use std::time::Duration;
        assert_eq!(grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(grpc_timeout("123456789S"), None, "at most 8 digits");
        assert_eq!(grpc_timeout("S"), None);
        assert_eq!(grpc_timeout("5x"), None);
    }

    #[test]
    fn streams_health_and_password_rpcs_hold_no_slot() {
        assert!(holds_no_slot("/aimessage.v1.MessageService/StreamMessages"));
        assert!(holds_no_slot("/aimessage.v1.AuthService/Login"));
        assert!(holds_no_slot("/grpc.health.v1.Health/Check"));
        assert!(!holds_no_slot("/aimessage.v1.AuthService/GetMe"));
        assert!(!holds_no_slot("/aimessage.v1.MessageService/SendMessage"));
    }

    #[test]
    fn other_codes_are_left_alone() {
        let mut h = headers(Code::Internal, "internal error");
        assert_eq!(correct_status(&mut h), Code::Internal);
        assert_eq!(correct_status(&mut HeaderMap::new()), Code::Ok);
    }
}

/// The bound on unary calls in flight across the whole process
/// (`AI_MESSAGE_MAX_CONCURRENT_CALLS`): beyond it a call is refused at once,
/// never queued. Streams, health and reflection are not counted, and the
/// password-hashing RPCs have their own bound (`PasswordHasher`).
#[derive(Clone)]
pub struct CallSlots {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    limit: usize,
}

impl CallSlots {
    pub fn new(limit: usize) -> Self {
        Self {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(limit)),
            limit,
        }
    }

    /// Calls holding a slot right now.
    pub fn in_flight(&self) -> usize {
        self.limit - self.permits.available_permits()
    }
}

/// Health and reflection: answered without the database.
fn is_health_or_reflection(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

/// Paths that hold no slot: streams, health, reflection, and the RPCs whose
/// cost (bcrypt) is bounded by the hasher's own queue.
fn holds_no_slot(path: &str) -> bool {
    const EXEMPT: [&str; 5] = [
        "/aimessage.v1.MessageService/StreamMessages",
        "/aimessage.v1.AuthService/Register",
        "/aimessage.v1.AuthService/Login",
        "/aimessage.v1.AuthService/ChangePassword",
        "/aimessage.v1.UserAdminService/CreateUser",
    ];
    EXEMPT.contains(&path) || is_health_or_reflection(path)
}

/// The size HTTP/2 gives a header list (RFC 9113 6.5.2): every field's name
/// and value plus 32 bytes each, pseudo-header fields included.
fn header_list_size<B>(request: &http::Request<B>) -> usize {
    const PER_FIELD: usize = 32;
    let uri = request.uri();
    let pseudo = [
        (":method", request.method().as_str().len()),
        (":scheme", uri.scheme_str().unwrap_or("http").len()),
        (
            ":authority",
            uri.authority().map_or(0, |a| a.as_str().len()),
        ),
        (
            ":path",
            uri.path_and_query().map_or(1, |p| p.as_str().len()),
        ),
    ];
    let pseudo: usize = pseudo
        .iter()
        .map(|(name, value)| name.len() + value + PER_FIELD)
        .sum();
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + PER_FIELD)
        .sum();
    pseudo + fields
}

/// A `grpc-timeout` value: at most 8 digits and one unit (H, M, S, m, u, n).
fn grpc_timeout(text: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Whether a call may start, in this order:
/// - metadata over `max_header_list_bytes` is RESOURCE_EXHAUSTED (HTTP/2
///   itself is set to four times that, so that gRPC clients get a status
///   rather than a bare HTTP 431);
/// - while the health probe finds the database unreachable, every call but
///   health and reflection (which need none) is UNAVAILABLE at once, so none
///   holds a slot for a pool timeout during an outage;
/// - a unary call beyond the free `CallSlots` is RESOURCE_EXHAUSTED at once;
/// - the answer's headers must arrive within the call's deadline: the
///   server's `request_timeout`, or the client's shorter `grpc-timeout` (a
///   stream's body is not cut by it).
#[derive(Clone)]
pub struct AdmissionLayer {
    pub max_header_list_bytes: usize,
    pub request_timeout: std::time::Duration,
    pub readiness: std::sync::Arc<super::health::Readiness>,
    pub slots: CallSlots,
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            rules: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    rules: AdmissionLayer,
}

impl AdmissionLayer {
    /// The slot the call holds until it answers (`None`: it needs none), or
    /// the status that refuses it.
    fn admit<B>(
        &self,
        request: &http::Request<B>,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, tonic::Status> {
        if header_list_size(request) > self.max_header_list_bytes {
            return Err(refusal(
                Reason::RequestTooLarge,
                format!(
                    "request metadata is larger than {} bytes",
                    self.max_header_list_bytes
                ),
                None,
            ));
        }
        let path = request.uri().path();
        if !is_health_or_reflection(path) && !self.readiness.database_reachable() {
            return Err(tonic::Status::unavailable(
                "the database is unreachable; retry shortly",
            ));
        }
        if holds_no_slot(path) {
            return Ok(None);
        }
        std::sync::Arc::clone(&self.slots.permits)
            .try_acquire_owned()
            .map(Some)
            .map_err(|_| {
                refusal(
                    Reason::ServerOverloaded,
                    "the server is at capacity; retry shortly",
                    Some(OVERLOAD_RETRY),
                )
            })
    }

    fn deadline<B>(&self, request: &http::Request<B>) -> std::time::Duration {
        request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(grpc_timeout)
            .map_or(self.request_timeout, |asked| {
                asked.min(self.request_timeout)
            })
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Admission<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let slot = match self.rules.admit(&request) {
            Ok(slot) => slot,
            Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
        };
        let deadline = self.rules.deadline(&request);
        Box::pin(async move {
            let answer = tokio::time::timeout(deadline, inner.call(request)).await;
            drop(slot);
            answer.unwrap_or_else(|_| {
                Ok(
                    tonic::Status::deadline_exceeded("the call did not finish before its deadline")
                        .into_http(),
                )
            })
        })
    }
}

/// CORS for browsers (gRPC-Web): only origins in `AI_MESSAGE_CORS_ORIGINS`
/// get `Access-Control-*` headers; with none configured, none is ever sent.
/// A preflight from an allowed origin is answered here (204); every other
/// answer to it names the origin and exposes the gRPC status headers.
#[derive(Clone)]
pub struct CorsLayer {
    origins: std::sync::Arc<crate::config::CorsOrigins>,
}

impl CorsLayer {
    pub fn new(origins: crate::config::CorsOrigins) -> Self {
        Self {
            origins: std::sync::Arc::new(origins),
        }
    }
}

impl<S> Layer<S> for CorsLayer {
    type Service = Cors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cors {
            inner,
            origins: std::sync::Arc::clone(&self.origins),
        }
    }
}

#[derive(Clone)]
pub struct Cors<S> {
    inner: S,
    origins: std::sync::Arc<crate::config::CorsOrigins>,
}

const CORS_ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";
const CORS_ALLOW_HEADERS: &str =
    "authorization, content-type, x-grpc-web, x-user-agent, grpc-timeout";
const CORS_EXPOSE_HEADERS: &str = "grpc-status, grpc-message, grpc-status-details-bin";
const CORS_MAX_AGE_SECONDS: &str = "86400";

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Cors<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let origin = request
            .headers()
            .get(http::header::ORIGIN)
            .filter(|origin| origin.to_str().is_ok_and(|o| self.origins.allows(o)))
            .cloned();
        let Some(origin) = origin else {
            return Box::pin(inner.call(request));
        };
        let preflight = request.method() == http::Method::OPTIONS
            && request
                .headers()
                .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
        if preflight {
            let mut answer = http::Response::new(ResBody::default());
            *answer.status_mut() = http::StatusCode::NO_CONTENT;
            let headers = answer.headers_mut();
            headers.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(
                http::header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(CORS_ALLOW_METHODS),
            );
            headers.insert(
                http::header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(CORS_ALLOW_HEADERS),
            );
            headers.insert(
                http::header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static(CORS_MAX_AGE_SECONDS),
            );
            headers.insert(http::header::VARY, HeaderValue::from_static("origin"));
            return Box::pin(async move { Ok(answer) });
        }
        Box::pin(async move {
            let mut answer = inner.call(request).await?;
            let headers = answer.headers_mut();
            headers.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(
                http::header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(CORS_EXPOSE_HEADERS),
            );
            headers.append(http::header::VARY, HeaderValue::from_static("origin"));
            Ok(answer)
        })
    }
}

/// Counts every call under its RPC (`grpc_server_*`): started when it
/// arrives, handled with its code when it ends (trailers-only answers at
/// once, others when their body's trailers pass), timed from start to end.
/// It sits inside the gRPC-Web translation and the REST dispatch, so their
/// calls count under the RPC they reach.
#[derive(Clone)]
pub struct MetricsLayer {
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            metrics: std::sync::Arc::clone(&self.metrics),
        }
    }
}

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// The call's code from `grpc-status`, and what its ErrorInfo says happened.
fn record_end(
    metrics: &crate::metrics::Metrics,
    path: &str,
    headers: Option<&HeaderMap>,
    started: tokio::time::Instant,
) {
    let code = headers.and_then(grpc_code).unwrap_or(Code::Unknown);
    if let Some(rpc) = metrics.rpc(path) {
        rpc.handled(code, started.elapsed());
    }
    if matches!(code, Code::Unauthenticated | Code::ResourceExhausted)
        && let Some(status) = headers.and_then(tonic::Status::from_header_map)
    {
        use tonic_types::StatusExt as _;
        if let Some(info) = status.get_details_error_info() {
            metrics.refused(&info.reason);
        }
    }
}

impl<S> Service<http::Request<tonic::body::Body>> for Metered<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let started = tokio::time::Instant::now();
        let path = request.uri().path().to_owned();
        if let Some(rpc) = self.metrics.rpc(&path) {
            rpc.started();
        }
        let metrics = std::sync::Arc::clone(&self.metrics);
        let mut inner = take_ready(&mut self.inner);
        Box::pin(async move {
            let response = inner.call(request).await?;
            if response.headers().contains_key("grpc-status") {
                record_end(&metrics, &path, Some(response.headers()), started);
                return Ok(response);
            }
            Ok(response.map(|body| {
                tonic::body::Body::new(MeteredBody {
                    body,
                    end: Some(CallEnd {
                        metrics,
                        path,
                        started,
                    }),
                })
            }))
        })
    }
}

/// What a body still has to record when its call ends.
struct CallEnd {
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    path: String,
    started: tokio::time::Instant,
}

pin_project_lite::pin_project! {
    /// A response body that records its call's end at its trailers (or,
    /// if the client goes away first, as CANCELLED when dropped).
    struct MeteredBody {
        #[pin]
        body: tonic::body::Body,
        end: Option<CallEnd>,
    }

    impl PinnedDrop for MeteredBody {
        fn drop(this: Pin<&mut Self>) {
            if let Some(end) = this.project().end.take() {
                let mut cancelled = HeaderMap::new();
                cancelled.insert("grpc-status", HeaderValue::from(Code::Cancelled as i32));
                record_end(&end.metrics, &end.path, Some(&cancelled), end.started);
            }
        }
    }
}

impl http_body::Body for MeteredBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.body.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(end) = this.end.take()
                {
                    record_end(&end.metrics, &end.path, Some(trailers), end.started);
                }
            }
            Some(Err(_)) | None => {
                if let Some(end) = this.end.take() {
                    record_end(&end.metrics, &end.path, None, end.started);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
