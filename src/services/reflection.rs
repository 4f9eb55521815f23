//! gRPC server reflection (`grpc.reflection.v1` and `v1alpha`), answered from
//! the encoded descriptor sets as built, so custom options (`google.api.http`)
//! and comments reach clients intact. Like grpc-go, a file is answered with
//! every file it depends on, transitively, so a client can build a descriptor
//! pool from one answer. (tonic-reflection answers with the one file.)

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::Arc,
};

use futures::{Stream, StreamExt as _};
use prost::Message as _;
use tonic::{Code, Request, Response, Status, Streaming};

/// A `FileDescriptorSet` whose files stay undecoded bytes (nothing dropped).
#[derive(Clone, PartialEq, prost::Message)]
struct RawFileSet {
    #[prost(bytes = "vec", repeated, tag = "1")]
    file: Vec<Vec<u8>>,
}

/// Files by name, the symbols they define, and the services.
#[derive(Debug, Default)]
pub struct DescriptorIndex {
    /// File name -> (encoded file, names of its dependencies).
    files: HashMap<String, (Vec<u8>, Vec<String>)>,
    /// Fully qualified symbol -> the file that defines it.
    symbols: HashMap<String, String>,
    services: Vec<String>,
}

impl DescriptorIndex {
    /// Indexes encoded `FileDescriptorSet`s; a file name seen twice keeps the first.
    pub fn new(sets: &[&[u8]]) -> Result<Self, prost::DecodeError> {
        let mut index = Self::default();
        for set in sets {
            for raw in RawFileSet::decode(*set)?.file {
                let file = prost_types::FileDescriptorProto::decode(raw.as_slice())?;
                let name = file.name().to_owned();
                if index.files.contains_key(&name) {
                    continue;
                }
                index.add_symbols(&file);
                index.files.insert(name, (raw, file.dependency.clone()));
            }
        }
        index.services.sort();
        Ok(index)
    }

    fn add_symbols(&mut self, file: &prost_types::FileDescriptorProto) {
        let prefix = match file.package() {
            "" => String::new(),
            package => format!("{package}."),
        };
        let mut symbols = Vec::new();
        collect_messages(&prefix, &file.message_type, &mut symbols);
        for enumeration in &file.enum_type {
            symbols.push(format!("{prefix}{}", enumeration.name()));
        }
        for extension in &file.extension {
            symbols.push(format!("{prefix}{}", extension.name()));
        }
        for service in &file.service {
            let name = format!("{prefix}{}", service.name());
            for method in &service.method {
                symbols.push(format!("{name}.{}", method.name()));
            }
            symbols.push(name.clone());
            self.services.push(name);
        }
        for symbol in symbols {
            self.symbols.insert(symbol, file.name().to_owned());
        }
    }

    /// The file and everything it depends on, transitively, the file first.
    pub fn file_with_dependencies(&self, name: &str) -> Option<Vec<Vec<u8>>> {
        self.files.get(name)?;
        let mut answer = Vec::new();
        let mut seen = HashSet::new();
        let mut pending = vec![name.to_owned()];
        while let Some(next) = pending.pop() {
            if !seen.insert(next.clone()) {
                continue;
            }
            if let Some((raw, dependencies)) = self.files.get(&next) {
                answer.push(raw.clone());
                pending.extend(dependencies.iter().rev().cloned());
            }
        }
        Some(answer)
    }

    /// The file defining `symbol` (a service, method, message, enum or
    /// extension), with its dependencies.
    pub fn symbol_with_dependencies(&self, symbol: &str) -> Option<Vec<Vec<u8>>> {
        self.file_with_dependencies(self.symbols.get(symbol.trim_start_matches('.'))?)
    }

    pub fn services(&self) -> &[String] {
        &self.services
    }
}

/// Messages, their nested messages and enums, by full name.
fn collect_messages(
    prefix: &str,
    messages: &[prost_types::DescriptorProto],
    out: &mut Vec<String>,
) {
    for message in messages {
        let name = format!("{prefix}{}", message.name());
        for nested in &message.enum_type {
            out.push(format!("{name}.{}", nested.name()));
        }
        collect_messages(&format!("{name}."), &message.nested_type, out);
        out.push(name);
    }
}

