//! Compiles `proto/` with protox (no system `protoc`) and tonic-prost-build.
//! The descriptor set (every file with its imports, custom options such as
//! `google.api.http` kept, and comments) is also written to `OUT_DIR`, for
//! gRPC reflection and `ai-message descriptor`.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "aimessage/v1/resources.proto",
    "aimessage/v1/auth.proto",
    "aimessage/v1/user_admin.proto",
    "aimessage/v1/session.proto",
    "aimessage/v1/message.proto",
    // Served so that grpcurl and buf curl can decode error details.
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(PROTOS)?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    // `encode_file_descriptor_set` keeps extension options, which the
    // `prost_types` values of `file_descriptor_set` drop.
    fs::write(
        out_dir.join("aimessage_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    let descriptors = compiler.file_descriptor_set();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // RPCs not implemented yet answer UNIMPLEMENTED.
        .generate_default_stubs(true)
        .compile_fds(descriptors)?;
    Ok(())
}
