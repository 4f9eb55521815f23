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

/// Encoded `FileDescriptorSet` of every file under `proto/`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/aimessage_descriptor.bin"));
