//! The embedded platform's wiring: every part in one process.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;

use super::{ServeError, relay_metrics, report_relay, serve_then_drain};
use crate::bus::{EventBus, Subscription};
use crate::command::{CommandHandler, RetryPolicy};
use crate::config::ServerArgs;
use crate::documents::DocumentStore;
use crate::grpc::metrics::ExtraMetrics;
use crate::grpc::{AdminApi, CommandApi, QueryApi, server};
use crate::pb::command_service_server::SERVICE_NAME as COMMAND_SERVICE;
use crate::projection::metrics::ProjectorMetrics;
use crate::projection::runtime::{Projector, ProjectorConfig};
use crate::query::Queries;
use crate::relay::{Relay, RelayConfig};
use crate::store::EventStore;

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
