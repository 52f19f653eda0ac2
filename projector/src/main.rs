//! projector: competing workers that project events from the bus into the
//! read models. Parses flags, starts logging, opens the bus and the document
//! store, serves health and /metrics, runs until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use scaleout::app::Application;
use scaleout::bus::Subscription;
use scaleout::config::{DocumentStoreArgs, ServerArgs, TelemetryArgs, parse_duration, redact};
use scaleout::grpc::Credentials;
use scaleout::grpc::tls::ClientTls;
use scaleout::projection::runtime::ProjectorConfig;

/// The scaleout projector.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve gRPC health and HTTP /metrics on.
    #[arg(
        long,
        env = "SCALEOUT_PROJECTOR_LISTEN",
        default_value = "127.0.0.1:50061"
    )]
    listen: SocketAddr,
    /// The bus to consume: an `amqp://` URL.
    #[arg(
        long,
        env = "SCALEOUT_EVENT_BUS",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    event_bus: String,
    /// Prefixes the bus's exchange and queue names, so that deployments can
    /// share a broker.
    #[arg(long, env = "SCALEOUT_EVENT_BUS_PREFIX", default_value = "scaleout")]
    event_bus_prefix: String,
    /// A PEM CA an `amqps://` broker's certificate may chain to, beside the
    /// system's CAs.
    #[arg(long, env = "SCALEOUT_EVENT_BUS_CA")]
    event_bus_ca: Option<std::path::PathBuf>,
    #[command(flatten)]
    documents: DocumentStoreArgs,
    /// The service type: processes with the same one compete for events.
    #[arg(long, env = "SCALEOUT_SERVICE_TYPE", default_value = "projector")]
    service_type: String,
    /// The read models this service type keeps, comma-separated (file_view,
    /// folder_listing, comment_thread, counter); all when unset.
    #[arg(long, env = "SCALEOUT_PROJECTIONS", value_delimiter = ',')]
    projections: Vec<String>,
    /// Workers in this process, each with its own subscriber.
    #[arg(long, env = "SCALEOUT_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Unsettled deliveries per worker, also the most folded in one write.
    #[arg(long, env = "SCALEOUT_PREFETCH", default_value_t = 100)]
    prefetch: u16,
    /// Deliveries of a failing event before it is parked.
    #[arg(long, env = "SCALEOUT_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: u32,
    /// The event log's read API (command-svc): where a document that lacks
    /// earlier events of a stream reads them, and what the sweep follows.
    #[arg(
        long,
        env = "SCALEOUT_EVENT_LOG",
        default_value = "http://127.0.0.1:50051"
    )]
    event_log: String,
    /// For an `https://` event log: trust only this PEM CA (the system's
    /// roots when unset).
    #[arg(long, env = "SCALEOUT_EVENT_LOG_CA")]
    event_log_ca: Option<PathBuf>,
    /// For an event log that requires client certificates (mutual TLS):
    /// present this PEM certificate.
    #[arg(long, env = "SCALEOUT_EVENT_LOG_CERT", requires = "event_log_key")]
    event_log_cert: Option<PathBuf>,
    /// The client certificate's PEM private key.
    #[arg(long, env = "SCALEOUT_EVENT_LOG_KEY", requires = "event_log_cert")]
    event_log_key: Option<PathBuf>,
    /// A file holding the bearer token for an event log that requires one
    /// (a JWT with the `scaleout.read` scope), read again when it changes.
    #[arg(long, env = "SCALEOUT_EVENT_LOG_TOKEN_FILE")]
    event_log_token_file: Option<PathBuf>,
    /// How far the sweep trails the log: it brings up to date any document
    /// whose delivery was lost or parked once events are this old.
    #[arg(long, env = "SCALEOUT_SWEEP_DELAY", default_value = "5s", value_parser = parse_duration)]
    sweep_delay: Duration,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[command(subcommand)]
    task: Option<Task>,
}

impl Args {
    /// The event log's read API, over TLS for an `https://` URL, with a
    /// bearer token if configured.
    fn event_log(&self, timeout: Duration) -> anyhow::Result<scaleout::grpc::RemoteLog> {
        let credentials = Credentials {
            tls: ClientTls {
                ca: self.event_log_ca.clone(),
                identity: self.event_log_cert.clone().zip(self.event_log_key.clone()),
            },
            token_file: self.event_log_token_file.clone(),
        };
        Ok(scaleout::grpc::RemoteLog::new(
            &self.event_log,
            timeout,
            &credentials,
        )?)
    }
}

