//! Requests that are neither gRPC nor gRPC-Web (any `content-type` not
//! starting with `application/grpc`): the plain-HTTP face of the server.
//! `GET /health` for load balancers, `GET /openapi.json`, and the REST
//! routes of the `google.api.http` annotations. A REST call is turned into
//! the gRPC call it maps to and sent down the same service stack (call log,
//! admission, interceptor, handler) as a native one, so no rule is skipped;
//! its answer is rendered back as JSON.

mod answer;
mod binding;
mod openapi;
mod routes;

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use anyhow::Context as _;
use bytes::{BufMut as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt as _;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};

use self::{
    answer::{StreamFormat, error_response, json_response},
    routes::{Lookup, Route, RouteTable},
};
use super::health::Readiness;
use crate::startup::MAX_MESSAGE_BYTES;

/// What the plain-HTTP face needs, built once at start-up from the
/// descriptor set the server is built from.
pub struct HttpFace {
    readiness: Arc<Readiness>,
    pool: DescriptorPool,
    routes: RouteTable,
    openapi: Bytes,
}

impl HttpFace {
    pub fn new(readiness: Arc<Readiness>) -> anyhow::Result<Self> {
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .context("the embedded descriptor set does not decode")?;
        let routes = RouteTable::from_pool(&pool)
            .map_err(anyhow::Error::msg)
            .context("the google.api.http annotations cannot be served")?;
        let openapi = openapi::document(&routes, &pool).to_string().into();
        Ok(Self {
            readiness,
            pool,
            routes,
            openapi,
        })
    }

    /// The OpenAPI 3.1 document served at `/openapi.json`.
    pub fn openapi(&self) -> &Bytes {
        &self.openapi
    }

    fn error(&self, status: &Status) -> http::Response<Body> {
        error_response(status, &self.pool)
    }

    fn method_not_allowed(&self, path: &str, allowed: &[Method]) -> http::Response<Body> {
        let list = allowed
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let mut answer = self.error(&Status::new(
            Code::Unimplemented,
            format!("{path} answers {list} only"),
        ));
        *answer.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        if let Ok(value) = HeaderValue::from_str(&list) {
            answer.headers_mut().insert(header::ALLOW, value);
        }
        answer
    }

    fn health(&self) -> http::Response<Body> {
        if self.readiness.serving() {
            json_response(StatusCode::OK, r#"{"status":"SERVING"}"#)
        } else {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"status":"NOT_SERVING"}"#,
            )
        }
    }

    /// The answer to one plain-HTTP request; REST calls go through `stack`.
    async fn answer<S>(&self, request: http::Request<Body>, stack: S) -> http::Response<Body>
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>>,
    {
        let path = request.uri().path();
        // The two fixed documents answer GET only.
        let fixed = match path {
            "/health" => Some(self.health()),
            "/openapi.json" => Some(json_response(StatusCode::OK, self.openapi.clone())),
            _ => None,
        };
        if let Some(answer) = fixed {
            return if request.method() == Method::GET {
                answer
            } else {
                self.method_not_allowed(path, &[Method::GET])
            };
        }
        match self.routes.lookup(request.method(), path) {
            Lookup::Found(route, bindings) => {
                match self.dispatch(route, bindings, request, stack).await {
                    Ok(answer) | Err(answer) => answer,
                }
            }
            Lookup::MethodNotAllowed(allowed) => self.method_not_allowed(path, &allowed),
            Lookup::NotFound => self.error(&Status::not_found(format!(
                "no route for {} {path}",
                request.method()
            ))),
        }
    }

    /// Binds the REST request to its RPC, calls it through `stack` and
    /// renders the answer.
    async fn dispatch<S>(
        &self,
        route: &Route,
        bindings: routes::Bindings,
        request: http::Request<Body>,
        mut stack: S,
    ) -> Result<http::Response<Body>, http::Response<Body>>
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>>,
    {
        let (parts, body) = request.into_parts();
        let body = if route.has_body {
            read_body(&parts.headers, body).await.map_err(|status| {
                let mut answer = self.error(&status);
                if status.code() == Code::ResourceExhausted {
                    *answer.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                }
                answer
            })?
        } else {
            Bytes::new()
        };
        let message = binding::request_message(route, bindings, parts.uri.query(), &body)
            .map_err(|status| {
                tracing::info!(target: "ai_message::call", rpc = %route.grpc_path, code = ?status.code(), "REST request refused before dispatch");
                self.error(&status)
            })?;
        let format = StreamFormat::from_accept(&parts.headers);
        let grpc_request = grpc_request(parts, route, &message);
        let Ok(response) = stack.call(grpc_request).await else {
            return Err(self.error(&Status::internal("the call could not be dispatched")));
        };
        let output = route.method.output();
        Ok(if route.method.is_server_streaming() {
            answer::stream(response, output, format, self.pool.clone())
        } else {
            answer::unary(response, &output, &self.pool).await
        })
    }
}

