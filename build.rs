//! Compiles the kernel's part of `proto/` (the envelope, the read API, the
//! admin service and what every application's commands share) with protox
//! (pure Rust, no system `protoc`), and writes the descriptor set that the
//! reflection service serves. Applications compile their own protos.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/scaleout/v1/common.proto",
    "proto/scaleout/v1/envelope.proto",
    "proto/scaleout/v1/admin_service.proto",
    "proto/scaleout/v1/read_service.proto",
    "proto/scaleout/v1/read_model_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("scaleout_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure().compile_fds_with_config(fds, config)?;
    Ok(())
}
