//! The Protobuf contract, generated from `proto/` by `build.rs`.
//!
//! Generated code lives here and nowhere else; the rest of the kernel
//! converts at its edges.

#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]

tonic::include_proto!("scaleout.v1");

/// The encoded `FileDescriptorSet` of `proto/`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/scaleout_descriptor.bin"));