/// A refused body is still read (and dropped) up to this size, so that an
/// HTTP/1.1 client still sending it reads the 413 instead of a reset.
const DRAINED_BYTES: usize = 16 * MAX_MESSAGE_BYTES;
/// ...and for at most this long.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// The body of a REST call, at most `MAX_MESSAGE_BYTES` (else 413, code 8).
async fn read_body(headers: &HeaderMap, mut body: Body) -> Result<Bytes, Status> {
    let too_large = || {
        crate::error::refusal(
            crate::error::Reason::RequestTooLarge,
            format!("the request body is larger than {MAX_MESSAGE_BYTES} bytes"),
            None,
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    if declared.is_some_and(|length| length > DRAINED_BYTES) {
        return Err(too_large());
    }
    let mut collected = BytesMut::new();
    let mut total = 0;
    let reading = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Err(Status::invalid_argument(
                    "the request body could not be read",
                ));
            };
            if let Ok(data) = frame.into_data() {
                total += data.len();
                if total > DRAINED_BYTES {
                    return Err(too_large());
                }
                // Past the limit the rest is only counted.
                if total <= MAX_MESSAGE_BYTES {
                    collected.put(data);
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(DRAIN_TIME, reading).await {
        Ok(Ok(())) if total <= MAX_MESSAGE_BYTES => Ok(collected.freeze()),
        Ok(Err(status)) => Err(status),
        Ok(Ok(())) | Err(_) => Err(too_large()),
    }
}

/// Headers that describe the HTTP message itself, not the call: they are
/// not handed on as gRPC metadata.
fn is_transport_header(name: &header::HeaderName) -> bool {
    matches!(
        *name,
        header::CONTENT_TYPE
            | header::CONTENT_LENGTH
            | header::TRANSFER_ENCODING
            | header::CONNECTION
            | header::UPGRADE
            | header::TE
            | header::HOST
            | header::ACCEPT
            | header::ACCEPT_ENCODING
    ) || name.as_str() == "keep-alive"
        // The body is ours, uncompressed; only a deadline may come along.
        || (name.as_str().starts_with("grpc-") && name.as_str() != "grpc-timeout")
}

/// The gRPC request a REST call maps to: the message framed as gRPC, the
/// client's headers as metadata (`authorization`, `user-agent`,
/// `x-forwarded-for`), and the connection's extensions (the peer address).
fn grpc_request(
    parts: http::request::Parts,
    route: &Route,
    message: &DynamicMessage,
) -> http::Request<Body> {
    let length = message.encoded_len();
    let mut frame = BytesMut::with_capacity(5 + length);
    frame.put_u8(0);
    frame.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
    message.encode_raw(&mut frame);
    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 2);
    for (name, value) in &parts.headers {
        if !is_transport_header(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    let mut request = http::Request::new(Body::new(http_body_util::Full::new(frame.freeze())));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = http::Uri::from(route.grpc_path.clone());
    // gRPC-Web's layer hands on only HTTP/2 requests that are not its own.
    *request.version_mut() = http::Version::HTTP_2;
    *request.headers_mut() = headers;
    *request.extensions_mut() = parts.extensions;
    request
}

#[derive(Clone)]
pub struct PlainHttpLayer {
    face: Arc<HttpFace>,
}

impl PlainHttpLayer {
    pub fn new(face: Arc<HttpFace>) -> Self {
        Self { face }
    }
}

impl<S> Layer<S> for PlainHttpLayer {
    type Service = PlainHttp<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PlainHttp {
            inner,
            face: Arc::clone(&self.face),
        }
    }
}

#[derive(Clone)]
pub struct PlainHttp<S> {
    inner: S,
    face: Arc<HttpFace>,
}

fn is_grpc<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

impl<S> Service<http::Request<Body>> for PlainHttp<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let inner = super::middleware::take_ready(&mut self.inner);
        if is_grpc(&request) {
            let mut inner = inner;
            return Box::pin(inner.call(request));
        }
        let face = Arc::clone(&self.face);
        Box::pin(async move { Ok(face.answer(request, inner).await) })
    }
}
