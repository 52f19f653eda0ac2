//! query-svc: the gRPC query service. Parses flags, starts logging, opens the
//! document store, serves until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use scaleout::config::{DocumentStoreArgs, ServerArgs, TelemetryArgs, parse_duration};

/// The scaleout query service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "SCALEOUT_QUERY_LISTEN", default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    #[command(flatten)]
    documents: DocumentStoreArgs,
    /// The longest a query waits for its `min_version`, whatever the
    /// caller's deadline (and a little less than `--request-timeout`).
    #[arg(long, env = "SCALEOUT_MAX_WAIT", default_value = "5s", value_parser = parse_duration)]
    max_wait: Duration,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if let Some(verdict) = args.server.check_health_exit_code(args.listen).await {
        return Ok(verdict);
    }
    let telemetry = scaleout::telemetry::init(&args.telemetry, "query-svc")?;
    scaleout::app::check_files(&args.server)?;
    let stopping = scaleout::shutdown::on_signal();
    let documents = args
        .documents
        .open()
        .await
        .context("opening the document store")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(
        %address,
        document_store = %args.documents,
        "query-svc serving gRPC with health and reflection: try `grpcurl -plaintext {address} list`"
    );
    let service = scaleout::app::QueryService {
        app: std::sync::Arc::new(reference::Reference),
        documents,
        max_wait: args.max_wait,
        server: args.server,
    };
    scaleout::app::run_query_service(listener, service, stopping).await?;
    tracing::info!("query-svc stopped");
    telemetry.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
