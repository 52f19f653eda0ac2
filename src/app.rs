//! The wiring of each deployable service, so that binaries stay flag parsing
//! and tests run exactly what ships (on port 0).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;

use crate::bus::{EventBus, Subscription};
use crate::command::{CommandHandler, RetryPolicy};
use crate::config::ServerArgs;
use crate::documents::DocumentStore;
use crate::grpc::metrics::ExtraMetrics;
use crate::grpc::{AdminApi, CommandApi, Health, QueryApi, server};
use crate::pb::command_service_server::SERVICE_NAME as COMMAND_SERVICE;
use crate::projection::metrics::ProjectorMetrics;
use crate::projection::runtime::{Projector, ProjectorConfig};
use crate::query::Queries;
use crate::relay::{Relay, RelayConfig};
use crate::store::EventStore;

/// The health service name of a projector process: SERVING while both the
/// bus and the document store answer.
pub const PROJECTOR_HEALTH: &str = "scaleout.Projector";

/// The health service name that reports whether the outbox relay can
/// publish. The command service stays SERVING while the bus is away: it
/// keeps accepting commands, and their events wait in the outbox.
pub const OUTBOX_RELAY_HEALTH: &str = "scaleout.OutboxRelay";

/// Why a service stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Projection(#[from] crate::projection::views::UnknownProjection),
    #[error("building reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// What command-svc runs on.
#[derive(Debug, Clone)]
pub struct CommandService {
    pub store: Arc<dyn EventStore>,
    /// Where the outbox relay publishes; `None` runs no relay (events wait
    /// in the outbox for a process that has one).
    pub bus: Option<Arc<dyn EventBus>>,
    pub server: ServerArgs,
    pub retry: RetryPolicy,
    pub relay: RelayConfig,
}

/// command-svc: the command service over the store, with health following
/// the store, and with a bus the outbox relay and the admin service (dead
/// letters), until `stopping` is cancelled.
pub async fn run_command_service(
    listener: TcpListener,
    service: CommandService,
    stopping: CancellationToken,
) -> Result<(), ServeError> {
    let CommandService {
        store,
        bus,
        server: server_args,
        retry,
        relay,
    } = service;
    let handler = Arc::new(CommandHandler::new(Arc::clone(&store), retry));
    let mut services = RoutesBuilder::default();
    services.add_service(CommandApi::new(handler).into_service(server_args.max_message_bytes));
    if let Some(bus) = &bus {
        services.add_service(
            AdminApi::new(Arc::clone(bus)).into_service(server_args.max_message_bytes),
        );
    }
    let relay = bus.map(|bus| Relay::new(Arc::clone(&store), bus, relay));
    let extra = relay.as_ref().map(|relay| relay_metrics(relay.state()));
    let (routes, health) =
        server::routes(services, &[COMMAND_SERVICE], extra, stopping.clone()).await?;

    let mut tasks = tokio::task::JoinSet::new();
    let probed = Arc::clone(&store);
    tasks.spawn(health.clone().follow(
        vec![COMMAND_SERVICE.to_owned(), String::new()],
        "event store",
        server_args.health_interval,
        move || {
            let store = Arc::clone(&probed);
            async move { store.ping().await }
        },
    ));
    if let Some(relay) = relay {
        tasks.spawn(report_relay(health.clone(), relay.state()));
        tasks.spawn(relay.run(stopping.child_token()));
    }

    serve_then_drain(listener, routes, health, &server_args, stopping, tasks).await
}

/// Serves until `stopping` is cancelled, then cancels and awaits the
/// background `tasks` (dependency followers, relay, workers).
async fn serve_then_drain(
    listener: TcpListener,
    routes: tonic::service::Routes,
    health: Health,
    server_args: &ServerArgs,
    stopping: CancellationToken,
    mut tasks: tokio::task::JoinSet<()>,
) -> Result<(), ServeError> {
    let served = server::serve(listener, routes, health, server_args, stopping.clone()).await;
    stopping.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(served?)
}

/// The relay's state as a metric: 1 while events can flow to the bus.
fn relay_metrics(state: tokio::sync::watch::Receiver<crate::relay::RelayState>) -> ExtraMetrics {
    Arc::new(move || {
        let state = state.borrow();
        format!(
            "# HELP scaleout_outbox_relay_healthy 1 while the outbox relay can publish.\n\
             # TYPE scaleout_outbox_relay_healthy gauge\n\
             scaleout_outbox_relay_healthy{{state=\"{}\"}} {}\n",
            state.name(),
            u8::from(state.is_healthy())
        )
    })
}

