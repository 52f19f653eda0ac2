//! scaleout: the whole platform in one process on its embedded defaults
//! (redb files in a data directory, a projector following the log), for a
//! laptop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use scaleout::command::RetryPolicy;
use scaleout::config::{ServerArgs, TelemetryArgs, parse_duration};

/// The scaleout platform, all in one process: commands, the read API, a
/// projector following the event log, and queries on one port.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve gRPC on (commands, queries, the read API, health, reflection).
    #[arg(long, env = "SCALEOUT_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Where the event store and the read models live (kept across restarts).
    #[arg(long, env = "SCALEOUT_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// The longest a query waits for its `min_version` (and a little less
    /// than `--request-timeout`).
    #[arg(long, env = "SCALEOUT_MAX_WAIT", default_value = "5s", value_parser = parse_duration)]
    max_wait: Duration,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(verdict) = args.server.check_health_exit_code(args.listen).await {
        return Ok(verdict);
    }
    let telemetry =
        scaleout::telemetry::init(&args.telemetry, "scaleout").map_err(|e| e.to_string())?;
    scaleout::app::check_files(&args.server).map_err(|e| e.to_string())?;
    let stopping = scaleout::shutdown::on_signal();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("binding {}: {e}", args.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(
        %address,
        data_dir = %args.data_dir.display(),
        "scaleout platform serving commands and queries: try `grpcurl {} list`",
        args.server.grpcurl_target(address)
    );
    let platform = scaleout::app::Platform {
        app: std::sync::Arc::new(reference::Reference),
        data_dir: args.data_dir,
        server: args.server,
        retry: RetryPolicy::default(),
        snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
        max_wait: args.max_wait,
    };
    scaleout::app::run_platform(listener, platform, stopping).await?;
    tracing::info!("scaleout platform stopped");
    telemetry.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
