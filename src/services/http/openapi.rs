//! The OpenAPI 3.1 document of the REST routes, generated at start-up from
//! the same descriptor the routes come from: paths, path and query
//! parameters, bodies, response schemas (components named after the full
//! message names), the error body, and the bearer scheme where it applies.

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use super::routes::{Route, RouteTable};

/// The error body's schema.
const STATUS: &str = "google.rpc.Status";
/// Details the server attaches to errors, described for clients that decode them.
const ERROR_DETAILS: [&str; 3] = [
    "google.rpc.BadRequest",
    "google.rpc.RetryInfo",
    "google.rpc.ErrorInfo",
];

/// Which way a message travels: answers print every field that has no
/// presence, so those are required there; requests accept looser forms.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

pub fn document(routes: &RouteTable, pool: &DescriptorPool) -> Value {
    let mut paths: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
    for route in routes.routes() {
        paths.entry(&route.pattern).or_default().insert(
            route.http_method.as_str().to_ascii_lowercase(),
            operation(route),
        );
    }
    let mut paths: Map<String, Value> = paths
        .into_iter()
        .map(|(path, operations)| (path.to_owned(), Value::Object(operations)))
        .collect();
    paths.insert("/health".to_owned(), health_path());

    let mut sides: BTreeMap<String, BTreeSet<bool>> = BTreeMap::new();
    let mut reach = |message: MessageDescriptor, side: Side| {
        collect(message, side, &mut sides);
    };
    for route in routes.routes() {
        reach(route.method.input(), Side::Request);
        reach(route.method.output(), Side::Response);
    }
    for name in std::iter::once(STATUS).chain(ERROR_DETAILS) {
        if let Some(message) = pool.get_message_by_name(name) {
            reach(message, Side::Response);
        }
    }
    let schemas: Map<String, Value> = sides
        .iter()
        .filter_map(|(name, seen)| {
            let message = pool.get_message_by_name(name)?;
            // A message seen both ways is described loosely enough for both.
            let side = if seen.contains(&true) {
                Side::Request
            } else {
                Side::Response
            };
            Some((name.clone(), message_schema(&message, side)))
        })
        .collect();

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "ai-message",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Accounts, sessions and messages. Every route is the REST form of a gRPC method of the same server (see the google.api.http annotations of its descriptor); errors are the google.rpc.Status of that call as JSON.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
        },
    })
}

