//! Compiles the reference application's protos (its events, commands and
//! queries) from the workspace's `proto/`; what it shares with the kernel
//! (`common.proto`) is the kernel's generated code.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "scaleout/v1/events.proto",
    "scaleout/v1/command_service.proto",
    "scaleout/v1/query_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("reference_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .extern_path(
            ".scaleout.v1.ExpectedVersion",
            "::scaleout::pb::ExpectedVersion",
        )
        .extern_path(
            ".scaleout.v1.CommandResult",
            "::scaleout::pb::CommandResult",
        )
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
