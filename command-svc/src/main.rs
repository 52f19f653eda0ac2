//! command-svc: the gRPC command service. Parses flags, starts logging, opens
//! the event store, serves until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use scaleout::command::RetryPolicy;
use scaleout::config::{ServerArgs, TelemetryArgs, redact};
use scaleout::relay::RelayConfig;

/// The scaleout command service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(
        long,
        env = "SCALEOUT_COMMAND_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    listen: SocketAddr,
    /// `redb:PATH` (embedded, a file) or a `postgres://` URL.
    #[arg(
        long,
        env = "SCALEOUT_EVENT_STORE",
        default_value = "redb:data/events.redb"
    )]
    event_store: String,
    /// The PostgreSQL schema holding the event store's tables.
    #[arg(long, env = "SCALEOUT_POSTGRES_SCHEMA", default_value = "scaleout")]
    postgres_schema: String,
    /// The CA (PEM) that PostgreSQL's certificate must chain to, for a URL
    /// with `sslmode=verify-ca` or `verify-full` (the system's CAs when
    /// unset); with `require`, giving one also checks the chain.
    #[arg(long, env = "SCALEOUT_POSTGRES_CA")]
    postgres_ca: Option<std::path::PathBuf>,
    /// Where the outbox relay publishes events: an `amqp://` URL, or
    /// `memory`. Unset, no relay runs and events wait in the outbox.
    #[arg(long, env = "SCALEOUT_EVENT_BUS")]
    event_bus: Option<String>,
    /// Prefixes the bus's exchange and queue names, so that deployments can
    /// share a broker.
    #[arg(long, env = "SCALEOUT_EVENT_BUS_PREFIX", default_value = "scaleout")]
    event_bus_prefix: String,
    /// A PEM CA an `amqps://` broker's certificate may chain to, beside the
    /// system's CAs.
    #[arg(long, env = "SCALEOUT_EVENT_BUS_CA")]
    event_bus_ca: Option<std::path::PathBuf>,
    /// How many times a command sent without an exact expected version is
    /// decided again after losing a race.
    #[arg(long, env = "SCALEOUT_MAX_RETRIES", default_value_t = RetryPolicy::default().max_retries)]
    max_retries: u32,
    /// Take a snapshot of an aggregate each time its stream passes a
    /// multiple of this many events (for aggregates that take them), so that
    /// loading it after a restart or on another instance folds only the
    /// events since; 0 takes none.
    #[arg(long, env = "SCALEOUT_SNAPSHOT_EVERY", default_value_t = scaleout::command::DEFAULT_SNAPSHOT_EVERY)]
    snapshot_every: u64,
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
    let telemetry = scaleout::telemetry::init(&args.telemetry, "command-svc")?;
    scaleout::app::check_files(&args.server)?;
    let stopping = scaleout::shutdown::on_signal();
    let store = scaleout::store::open(
        &args.event_store,
        &args.postgres_schema,
        args.postgres_ca.clone(),
    )
    .await
    .with_context(|| format!("opening event store {}", redact(&args.event_store)))?;
    let bus = match &args.event_bus {
        Some(spec) => Some(
            scaleout::bus::open(spec, &args.event_bus_prefix, args.event_bus_ca.as_deref())
                .with_context(|| format!("event bus {}", redact(spec)))?,
        ),
        None => {
            tracing::warn!(
                "no --event-bus: events stay in the outbox until a relay publishes them"
            );
            None
        }
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(
        %address,
        event_store = %redact(&args.event_store),
        event_bus = %args.event_bus.as_deref().map_or_else(|| "none".into(), redact),
        "command-svc serving gRPC with health and reflection: try `grpcurl {} list`",
        args.server.grpcurl_target(address)
    );
    let service = scaleout::app::CommandService {
        app: std::sync::Arc::new(reference::Reference),
        store,
        bus,
        server: args.server,
        retry: RetryPolicy {
            max_retries: args.max_retries,
            ..RetryPolicy::default()
        },
        snapshot_every: args.snapshot_every,
        relay: RelayConfig::default(),
    };
    scaleout::app::run_command_service(listener, service, stopping).await?;
    tracing::info!("command-svc stopped");
    telemetry.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