fn reference(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn error_response() -> Value {
    json!({
        "description": "The call's error: the gRPC code, message and details; the HTTP status follows the code.",
        "content": {"application/json": {"schema": reference(STATUS)}},
    })
}

fn health_path() -> Value {
    let status = |value: &str| {
        json!({
            "content": {"application/json": {"schema": {
                "type": "object",
                "properties": {"status": {"const": value}},
                "required": ["status"],
            }}},
        })
    };
    let mut serving = status("SERVING");
    serving["description"] = "The server and its database are serving.".into();
    let mut not_serving = status("NOT_SERVING");
    not_serving["description"] =
        "The server cannot serve (database or event channel down, or shutting down).".into();
    json!({"get": {
        "operationId": "Health",
        "summary": "Liveness and readiness, as grpc.health.v1.Health/Check for the service \"\".",
        "tags": ["Health"],
        "security": [],
        "responses": {"200": serving, "503": not_serving},
    }})
}

fn operation(route: &Route) -> Value {
    let method = &route.method;
    let service = method.parent_service();
    let input = method.input();
    let bound: Vec<FieldDescriptor> = route.template.bound_fields().cloned().collect();
    let mut parameters: Vec<Value> = bound
        .iter()
        .map(|field| {
            json!({
                "name": field.name(),
                "in": "path",
                "required": true,
                "description": comment(&field.parent_file(), field.path()),
                "schema": field_schema(field, Side::Request),
            })
        })
        .collect();
    if !route.has_body {
        parameters.extend(
            input
                .fields()
                .filter(|field| !bound.contains(field) && !matches!(field.kind(), Kind::Message(_)))
                .map(|field| {
                    let mut parameter = json!({
                        "name": field.name(),
                        "in": "query",
                        "required": false,
                        "description": comment(&field.parent_file(), field.path()),
                        "schema": field_schema(&field, Side::Request),
                    });
                    if field.is_list() {
                        parameter["style"] = "form".into();
                        parameter["explode"] = true.into();
                    }
                    parameter
                }),
        );
    }
    let output = method.output();
    let success = if method.is_server_streaming() {
        json!({
            "description": "One event per line (`{\"result\": …}`), a last `{\"error\": …}` line if the stream fails; server-sent events with `Accept: text/event-stream`.",
            "content": {
                "application/x-ndjson": {"schema": {
                    "type": "object",
                    "properties": {"result": reference(output.full_name()), "error": reference(STATUS)},
                }},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        })
    } else {
        json!({
            "description": "The call's response message.",
            "content": {"application/json": {"schema": reference(output.full_name())}},
        })
    };
    let mut operation = json!({
        "operationId": format!("{}_{}", service.name(), method.name()),
        "tags": [service.name()],
        "summary": format!("{}.{}", service.full_name(), method.name()),
        "description": comment(&method.parent_file(), method.path()),
        "parameters": parameters,
        "responses": {"200": success, "default": error_response()},
        "security": if crate::services::needs_bearer(method.full_name()) {
            json!([{"bearer": []}])
        } else {
            json!([])
        },
    });
    if route.has_body {
        operation["requestBody"] = json!({
            "required": false,
            "description": "The request message as JSON (proto or lowerCamel field names); path variables come from the path.",
            "content": {"application/json": {"schema": reference(input.full_name())}},
        });
    }
    operation
}

/// Records `message` and every message its fields reach, with the side it
/// was reached from (true: request).
fn collect(message: MessageDescriptor, side: Side, seen: &mut BTreeMap<String, BTreeSet<bool>>) {
    if well_known(message.full_name()).is_some() {
        return;
    }
    let sides = seen.entry(message.full_name().to_owned()).or_default();
    if !sides.insert(side == Side::Request) {
        return;
    }
    for field in message.fields() {
        if let Kind::Message(inner) = field.kind() {
            collect(inner, side, seen);
        }
    }
}

fn message_schema(message: &MessageDescriptor, side: Side) -> Value {
    let properties: Map<String, Value> = message
        .fields()
        .map(|field| {
            let mut schema = field_schema(&field, side);
            let text = comment(&field.parent_file(), field.path());
            if !text.is_empty() && schema.get("$ref").is_none() {
                schema["description"] = text.into();
            }
            (field.name().to_owned(), schema)
        })
        .collect();
    let mut schema = json!({
        "type": "object",
        "description": comment(&message.parent_file(), message.path()),
        "properties": properties,
    });
    if side == Side::Response {
        let required: Vec<String> = message
            .fields()
            .filter(|field| !field.supports_presence())
            .map(|field| field.name().to_owned())
            .collect();
        schema["required"] = required.into();
    }
    if message.full_name() == "google.protobuf.Any" {
        schema["additionalProperties"] = true.into();
    }
    schema
}

/// The JSON form of the well-known types this API uses.
fn well_known(name: &str) -> Option<Value> {
    Some(match name {
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => {
            json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$"})
        }
        "google.protobuf.Any" => json!({
            "type": "object",
            "properties": {"@type": {"type": "string"}},
            "required": ["@type"],
            "additionalProperties": true,
        }),
        _ => return None,
    })
}

fn field_schema(field: &FieldDescriptor, side: Side) -> Value {
    if field.is_map() {
        let value = match field.kind() {
            Kind::Message(entry) => entry.map_entry_value_field().kind(),
            other => other,
        };
        return json!({"type": "object", "additionalProperties": kind_schema(&value, side)});
    }
    let item = kind_schema(&field.kind(), side);
    if field.is_list() {
        json!({"type": "array", "items": item})
    } else {
        item
    }
}

fn kind_schema(kind: &Kind, side: Side) -> Value {
    const INT64: &str = "^-?[0-9]+$";
    match kind {
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Kind::Double | Kind::Float => json!({"type": "number"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32", "minimum": i32::MIN, "maximum": i32::MAX})
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer", "format": "int32", "minimum": 0, "maximum": u32::MAX})
        }
        // Answers print 64-bit integers as strings; requests take both forms.
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            let unsigned = matches!(kind, Kind::Uint64 | Kind::Fixed64);
            let pattern = if unsigned { "^[0-9]+$" } else { INT64 };
            match side {
                Side::Response => json!({"type": "string", "format": "int64", "pattern": pattern}),
                Side::Request if unsigned => json!({
                    "type": ["string", "integer"], "pattern": pattern,
                    "minimum": 0, "maximum": u64::MAX,
                }),
                Side::Request => json!({
                    "type": ["string", "integer"], "pattern": pattern,
                    "minimum": i64::MIN, "maximum": i64::MAX,
                }),
            }
        }
        Kind::Enum(enumeration) => json!({
            "type": "string",
            "enum": enumeration.values().map(|value| value.name().to_owned()).collect::<Vec<_>>(),
        }),
        Kind::Message(message) => {
            well_known(message.full_name()).unwrap_or_else(|| reference(message.full_name()))
        }
    }
}

/// The leading comment of the element at `path` in `file`, trimmed.
fn comment(file: &prost_reflect::FileDescriptor, path: &[i32]) -> String {
    file.file_descriptor_proto()
        .source_code_info
        .as_ref()
        .and_then(|info| info.location.iter().find(|location| location.path == path))
        .and_then(|location| location.leading_comments.as_deref())
        .map(|text| {
            text.lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("\n")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generated() -> Value {
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        document(&RouteTable::from_pool(&pool).unwrap(), &pool)
    }

    #[test]
    fn every_route_has_an_operation_with_its_schemas_and_every_reference_resolves() {
        let document = generated();
        let operations: usize = document["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|path| path.as_object().unwrap().len())
            .sum();
        assert_eq!(operations, 37 + 1, "37 RPC routes and /health");
        let text = document.to_string();
        let schemas = document["components"]["schemas"].as_object().unwrap();
        for reference in text.split("\"#/components/schemas/").skip(1) {
            let name = &reference[..reference.find('"').unwrap()];
            assert!(
                schemas.contains_key(name),
                "{name} is referenced but not defined"
            );
        }
        assert!(schemas.contains_key("aimessage.v1.User"));
        assert!(schemas.contains_key("google.rpc.BadRequest"));
    }

    #[test]
    fn bearer_routes_say_so_and_public_ones_do_not() {
        let document = generated();
        assert_eq!(
            document["paths"]["/auth/me"]["get"]["security"][0]["bearer"],
            json!([])
        );
        assert_eq!(
            document["paths"]["/auth/login"]["post"]["security"],
            json!([])
        );
    }

    #[test]
    fn answers_describe_64_bit_integers_as_strings_and_list_required_fields() {
        let document = generated();
        let user = &document["components"]["schemas"]["aimessage.v1.User"];
        assert_eq!(user["properties"]["id"]["type"], "string");
        let required = user["required"].as_array().unwrap();
        assert!(required.contains(&json!("id")));
        assert!(
            !required.contains(&json!("full_name")),
            "optional fields may be absent"
        );
        let send = &document["components"]["schemas"]["aimessage.v1.SendMessageRequest"];
        assert_eq!(
            send["properties"]["recipient_id"]["type"],
            json!(["string", "integer"])
        );
    }
}
