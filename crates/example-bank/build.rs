//! Compiles `proto/bank/v1/bank.proto` from the workspace's `proto/`; what
//! it shares with the kernel (`scaleout/v1/common.proto`) is the kernel's
//! generated code.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.join("bank").display());
    let fds = protox::compile(["bank/v1/bank.proto"], [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("bank_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .extern_path(".scaleout.v1", "::scaleout::pb")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