/// Mirrors the relay's state into health.
async fn report_relay(
    health: Health,
    mut state: tokio::sync::watch::Receiver<crate::relay::RelayState>,
) {
    loop {
        let healthy = state.borrow_and_update().is_healthy();
        health.report(OUTBOX_RELAY_HEALTH, healthy).await;
        if state.changed().await.is_err() {
            break;
        }
    }
}

/// What a projector process runs on.
#[derive(Debug, Clone)]
pub struct ProjectorService {
    pub bus: Arc<dyn EventBus>,
    pub documents: Arc<dyn DocumentStore>,
    pub subscription: Subscription,
    /// Which read models this service type keeps; empty: all of them.
    pub projections: Vec<String>,
    /// Workers in this process, each with its own subscriber.
    pub workers: usize,
    pub config: ProjectorConfig,
    pub server: ServerArgs,
}

/// A projector: workers projecting the reference read models, plus gRPC
/// health (following the bus and the store) and `/metrics` on `listener`,
/// until `stopping` is cancelled.
pub async fn run_projector(
    listener: TcpListener,
    service: ProjectorService,
    stopping: CancellationToken,
) -> Result<(), ServeError> {
    let ProjectorService {
        bus,
        documents,
        subscription,
        projections,
        workers,
        config,
        server: server_args,
    } = service;
    let metrics = Arc::new(ProjectorMetrics::default());
    let projector = Projector::new(
        Arc::clone(&documents),
        crate::projection::views::named(&projections)?,
        Arc::clone(&metrics),
        config,
    );
    let scraped = Arc::clone(&metrics);
    let extra: ExtraMetrics = Arc::new(move || scraped.render());
    let services = RoutesBuilder::default();
    let (routes, health) =
        server::routes(services, &[PROJECTOR_HEALTH], Some(extra), stopping.clone()).await?;

    let mut tasks = tokio::task::JoinSet::new();
    let (probed_bus, probed_documents) = (Arc::clone(&bus), Arc::clone(&documents));
    tasks.spawn(health.clone().follow(
        vec![PROJECTOR_HEALTH.to_owned(), String::new()],
        "event bus and document store",
        server_args.health_interval,
        move || {
            let (bus, documents) = (Arc::clone(&probed_bus), Arc::clone(&probed_documents));
            async move {
                bus.ping().await.map_err(|e| e.to_string())?;
                documents.ping().await.map_err(|e| e.to_string())
            }
        },
    ));
    for _ in 0..workers.max(1) {
        let (bus, projector, subscription, stopping) = (
            Arc::clone(&bus),
            projector.clone(),
            subscription.clone(),
            stopping.child_token(),
        );
        tasks.spawn(async move {
            if let Some(subscriber) = subscribe(bus.as_ref(), &subscription, &stopping).await {
                projector.run(subscriber, stopping).await;
            }
        });
    }

    serve_then_drain(listener, routes, health, &server_args, stopping, tasks).await
}

/// Subscribes, retrying with backoff while the bus is away; `None` once stopping.
async fn subscribe(
    bus: &dyn EventBus,
    subscription: &Subscription,
    stopping: &CancellationToken,
) -> Option<Box<dyn crate::bus::Subscriber>> {
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match bus.subscribe(subscription).await {
            Ok(subscriber) => return Some(subscriber),
            Err(error) => tracing::warn!(%error, ?pause, "cannot subscribe yet; retrying"),
        }
        tokio::select! {
            () = stopping.cancelled() => return None,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
    }
}

/// What query-svc runs on.
#[derive(Debug, Clone)]
pub struct QueryService {
    pub documents: Arc<dyn DocumentStore>,
    /// The longest a query waits for `min_version`, whatever the deadline.
    pub max_wait: std::time::Duration,
    pub server: ServerArgs,
}

/// query-svc: the query service over the document store, with health
/// following the store, until `stopping` is cancelled.
pub async fn run_query_service(
    listener: TcpListener,
    service: QueryService,
    stopping: CancellationToken,
) -> Result<(), ServeError> {
    use crate::pb::query_service_server::SERVICE_NAME as QUERY_SERVICE;
    let QueryService {
        documents,
        max_wait,
        server: server_args,
    } = service;
    let api = QueryApi::new(Queries::new(Arc::clone(&documents)), max_wait);
    let mut services = RoutesBuilder::default();
    services.add_service(api.into_service(server_args.max_message_bytes));
    let (routes, health) =
        server::routes(services, &[QUERY_SERVICE], None, stopping.clone()).await?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(health.clone().follow(
        vec![QUERY_SERVICE.to_owned(), String::new()],
        "document store",
        server_args.health_interval,
        move || {
            let documents = Arc::clone(&documents);
            async move { documents.ping().await }
        },
    ));
    serve_then_drain(listener, routes, health, &server_args, stopping, tasks).await
}

