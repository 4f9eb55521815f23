//! A tower layer around every gRPC call: one log line per call with method,
//! status code and latency, and two corrections to tonic's codes the contract
//! asks for (an oversized request is RESOURCE_EXHAUSTED, not OUT_OF_RANGE; an
//! undecodable one is INVALID_ARGUMENT, not INTERNAL).

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use http::{HeaderMap, HeaderValue};
use tonic::Code;
use tower::{Layer, Service};

/// The service that was polled ready serves the call; a fresh clone stays
/// behind for the next one (the tower idiom for services moved into futures).
fn take_ready<S: Clone>(inner: &mut S) -> S {
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
        let method = request.uri().path().to_owned();
        let started = Instant::now();
        let mut inner = take_ready(&mut self.inner);
        Box::pin(async move {
            let mut response = inner.call(request).await?;
            let code = correct_status(response.headers_mut());
            let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(target: "ai_message::call", %method, code = ?code, latency_ms, "call");
            Ok(response)
        })
    }
}

/// Words of tonic's own messages for requests it could not decode
/// (protobuf errors, bad framing or compression flags, truncated bodies).
const CODEC_WORDS: [&str; 4] = ["decod", "protocol", "decompress", "EOF"];

/// Rewrites the two codes tonic picks itself for undecodable or oversized
/// requests, and returns the call's code as sent in the headers (a unary
/// error is always "trailers-only", so it is there; OK otherwise).
fn correct_status(headers: &mut HeaderMap) -> Code {
    let Some(code) = headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .map(Code::from_i32)
    else {
        return Code::Ok;
    };
    let message = headers
        .get("grpc-message")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let corrected = match code {
        // `grpc-message` is percent-encoded, so match single words.
        Code::OutOfRange if message.contains("large") => Some((
            Code::ResourceExhausted,
            "request message is larger than the server accepts",
        )),
        Code::Internal if CODEC_WORDS.iter().any(|word| message.contains(word)) => Some((
            Code::InvalidArgument,
            "request message could not be decoded",
        )),
        _ => None,
    };
    let Some((code, text)) = corrected else {
        return code;
    };
    headers.insert("grpc-status", HeaderValue::from(code as i32));
    headers.insert("grpc-message", HeaderValue::from_static(text));
    headers.remove("grpc-status-details-bin");
    code
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

/// Load shedding for unary calls: at most `limit` in flight across the whole
/// process; beyond that a call is refused at once with RESOURCE_EXHAUSTED
/// (never queued). Streams, health and reflection are not counted, and the
/// password-hashing RPCs have their own bound (`PasswordHasher`).
#[derive(Clone)]
pub struct LoadShedLayer {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    limit: usize,
}

impl LoadShedLayer {
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

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShed {
            inner,
            permits: std::sync::Arc::clone(&self.permits),
        }
    }
}

#[derive(Clone)]
pub struct LoadShed<S> {
    inner: S,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
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
    EXEMPT.contains(&path)
        || path.starts_with("/grpc.health.")
        || path.starts_with("/grpc.reflection.")
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for LoadShed<S>
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
        if holds_no_slot(request.uri().path()) {
            return Box::pin(inner.call(request));
        }
        let Ok(permit) = std::sync::Arc::clone(&self.permits).try_acquire_owned() else {
            let status =
                tonic::Status::resource_exhausted("the server is at capacity; retry shortly");
            return Box::pin(async move { Ok(status.into_http()) });
        };
        Box::pin(async move {
            let response = inner.call(request).await;
            drop(permit);
            response
        })
    }
}