/// What to do instead of projecting.
#[derive(Debug, clap::Subcommand)]
enum Task {
    /// Fold the event log (`--event-log`) in memory for the projections
    /// (`--projections`), compare every document they produce with the
    /// document store, print the drift, and exit 1 if any is left or an
    /// event cannot be read.
    Verify {
        /// Write the fold back into each drifted document (with CAS: one a
        /// projector writes meanwhile is left to it).
        #[arg(long)]
        repair: bool,
    },
    /// Build a read model from the event log (`--event-log`) into a new
    /// generation while the serving one keeps answering, logging progress;
    /// run again after a crash, it resumes from the build's checkpoint.
    /// Caught up, it follows live events until the new generation serves
    /// (`--switch`, or ReadModelService/Switch), hands over, and exits 0.
    Rebuild {
        /// The read model, e.g. `counter`.
        #[arg(long)]
        projection: String,
        /// Switch to the new generation as soon as it has caught up.
        #[arg(long)]
        switch: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if let Some(verdict) = args.server.check_health_exit_code(args.listen).await {
        return Ok(verdict);
    }
    let telemetry = scaleout::telemetry::init(&args.telemetry, "projector")?;
    scaleout::app::check_files(&args.server)?;
    // Refuse a wrong --projections before connecting to anything.
    let projections =
        scaleout::projection::choose(reference::Reference.projections(), &args.projections)?;
    match &args.task {
        Some(Task::Verify { repair }) => return verify(&args, projections, *repair).await,
        Some(Task::Rebuild { projection, switch }) => {
            return rebuild(&args, projection, *switch).await;
        }
        None => {}
    }
    let stopping = scaleout::shutdown::on_signal();
    let bus = scaleout::bus::open(
        &args.event_bus,
        &args.event_bus_prefix,
        args.event_bus_ca.as_deref(),
    )
    .with_context(|| format!("event bus {}", redact(&args.event_bus)))?;
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
        event_bus = %redact(&args.event_bus),
        event_log = %args.event_log,
        document_store = %args.documents,
        service_type = %args.service_type,
        "projector running; health on gRPC, metrics at http://{address}/metrics"
    );
    let log = args
        .event_log(Duration::from_secs(5))
        .with_context(|| format!("event log {}", args.event_log))?;
    let service = scaleout::app::ProjectorService {
        app: std::sync::Arc::new(reference::Reference),
        bus,
        documents,
        log: std::sync::Arc::new(log),
        sweep_delay: args.sweep_delay,
        subscription: Subscription {
            service_type: args.service_type,
            bindings: vec!["#".into()],
            prefetch: args.prefetch,
            max_attempts: args.max_attempts,
        },
        projections: args.projections,
        workers: args.workers,
        config: ProjectorConfig {
            batch: usize::from(args.prefetch),
            ..ProjectorConfig::default()
        },
        server: args.server,
    };
    scaleout::app::run_projector(listener, service, stopping).await?;
    tracing::info!("projector stopped");
    telemetry.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// `projector verify`: prints what it found; success when no drift is left.
async fn verify(
    args: &Args,
    projections: Vec<Box<dyn scaleout::projection::AnyProjection>>,
    repair: bool,
) -> anyhow::Result<ExitCode> {
    let documents = args
        .documents
        .open()
        .await
        .context("opening the document store")?;
    let log = args
        .event_log(Duration::from_secs(30))
        .with_context(|| format!("event log {}", args.event_log))?;
    let report = scaleout::projection::verify::verify(
        &log,
        documents.as_ref(),
        &reference::Reference.known_types(),
        &projections,
        repair,
    )
    .await?;
    println!(
        "verified {} documents against {} events: {} drifted, {} repaired, {} moved on since, {} unreadable events",
        report.documents,
        report.events,
        report.drifted,
        report.repaired,
        report.moved_on,
        report.unreadable
    );
    for drift in &report.examples {
        let actual = drift
            .actual
            .as_ref()
            .map_or_else(|| "missing".to_owned(), ToString::to_string);
        println!(
            "{}\n  expected {}\n  stored   {actual}",
            drift.key, drift.expected
        );
    }
    for reason in &report.unreadable_examples {
        println!("unreadable: {reason}");
    }
    Ok(
        if report.drifted > report.repaired || report.unreadable > 0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        },
    )
}

/// `projector rebuild`: builds (or resumes building) a new generation until
/// it serves; exit 1 if stopped first or the build was dropped meanwhile.
async fn rebuild(args: &Args, projection: &str, switch: bool) -> anyhow::Result<ExitCode> {
    use scaleout::projection::rebuild::{self, Ended, RebuildError, Rebuilder};
    let app: std::sync::Arc<dyn Application> = std::sync::Arc::new(reference::Reference);
    scaleout::projection::choose(app.projections(), &[projection.to_owned()])?;
    let documents = args
        .documents
        .open()
        .await
        .context("opening the document store")?;
    let log = args
        .event_log(Duration::from_secs(30))
        .with_context(|| format!("event log {}", args.event_log))?;
    match rebuild::start(documents.as_ref(), projection, switch).await {
        Ok(generation) => tracing::info!(projection, generation, "rebuild started"),
        Err(RebuildError::AlreadyBuilding { generation, .. }) => {
            tracing::info!(projection, generation, "resuming the rebuild under way");
        }
        Err(error) => return Err(error.into()),
    }
    if switch {
        // A resumed build may have been started without --switch.
        rebuild::switch_when_ready(documents.as_ref(), projection).await?;
    }
    let stopping = scaleout::shutdown::on_signal();
    let rebuilder = Rebuilder::new(
        app,
        documents,
        std::sync::Arc::new(log),
        std::sync::Arc::default(),
    );
    let mut waiting = false;
    loop {
        match rebuilder.run(projection, &stopping).await? {
            Ended::Done | Ended::NoJob => return Ok(ExitCode::SUCCESS),
            Ended::Stopped | Ended::Lost => return Ok(ExitCode::FAILURE),
            Ended::HeldElsewhere => {
                if !std::mem::replace(&mut waiting, true) {
                    tracing::info!(
                        projection,
                        "another process holds this build; taking over if its lease lapses"
                    );
                }
                tokio::select! {
                    () = stopping.cancelled() => return Ok(ExitCode::FAILURE),
                    () = tokio::time::sleep(rebuild::LEASE / 2) => {}
                }
            }
        }
    }
}