/// One reflection service per protocol version: the two share every rule and
/// differ only in their generated types.
macro_rules! reflection_service {
    ($name:ident, $version:ident) => {
        pub struct $name(pub Arc<DescriptorIndex>);

        impl $name {
            fn answer(
                index: &DescriptorIndex,
                request: tonic_reflection::pb::$version::ServerReflectionRequest,
            ) -> tonic_reflection::pb::$version::ServerReflectionResponse {
                use tonic_reflection::pb::$version::{
                    ErrorResponse, FileDescriptorResponse, ListServiceResponse,
                    ServerReflectionResponse, ServiceResponse,
                    server_reflection_request::MessageRequest,
                    server_reflection_response::MessageResponse,
                };
                let not_found = |what: String| {
                    MessageResponse::ErrorResponse(ErrorResponse {
                        error_code: Code::NotFound as i32,
                        error_message: what,
                    })
                };
                let files = |found: Option<Vec<Vec<u8>>>, what: String| match found {
                    Some(file_descriptor_proto) => {
                        MessageResponse::FileDescriptorResponse(FileDescriptorResponse {
                            file_descriptor_proto,
                        })
                    }
                    None => not_found(what),
                };
                let message_response = match &request.message_request {
                    Some(MessageRequest::FileByFilename(name)) => files(
                        index.file_with_dependencies(name),
                        format!("file {name:?} not found"),
                    ),
                    Some(MessageRequest::FileContainingSymbol(symbol)) => files(
                        index.symbol_with_dependencies(symbol),
                        format!("symbol {symbol:?} not found"),
                    ),
                    Some(MessageRequest::ListServices(_)) => {
                        MessageResponse::ListServicesResponse(ListServiceResponse {
                            service: index
                                .services()
                                .iter()
                                .map(|name| ServiceResponse { name: name.clone() })
                                .collect(),
                        })
                    }
                    Some(
                        MessageRequest::FileContainingExtension(_)
                        | MessageRequest::AllExtensionNumbersOfType(_),
                    ) => not_found("no extensions of message types are served".to_owned()),
                    None => MessageResponse::ErrorResponse(ErrorResponse {
                        error_code: Code::InvalidArgument as i32,
                        error_message: "message_request: missing".to_owned(),
                    }),
                };
                ServerReflectionResponse {
                    valid_host: request.host.clone(),
                    original_request: Some(request),
                    message_response: Some(message_response),
                }
            }
        }

        #[tonic::async_trait]
        impl tonic_reflection::pb::$version::server_reflection_server::ServerReflection for $name {
            type ServerReflectionInfoStream = Pin<
                Box<
                    dyn Stream<
                            Item = Result<
                                tonic_reflection::pb::$version::ServerReflectionResponse,
                                Status,
                            >,
                        > + Send,
                >,
            >;

            async fn server_reflection_info(
                &self,
                request: Request<
                    Streaming<tonic_reflection::pb::$version::ServerReflectionRequest>,
                >,
            ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
                let index = Arc::clone(&self.0);
                let answers = request
                    .into_inner()
                    .map(move |request| Ok(Self::answer(&index, request?)));
                Ok(Response::new(Box::pin(answers)))
            }
        }
    };
}

reflection_service!(ReflectionV1, v1);
reflection_service!(ReflectionV1Alpha, v1alpha);

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> DescriptorIndex {
        DescriptorIndex::new(&[
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ])
        .unwrap()
    }

    fn names(files: &[Vec<u8>]) -> Vec<String> {
        files
            .iter()
            .map(|raw| {
                prost_types::FileDescriptorProto::decode(raw.as_slice())
                    .unwrap()
                    .name()
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn a_symbol_comes_with_its_file_first_and_every_dependency_once() {
        let index = index();
        let files = names(
            &index
                .symbol_with_dependencies("aimessage.v1.AuthService")
                .unwrap(),
        );
        assert_eq!(files[0], "aimessage/v1/auth.proto");
        for dependency in [
            "aimessage/v1/resources.proto",
            "google/api/annotations.proto",
            "google/api/http.proto",
            "google/protobuf/descriptor.proto",
            "google/protobuf/timestamp.proto",
        ] {
            assert_eq!(
                files.iter().filter(|f| *f == dependency).count(),
                1,
                "{dependency}"
            );
        }
        assert!(
            index
                .symbol_with_dependencies("aimessage.v1.AuthService.Login")
                .is_some()
        );
        assert!(
            index
                .symbol_with_dependencies(".aimessage.v1.User")
                .is_some()
        );
        assert!(
            index
                .symbol_with_dependencies("google.rpc.BadRequest.FieldViolation")
                .is_some()
        );
        assert!(
            index
                .symbol_with_dependencies("aimessage.v1.Nope")
                .is_none()
        );
    }

    #[test]
    fn services_are_listed_with_health() {
        let index = index();
        for service in ["aimessage.v1.AuthService", "grpc.health.v1.Health"] {
            assert!(index.services().iter().any(|s| s == service), "{service}");
        }
    }
}
