//! couchbase-kv-server: the KV test double as a process, for tests that run
//! services as separate processes. Prints `listening on ADDR` once bound.

use std::net::SocketAddr;

use clap::Parser;
use couchbase_kv_server::{ServerConfig, TestServer};

/// A Couchbase KV protocol test server (in memory; for tests only).
#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:11210")]
    listen: SocketAddr,
    #[arg(long, default_value = "Administrator")]
    username: String,
    #[arg(long, default_value = "password")]
    password: String,
    /// A bucket to serve; repeat for more.
    #[arg(long = "bucket", default_values_t = ["scaleout".to_owned()])]
    buckets: Vec<String>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let config = ServerConfig {
        username: args.username,
        password: args.password,
        buckets: args.buckets,
        tls: None,
    };
    let server = TestServer::start_on(args.listen, config).await?;
    println!("listening on {}", server.addr());
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}
