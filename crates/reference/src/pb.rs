//! The reference application's Protobuf contract, generated from `proto/` by
//! `build.rs`, beside the kernel's (re-exported here, so that `pb` is the
//! whole `scaleout.v1` package).

#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]

pub use scaleout::pb::*;

tonic::include_proto!("scaleout.v1");

/// The encoded `FileDescriptorSet` of the reference protos, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/reference_descriptor.bin"));