/// The embedded platform: every part in one process on one data directory.
#[derive(Debug, Clone)]
pub struct Platform {
    /// Holds `events.redb` (the event store) and `views.redb` (the read models).
    pub data_dir: std::path::PathBuf,
    pub server: ServerArgs,
    pub retry: RetryPolicy,
    pub max_wait: std::time::Duration,
}

/// The whole platform in one process: the command service with its outbox
/// relay, an in-process bus, projectors and the query service, all on
/// `listener` (both services, admin, health and reflection), until
/// `stopping` is cancelled. It keeps everything in `data_dir`, so it picks
/// up where it left off: events still in the outbox are published again and
/// the projectors skip what they had applied.
pub async fn run_platform(
    listener: TcpListener,
    platform: Platform,
    stopping: CancellationToken,
) -> Result<(), PlatformError> {
    use crate::pb::query_service_server::SERVICE_NAME as QUERY_SERVICE;
    let Platform {
        data_dir,
        server: server_args,
        retry,
        max_wait,
    } = platform;
    let store: Arc<dyn EventStore> = Arc::new(crate::store::redb::RedbStore::open(
        data_dir.join("events.redb"),
    )?);
    let documents: Arc<dyn DocumentStore> = Arc::new(crate::documents::redb::RedbDocuments::open(
        data_dir.join("views.redb"),
    )?);
    let bus: Arc<dyn EventBus> = Arc::new(crate::bus::memory::MemoryBus::new());

    let handler = Arc::new(CommandHandler::new(Arc::clone(&store), retry));
    let limit = server_args.max_message_bytes;
    let mut services = RoutesBuilder::default();
    services
        .add_service(CommandApi::new(handler).into_service(limit))
        .add_service(
            QueryApi::new(Queries::new(Arc::clone(&documents)), max_wait).into_service(limit),
        )
        .add_service(AdminApi::new(Arc::clone(&bus)).into_service(limit));
    let relay = Relay::new(Arc::clone(&store), Arc::clone(&bus), RelayConfig::default());
    let projector_metrics = Arc::new(ProjectorMetrics::default());
    let (relay_state, scraped) = (relay_metrics(relay.state()), Arc::clone(&projector_metrics));
    let extra: ExtraMetrics = Arc::new(move || scraped.render() + &relay_state());
    let (routes, health) = server::routes(
        services,
        &[COMMAND_SERVICE, QUERY_SERVICE],
        Some(extra),
        stopping.clone(),
    )
    .await?;

    let mut tasks = tokio::task::JoinSet::new();
    let (probed_store, probed_documents) = (Arc::clone(&store), Arc::clone(&documents));
    tasks.spawn(health.clone().follow(
        vec![
            COMMAND_SERVICE.to_owned(),
            QUERY_SERVICE.to_owned(),
            String::new(),
        ],
        "event store and document store",
        server_args.health_interval,
        move || {
            let (store, documents) = (Arc::clone(&probed_store), Arc::clone(&probed_documents));
            async move {
                store.ping().await.map_err(|e| e.to_string())?;
                documents.ping().await.map_err(|e| e.to_string())
            }
        },
    ));
    // Subscribe before the relay starts, so the first events are routable.
    let subscription = Subscription {
        service_type: "projector".into(),
        bindings: vec!["#".into()],
        prefetch: 100,
        max_attempts: 5,
    };
    let projector = Projector::new(
        documents,
        crate::projection::views::reference(),
        projector_metrics,
        ProjectorConfig::default(),
    );
    let subscriber = bus.subscribe(&subscription).await?;
    let worker_stopping = stopping.child_token();
    tasks.spawn(async move { projector.run(subscriber, worker_stopping).await });
    tasks.spawn(report_relay(health.clone(), relay.state()));
    tasks.spawn(relay.run(stopping.child_token()));

    Ok(serve_then_drain(listener, routes, health, &server_args, stopping, tasks).await?)
}

/// Why the embedded platform could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("opening the event store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("opening the read models: {0}")]
    Documents(#[from] crate::documents::DocumentError),
    #[error("subscribing the projector: {0}")]
    Bus(#[from] crate::bus::BusError),
}

impl From<tonic_reflection::server::Error> for PlatformError {
    fn from(error: tonic_reflection::server::Error) -> Self {
        Self::Serve(ServeError::Reflection(error))
    }
}
