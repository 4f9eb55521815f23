//! Requests that are neither gRPC nor gRPC-Web (any `content-type` not
//! starting with `application/grpc`): the plain-HTTP face of the server.
//! Today that is `GET /health` for load balancers that probe over HTTP; any
//! other path answers 404 with the error body REST clients expect. The REST
//! routes of the `google.api.http` annotations will be dispatched from here.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderValue, StatusCode};
use tower::{Layer, Service};

use super::health::Readiness;

#[derive(Clone)]
pub struct PlainHttpLayer {
    readiness: Arc<Readiness>,
}

impl PlainHttpLayer {
    pub fn new(readiness: Arc<Readiness>) -> Self {
        Self { readiness }
    }
}

impl<S> Layer<S> for PlainHttpLayer {
    type Service = PlainHttp<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PlainHttp {
            inner,
            readiness: Arc::clone(&self.readiness),
        }
    }
}

#[derive(Clone)]
pub struct PlainHttp<S> {
    inner: S,
    readiness: Arc<Readiness>,
}

fn is_grpc<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

fn json(status: StatusCode, body: serde_json::Value) -> http::Response<tonic::body::Body> {
    let mut answer = http::Response::new(tonic::body::Body::new(body.to_string()));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

/// The answer to a plain-HTTP request.
fn answer<B>(
    request: &http::Request<B>,
    readiness: &Readiness,
) -> http::Response<tonic::body::Body> {
    if request.uri().path() == "/health" {
        if request.method() != http::Method::GET {
            let mut answer = json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"code": 12, "message": "/health answers GET only", "details": []}),
            );
            answer
                .headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static("GET"));
            return answer;
        }
        return if readiness.serving() {
            json(StatusCode::OK, serde_json::json!({"status": "SERVING"}))
        } else {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "NOT_SERVING"}),
            )
        };
    }
    json(
        StatusCode::NOT_FOUND,
        serde_json::json!({
            "code": 5,
            "message": format!("no route for {} {}", request.method(), request.uri().path()),
            "details": [],
        }),
    )
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for PlainHttp<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
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
        if is_grpc(&request) {
            let mut inner = super::middleware::take_ready(&mut self.inner);
            return Box::pin(inner.call(request));
        }
        let answer = answer(&request, &self.readiness);
        Box::pin(async move { Ok(answer) })
    }
}
