//! Compiles `proto/` with protox (no system `protoc`) and tonic-prost-build.
//! The descriptor set is also written to `OUT_DIR` for gRPC reflection.

use std::{env, fs, path::PathBuf};

use protox::prost::Message as _;

const PROTOS: &[&str] = &[
    "aimessage/v1/resources.proto",
    "aimessage/v1/auth.proto",
    "aimessage/v1/user_admin.proto",
    "aimessage/v1/session.proto",
    "aimessage/v1/message.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    fs::write(
        out_dir.join("aimessage_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // RPCs not implemented yet answer UNIMPLEMENTED.
        .generate_default_stubs(true)
        .compile_fds(descriptors)?;
    Ok(())
}
