//! A REST request bound to its RPC's request message: the JSON body (routes
//! with `body: "*"`), then the path variables, and for GET and DELETE the
//! query string. A value that does not fit its field is INVALID_ARGUMENT
//! naming the field, as the service's own validation would answer.

use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value,
};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use super::routes::{Bindings, Route, field_path, set_at_path};

/// INVALID_ARGUMENT with one `BadRequest` violation for `field`.
pub fn invalid_field(field: &str, description: &str) -> Status {
    let mut details = ErrorDetails::new();
    details.add_bad_request_violation(field, description);
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {field}: {description}"),
        details,
    )
}

/// The request message of `route` from what the REST call carried.
pub fn request_message(
    route: &Route,
    bindings: Bindings,
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, Status> {
    let input = route.method.input();
    let mut message = if route.has_body {
        from_json(&input, body)?
    } else {
        DynamicMessage::new(input.clone())
    };
    for (path, text) in bindings {
        let value = parse_text(path.last(), &text)?;
        set_at_path(&mut message, &path, value);
    }
    if !route.has_body {
        for (key, text) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            // Unknown parameters are ignored, as unknown JSON fields are.
            let Ok(path) = field_path(&input, &key) else {
                continue;
            };
            let value = parse_text(path.last(), &text)?;
            set_at_path(&mut message, &path, value);
        }
    }
    Ok(message)
}

/// Proto3 JSON into `descriptor`; an empty body counts as `{}`.
fn from_json(descriptor: &MessageDescriptor, body: &[u8]) -> Result<DynamicMessage, Status> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DynamicMessage::new(descriptor.clone()));
    }
    let options = DeserializeOptions::new().deny_unknown_fields(false);
    let mut json = serde_json::Deserializer::from_slice(body);
    let mut track = serde_path_to_error::Track::new();
    let parsed = DynamicMessage::deserialize_with_options(
        descriptor.clone(),
        serde_path_to_error::Deserializer::new(&mut json, &mut track),
        &options,
    )
    .and_then(|message| json.end().map(|()| message));
    parsed.map_err(|error| {
        let field = proto_field_path(descriptor, &track.path());
        if field.is_empty() {
            Status::invalid_argument(format!("invalid JSON body: {error}"))
        } else {
            invalid_field(&field, &error.to_string())
        }
    })
}

/// The failing place of a JSON body as proto field names (`a.b[2]`), from
/// the path serde recorded with the names the client used.
fn proto_field_path(descriptor: &MessageDescriptor, path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut named = String::new();
    let mut current = Some(descriptor.clone());
    for segment in path.iter() {
        match segment {
            Segment::Map { key } => {
                let field = current.as_ref().and_then(|message| {
                    message
                        .get_field_by_name(key)
                        .or_else(|| message.get_field_by_json_name(key))
                });
                if !named.is_empty() {
                    named.push('.');
                }
                named.push_str(field.as_ref().map_or(key.as_str(), FieldDescriptor::name));
                current = field.and_then(|field| match field.kind() {
                    Kind::Message(inner) => Some(inner),
                    _ => None,
                });
            }
            Segment::Seq { index } => named.push_str(&format!("[{index}]")),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    named
}

/// One value from its text form (a path segment or a query value).
fn parse_text(field: Option<&FieldDescriptor>, text: &str) -> Result<Value, Status> {
    let Some(field) = field else {
        return Err(Status::internal("empty field path"));
    };
    let bad = |what: &str| invalid_field(field.name(), &format!("{text:?} is not {what}"));
    Ok(match field.kind() {
        Kind::String => Value::String(text.to_owned()),
        Kind::Bool => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(bad("true or false")),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(text.parse().map_err(|_| bad("a 32-bit integer"))?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(text.parse().map_err(|_| bad("a 64-bit integer"))?)
        }
        Kind::Uint32 | Kind::Fixed32 => Value::U32(
            text.parse()
                .map_err(|_| bad("an unsigned 32-bit integer"))?,
        ),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(
            text.parse()
                .map_err(|_| bad("an unsigned 64-bit integer"))?,
        ),
        Kind::Double => Value::F64(text.parse().map_err(|_| bad("a number"))?),
        Kind::Float => Value::F32(text.parse().map_err(|_| bad("a number"))?),
        Kind::Bytes => {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(text)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text))
                .map_err(|_| bad("base64"))?;
            Value::Bytes(decoded.into())
        }
        Kind::Enum(enumeration) => {
            let number = enumeration
                .get_value_by_name(text)
                .map(|value| value.number())
                .or_else(|| text.parse().ok())
                .ok_or_else(|| bad(&format!("a value of {}", enumeration.full_name())))?;
            Value::EnumNumber(number)
        }
        // Well-known types with a JSON string form (Timestamp, Duration, ...).
        Kind::Message(message) => {
            DynamicMessage::deserialize(message.clone(), serde_json::Value::String(text.to_owned()))
                .map(Value::Message)
                .map_err(|_| bad(&format!("a {}", message.full_name())))?
        }
    })
}

