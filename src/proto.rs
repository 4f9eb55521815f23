//! Code generated from `proto/` by `build.rs`, and the descriptor set for reflection.

#![allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]

pub mod aimessage {
    pub mod v1 {
        tonic::include_proto!("aimessage.v1");
    }
}

pub mod google {
    pub mod api {
        tonic::include_proto!("google.api");
    }
}

pub use aimessage::v1::*;

/// Encoded `FileDescriptorSet` of every file under `proto/` with its imports,
/// custom options (`google.api.http`) and comments kept; served by reflection
/// and written by `ai-message descriptor`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/aimessage_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message as _;

    /// What lacks a leading comment in the `aimessage` files: services, RPCs,
    /// messages and fields (`grpcurl describe` and generated docs show them).
    fn uncommented() -> Vec<String> {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let mut missing = Vec::new();
        for file in set
            .file
            .iter()
            .filter(|f| f.name().starts_with("aimessage/"))
        {
            let info = file.source_code_info.clone().unwrap_or_default();
            let commented = |path: &[i32]| {
                info.location
                    .iter()
                    .any(|l| l.path == path && !l.leading_comments().trim().is_empty())
            };
            for (s, service) in file.service.iter().enumerate() {
                if !commented(&[6, s as i32]) {
                    missing.push(service.name().to_owned());
                }
                for (m, method) in service.method.iter().enumerate() {
                    if !commented(&[6, s as i32, 2, m as i32]) {
                        missing.push(format!("{}.{}", service.name(), method.name()));
                    }
                }
            }
            for (i, message) in file.message_type.iter().enumerate() {
                // Empty request and response messages say nothing a comment could add.
                if !message.field.is_empty() && !commented(&[4, i as i32]) {
                    missing.push(message.name().to_owned());
                }
                for (f, field) in message.field.iter().enumerate() {
                    if !commented(&[4, i as i32, 2, f as i32]) {
                        missing.push(format!("{}.{}", message.name(), field.name()));
                    }
                }
            }
        }
        missing
    }

    /// The `google.api.http` options survive into the embedded descriptor
    /// (the `prost_types` route drops them): one on every RPC. The rules
    /// themselves are checked through reflection (tests/api/platform.rs).
    #[test]
    fn the_descriptor_keeps_every_rpcs_http_rule() {
        use prost_reflect::{DescriptorPool, Value};
        let pool = DescriptorPool::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let http = pool.get_extension_by_name("google.api.http").unwrap();
        let mut seen = 0;
        for service in pool
            .services()
            .filter(|s| s.package_name() == "aimessage.v1")
        {
            for method in service.methods() {
                let options = method.options();
                let rule = options.get_extension(&http);
                let rule = rule.as_message().expect("an HttpRule");
                let (verb, path) = ["get", "put", "post", "delete", "patch"]
                    .into_iter()
                    .find_map(|verb| match rule.get_field_by_name(verb).as_deref() {
                        Some(Value::String(path)) if !path.is_empty() => Some((verb, path.clone())),
                        _ => None,
                    })
                    .unwrap_or_else(|| panic!("{} has no HTTP rule", method.full_name()));
                assert!(
                    path.starts_with('/'),
                    "{} {verb} {path}",
                    method.full_name()
                );
                seen += 1;
            }
        }
        assert_eq!(seen, 37, "every RPC was looked at");
        for file in ["google/rpc/status.proto", "google/rpc/error_details.proto"] {
            assert!(pool.get_file_by_name(file).is_some(), "{file} is served");
        }
    }

    #[test]
    fn every_service_rpc_message_and_field_is_commented() {
        let missing = uncommented();
        assert!(
            missing.is_empty(),
            "{} without a comment: {missing:#?}",
            missing.len()
        );
    }
}
