//! The gRPC answer of a dispatched REST call, rendered for the REST client:
//! the response message as proto3 JSON, or the status as the
//! `{code, message, details}` error body under its HTTP status; for a server
//! stream, one JSON line (or server-sent event) per message.

use std::task::Poll;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use http::{HeaderValue, StatusCode, header};
use http_body::Frame;
use http_body_util::BodyExt as _;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use tonic::{Code, Status, body::Body};

/// The contract's JSON choices: proto names, defaults printed, unset
/// optional and message fields left out, 64-bit integers as strings.
const JSON: SerializeOptions = SerializeOptions::new()
    .use_proto_field_name(true)
    .skip_default_fields(false)
    .stringify_64_bit_integers(true);

/// The HTTP status of a gRPC code (the grpc-gateway and Envoy table).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
    }
}

pub fn json_response(status: StatusCode, body: impl Into<Bytes>) -> http::Response<Body> {
    let mut answer = http::Response::new(Body::new(http_body_util::Full::new(body.into())));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

/// The error answer for `status`: the body, `WWW-Authenticate` on 401 and
/// `Retry-After` when the details hold a `RetryInfo`.
pub fn error_response(status: &Status, pool: &DescriptorPool) -> http::Response<Body> {
    let (body, retry_after) = error_body(status, pool);
    let mut answer = json_response(http_status(status.code()), body);
    let headers = answer.headers_mut();
    if status.code() == Code::Unauthenticated {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if let Some(seconds) = retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    answer
}

/// The error body, its fields in the contract's order.
#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    code: i32,
    message: &'a str,
    details: Vec<serde_json::Value>,
}

/// `{code, message, details}` with each detail as JSON with its `@type`,
/// and the whole seconds (rounded up) of a `RetryInfo` among them.
fn error_body(status: &Status, pool: &DescriptorPool) -> (String, Option<u64>) {
    let mut details = Vec::new();
    let mut retry_after = None;
    let decoded = tonic_types::pb::Status::decode(status.details()).unwrap_or_default();
    for any in decoded.details {
        let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
        if type_name == "google.rpc.RetryInfo"
            && let Ok(info) = tonic_types::pb::RetryInfo::decode(any.value.as_slice())
            && let Some(delay) = info.retry_delay
        {
            let nanos = u64::from(delay.nanos.max(0).cast_unsigned());
            let seconds = u64::try_from(delay.seconds).unwrap_or(0);
            retry_after = Some(seconds + u64::from(nanos > 0));
        }
        let rendered = pool
            .get_message_by_name(type_name)
            .and_then(|descriptor| DynamicMessage::decode(descriptor, any.value.as_slice()).ok())
            .and_then(|message| {
                message
                    .serialize_with_options(serde_json::value::Serializer, &JSON)
                    .ok()
            });
        let mut detail = match rendered {
            Some(serde_json::Value::Object(fields)) => fields,
            _ => serde_json::Map::new(),
        };
        detail.insert("@type".to_owned(), any.type_url.into());
        details.push(serde_json::Value::Object(detail));
    }
    let body = ErrorBody {
        code: status.code() as i32,
        message: status.message(),
        details,
    };
    (
        serde_json::to_string(&body).unwrap_or_default(),
        retry_after,
    )
}

/// The message of one gRPC frame as proto3 JSON.
fn message_json(descriptor: &MessageDescriptor, frame: Bytes) -> Result<Vec<u8>, Status> {
    let message = DynamicMessage::decode(descriptor.clone(), frame)
        .map_err(|_| Status::internal("the response could not be decoded"))?;
    let mut out = Vec::with_capacity(256);
    message
        .serialize_with_options(&mut serde_json::Serializer::new(&mut out), &JSON)
        .map_err(|_| Status::internal("the response could not be rendered"))?;
    Ok(out)
}

/// Takes every complete length-prefixed message off the front of `buffer`.
fn take_frames(buffer: &mut BytesMut) -> Result<Vec<Bytes>, Status> {
    let mut frames = Vec::new();
    while buffer.len() >= 5 {
        let compressed = buffer[0] != 0;
        let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
        if buffer.len() < 5 + length {
            break;
        }
        if compressed {
            return Err(Status::internal("the response came compressed"));
        }
        buffer.advance(5);
        frames.push(buffer.split_to(length).freeze());
    }
    Ok(frames)
}

/// The status of a finished call: from its trailers-only headers or trailers.
fn final_status(headers: Option<&http::HeaderMap>) -> Status {
    headers
        .and_then(Status::from_header_map)
        .unwrap_or_else(|| Status::unknown("the call ended without a status"))
}

/// A unary call's answer: 200 with the message, or the error answer.
pub async fn unary(
    response: http::Response<Body>,
    output: &MessageDescriptor,
    pool: &DescriptorPool,
) -> http::Response<Body> {
    let (parts, body) = response.into_parts();
    if let Some(status) = Status::from_header_map(&parts.headers) {
        return error_response(&status, pool);
    }
    let collected = match body.collect().await {
        Ok(collected) => collected,
        Err(status) => return error_response(&status, pool),
    };
    let status = final_status(collected.trailers());
    if status.code() != Code::Ok {
        return error_response(&status, pool);
    }
    let mut buffer = BytesMut::from(collected.to_bytes());
    let rendered = take_frames(&mut buffer).and_then(|frames| match frames.into_iter().next() {
        Some(frame) => message_json(output, frame),
        None => Err(Status::internal("the call answered no message")),
    });
    match rendered {
        Ok(json) => {
            let mut answer = json_response(StatusCode::OK, json);
            copy_metadata(&parts.headers, answer.headers_mut());
            answer
        }
        Err(status) => error_response(&status, pool),
    }
}

/// The handler's own response metadata (`cache-control` of GetJwks, say)
/// becomes headers of the REST answer; gRPC's framing headers do not.
fn copy_metadata(from: &http::HeaderMap, to: &mut http::HeaderMap) {
    for (name, value) in from {
        let name_text = name.as_str();
        if name_text.starts_with("grpc-")
            || *name == header::CONTENT_TYPE
            || *name == header::CONTENT_LENGTH
        {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

/// How a server stream's events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFormat {
    /// `application/x-ndjson`: one JSON object per line.
    Lines,
    /// `text/event-stream`: one `data:` event per message.
    ServerSentEvents,
}

impl StreamFormat {
    /// Server-sent events when the client asks for them in `Accept`.
    pub fn from_accept(headers: &http::HeaderMap) -> Self {
        let wants_events = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(|value| value.contains("text/event-stream"));
        if wants_events {
            Self::ServerSentEvents
        } else {
            Self::Lines
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::Lines => "application/x-ndjson",
            Self::ServerSentEvents => "text/event-stream",
        }
    }

    /// `{"<key>": <json>}` framed as one line or one event.
    fn event(self, key: &str, json: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(json.len() + key.len() + 16);
        if self == Self::ServerSentEvents {
            out.put_slice(b"data: ");
        }
        out.put_slice(b"{\"");
        out.put_slice(key.as_bytes());
        out.put_slice(b"\":");
        out.put_slice(json);
        out.put_slice(if self == Self::ServerSentEvents {
            b"}\n\n"
        } else {
            b"}\n"
        });
        out.freeze()
    }
}

/// A server stream's answer: an error answer if the call failed before its
/// headers, else 200 at once and one event per message, then an `error`
/// event if the stream ends with a failure.
pub fn stream(
    response: http::Response<Body>,
    output: MessageDescriptor,
    format: StreamFormat,
    pool: DescriptorPool,
) -> http::Response<Body> {
    let (parts, body) = response.into_parts();
    if let Some(status) = Status::from_header_map(&parts.headers) {
        return error_response(&status, &pool);
    }
    let events = EventStream {
        body,
        buffer: BytesMut::new(),
        output,
        format,
        pool,
        done: false,
    };
    let mut answer = http::Response::new(Body::new(events));
    let headers = answer.headers_mut();
    copy_metadata(&parts.headers, headers);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    answer
}

/// The body of a streamed answer, translated frame by frame.
struct EventStream {
    body: Body,
    buffer: BytesMut,
    output: MessageDescriptor,
    format: StreamFormat,
    pool: DescriptorPool,
    done: bool,
}

impl EventStream {
    fn error_event(&self, status: &Status) -> Bytes {
        let (body, _) = error_body(status, &self.pool);
        self.format.event("error", body.as_bytes())
    }

    /// The events of every complete message in the buffer, or the error
    /// event that ends the stream.
    fn drain(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        let rendered = take_frames(&mut self.buffer).and_then(|frames| {
            for frame in frames {
                out.put(
                    self.format
                        .event("result", &message_json(&self.output, frame)?),
                );
            }
            Ok(())
        });
        if let Err(status) = rendered {
            self.done = true;
            out.put(self.error_event(&status));
        }
        out.freeze()
    }
}

impl http_body::Body for EventStream {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let frame = match std::pin::Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(frame) => frame,
            };
            let out = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        self.buffer.put(data);
                        self.drain()
                    }
                    Err(frame) => {
                        self.done = true;
                        let status = final_status(frame.trailers_ref());
                        if status.code() == Code::Ok {
                            continue;
                        }
                        self.error_event(&status)
                    }
                },
                Some(Err(status)) => {
                    self.done = true;
                    self.error_event(&status)
                }
                None => {
                    self.done = true;
                    self.error_event(&Status::unknown("the stream ended without a status"))
                }
            };
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::{ErrorDetails, StatusExt as _};

    use super::*;

    fn pool() -> DescriptorPool {
        DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap()
    }

    #[test]
    fn every_code_has_the_status_of_the_gateway_table() {
        let table = [
            (Code::Ok, 200),
            (Code::Cancelled, 499),
            (Code::Unknown, 500),
            (Code::InvalidArgument, 400),
            (Code::DeadlineExceeded, 504),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::PermissionDenied, 403),
            (Code::ResourceExhausted, 429),
            (Code::FailedPrecondition, 400),
            (Code::Aborted, 409),
            (Code::OutOfRange, 400),
            (Code::Unimplemented, 501),
            (Code::Internal, 500),
            (Code::Unavailable, 503),
            (Code::DataLoss, 500),
            (Code::Unauthenticated, 401),
        ];
        for (code, expected) in table {
            assert_eq!(http_status(code).as_u16(), expected, "{code:?}");
        }
    }

    #[test]
    fn details_keep_their_type_and_retry_info_rounds_up() {
        let mut details = ErrorDetails::new();
        details.add_bad_request_violation("username", "too short");
        details.set_retry_info(Some(std::time::Duration::from_millis(1500)));
        let status = Status::with_error_details(Code::ResourceExhausted, "slow down", details);
        let (body, retry_after) = error_body(&status, &pool());
        assert_eq!(retry_after, Some(2));
        assert!(
            body.starts_with(r#"{"code":8,"message":"slow down","details":["#),
            "{body}"
        );
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["code"], 8);
        assert_eq!(body["message"], "slow down");
        let details = body["details"].as_array().unwrap();
        let bad_request = details
            .iter()
            .find(|d| d["@type"] == "type.googleapis.com/google.rpc.BadRequest")
            .unwrap();
        assert_eq!(bad_request["field_violations"][0]["field"], "username");
        assert!(
            details
                .iter()
                .any(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo"
                    && d["retry_delay"] == "1.500s")
        );
    }

    #[test]
    fn frames_are_cut_at_their_length_prefix() {
        let mut buffer = BytesMut::new();
        buffer.put_slice(&[0, 0, 0, 0, 2, b'a', b'b', 0, 0, 0, 0, 3, b'c']);
        let frames = take_frames(&mut buffer).unwrap();
        assert_eq!(frames, [Bytes::from_static(b"ab")]);
        assert_eq!(buffer.len(), 6, "the incomplete frame waits for more");
    }

    #[test]
    fn responses_print_defaults_and_leave_unset_optionals_out() {
        let pool = pool();
        let user = pool.get_message_by_name("aimessage.v1.User").unwrap();
        let mut message = DynamicMessage::new(user.clone());
        message.set_field_by_name("id", prost_reflect::Value::I64(42));
        let json: serde_json::Value =
            serde_json::from_slice(&message_json(&user, message.encode_to_vec().into()).unwrap())
                .unwrap();
        assert_eq!(json["id"], "42");
        assert_eq!(json["username"], "");
        assert_eq!(json["is_superuser"], false);
        assert_eq!(json["roles"], serde_json::json!([]));
        assert!(json.get("full_name").is_none());
        assert!(json.get("created_at").is_none());
    }
}