#[cfg(test)]
mod tests {
    use http::Method;
    use prost_reflect::DescriptorPool;
    use tonic_types::StatusExt as _;

    use super::*;
    use crate::services::http::routes::{Lookup, RouteTable};

    fn bind(
        method: Method,
        path: &str,
        query: Option<&str>,
        body: &str,
    ) -> Result<DynamicMessage, Status> {
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let table = RouteTable::from_pool(&pool).unwrap();
        let Lookup::Found(route, bindings) = table.lookup(&method, path) else {
            panic!("{method} {path} is a route");
        };
        request_message(route, bindings, query, body.as_bytes())
    }

    fn violated_field(status: &Status) -> String {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        status.get_details_bad_request().unwrap().field_violations[0]
            .field
            .clone()
    }

    #[test]
    fn bodies_take_proto_and_json_names_and_64_bit_integers_as_numbers_or_strings() {
        for body in [
            r#"{"recipient_id": 7, "content": "hi"}"#,
            r#"{"recipientId": "7", "content": "hi", "unknown": [1]}"#,
        ] {
            let message = bind(Method::POST, "/messages", None, body).unwrap();
            assert_eq!(
                message.get_field_by_name("recipient_id").unwrap().as_i64(),
                Some(7)
            );
            assert_eq!(
                message.get_field_by_name("content").unwrap().as_str(),
                Some("hi")
            );
        }
    }

    #[test]
    fn an_empty_body_is_an_empty_message() {
        let message = bind(Method::POST, "/auth/logout", None, "").unwrap();
        assert_eq!(message.fields().count(), 0);
    }

    #[test]
    fn a_wrong_json_type_names_the_field_by_its_proto_name() {
        for (path, body, field) in [
            ("/messages", r#"{"recipientId": "seven"}"#, "recipient_id"),
            (
                "/messages:markRead",
                r#"{"message_ids": [1, "x"]}"#,
                "message_ids[1]",
            ),
        ] {
            let status = bind(Method::POST, path, None, body).unwrap_err();
            assert_eq!(violated_field(&status), field, "{body}");
        }
    }

    #[test]
    fn malformed_json_is_invalid_argument() {
        for body in ["{", "[1]", "null", r#"{"content": "a"} trailing"#] {
            let status = bind(Method::POST, "/messages", None, body).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{body}: {status:?}");
        }
    }

    #[test]
    fn query_parameters_bind_by_either_name_and_repeat_for_lists() {
        let message = bind(
            Method::GET,
            "/messages",
            Some("withUserId=5&unread_only=true&page_size=3&bogus=1"),
            "",
        )
        .unwrap();
        assert_eq!(
            message.get_field_by_name("with_user_id").unwrap().as_i64(),
            Some(5)
        );
        assert_eq!(
            message.get_field_by_name("unread_only").unwrap().as_bool(),
            Some(true)
        );
        assert_eq!(
            message.get_field_by_name("page_size").unwrap().as_i32(),
            Some(3)
        );
        let status = bind(Method::GET, "/messages", Some("page_size=many"), "").unwrap_err();
        assert_eq!(violated_field(&status), "page_size");
    }

    #[test]
    fn path_variables_bind_and_win_over_the_body() {
        let message = bind(
            Method::PUT,
            "/auth/users/9/roles",
            None,
            r#"{"user_id": 1}"#,
        )
        .unwrap();
        assert_eq!(
            message.get_field_by_name("user_id").unwrap().as_i64(),
            Some(9)
        );
        let status = bind(Method::GET, "/messages/abc", None, "").unwrap_err();
        assert_eq!(violated_field(&status), "message_id");
    }
}
