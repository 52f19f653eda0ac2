//! The embedded platform's wiring: every part in one process.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Application, Background, ServeError, Services, serve_then_drain};
use crate::command::{CommandHandler, RetryPolicy};
use crate::config::ServerArgs;
use crate::documents::DocumentStore;
use crate::grpc::auth::Capability;
use crate::grpc::metrics::ExtraMetrics;
use crate::grpc::query_request::max_wait_within;
use crate::grpc::{AdminApi, ReadApi, ReadConfig, ReadModelApi, server};
use crate::log::StoreLog;
use crate::projection::FollowConfig;
use crate::projection::metrics::ProjectorMetrics;
use crate::projection::rebuild::Rebuilder;
use crate::projection::runtime::{Projector, ProjectorConfig};
use crate::query::Queries;
use crate::store::EventStore;
use crate::store::redb::{Outbox, RedbStore};

/// The embedded platform: every part in one process on one data directory.
#[derive(Debug, Clone)]
pub struct Platform {
    pub app: Arc<dyn Application>,
    /// Holds `events.redb` (the event store) and `views.redb` (the read models).
    pub data_dir: std::path::PathBuf,
    pub server: ServerArgs,
    pub retry: RetryPolicy,
    /// Events between two snapshots of a stream (0: none); see
    /// [`CommandHandler::with_snapshots_every`].
    pub snapshot_every: u64,
    pub max_wait: std::time::Duration,
}

/// The whole platform in one process: the application's command and query
/// services, the read API and a projector following the event log, all on
/// `listener` (with health and reflection), until `stopping` is cancelled.
///
/// There is no bus in between: the projector reads the log itself from a
/// checkpoint kept with the read models, so a crash at any instant (even a
/// SIGKILL between a commit and its projection) loses nothing: on restart
/// it picks up at the checkpoint and skips what it had applied.
pub async fn run_platform(
    listener: TcpListener,
    platform: Platform,
    stopping: CancellationToken,
) -> Result<(), PlatformError> {
    let Platform {
        app,
        data_dir,
        server: server_args,
        retry,
        snapshot_every,
        max_wait,
    } = platform;
    // Opening may repair a file after a crash: not on a runtime thread.
    let (store, documents) = tokio::task::spawn_blocking(move || {
        let store = RedbStore::open_with(data_dir.join("events.redb"), Outbox::Off)?;
        let documents = crate::documents::redb::RedbDocuments::open(data_dir.join("views.redb"))?;
        Ok::<_, PlatformError>((store, documents))
    })
    .await
    .map_err(|e| PlatformError::Opening(e.to_string()))??;
    let store: Arc<dyn EventStore> = Arc::new(store);
    let documents: Arc<dyn DocumentStore> = Arc::new(documents);

    // Registered before serving: a read model new to this data directory
    // answers that it is being built from the first query on.
    crate::projection::rebuild::register(documents.as_ref(), app.as_ref()).await?;
    let known = app.known_types();
    let projector_metrics = Arc::new(ProjectorMetrics::default());
    let handler = Arc::new(
        CommandHandler::new(Arc::clone(&store), retry)
            .with_snapshots_every(snapshot_every)
            .with_upcasters(known.upcasters.clone())
            .with_contention(Arc::clone(&projector_metrics.contention)),
    );
    let mut services = Services::new(server_args.max_message_bytes);
    services.requiring(Capability::Commands);
    app.command_services(handler, &mut services);
    let commands = services.names().to_vec();
    services.requiring(Capability::Queries);
    app.query_services(
        Queries::new(Arc::clone(&documents)),
        max_wait_within(max_wait, server_args.request_timeout),
        &mut services,
    );
    let queries = services.names()[commands.len()..].to_vec();
    let limit = services.max_message_bytes;
    services
        .requiring(Capability::Read)
        .add(ReadApi::new(Arc::clone(&store), known, ReadConfig::default()).into_service(limit));
    services.requiring(Capability::Admin).add(
        ReadModelApi::new(
            Arc::clone(&app),
            Arc::new(StoreLog(Arc::clone(&store))),
            Arc::clone(&documents),
        )
        .into_service(limit),
    );
    services
        .add(AdminApi::new(None, Arc::clone(&projector_metrics.contention)).into_service(limit));
    let scraped = Arc::clone(&projector_metrics);
    let extra: ExtraMetrics = Arc::new(move || scraped.render());
    let health_names = [commands.as_slice(), queries.as_slice()].concat();
    let (routes, health) = server::routes(
        services,
        app.file_descriptor_set(),
        &health_names,
        Some(extra),
        &server_args,
        stopping.clone(),
    )
    .await?;

    let mut tasks = Background::default();
    // Commands need only the event store; queries, and the platform as a
    // whole, also a projector that keeps the views moving.
    let probed_store = Arc::clone(&store);
    tasks.spawn(
        "health: event store",
        health.clone().follow(
            commands.iter().map(|name| (*name).to_owned()).collect(),
            "event store",
            server_args.health_interval,
            move || {
                let store = Arc::clone(&probed_store);
                async move { store.ping().await }
            },
        ),
    );
    let (probed_store, probed_documents, probed_projector) = (
        Arc::clone(&store),
        Arc::clone(&documents),
        Arc::clone(&projector_metrics),
    );
    tasks.spawn(
        "health: queries",
        health.clone().follow(
            queries
                .iter()
                .map(|name| (*name).to_owned())
                .chain([String::new()])
                .collect(),
            "event store, document store and projector",
            server_args.health_interval,
            move || {
                let (store, documents, projector) = (
                    Arc::clone(&probed_store),
                    Arc::clone(&probed_documents),
                    Arc::clone(&probed_projector),
                );
                async move {
                    store.ping().await.map_err(|e| e.to_string())?;
                    documents.ping().await.map_err(|e| e.to_string())?;
                    if projector.is_paused() {
                        return Err("the projector is waiting for a dependency".to_owned());
                    }
                    Ok(())
                }
            },
        ),
    );
    let log: Arc<dyn crate::log::EventLog> = Arc::new(StoreLog(store));
    let rebuilder = Rebuilder::new(
        Arc::clone(&app),
        Arc::clone(&documents),
        Arc::clone(&log),
        Arc::clone(&projector_metrics),
    );
    let names = app.projections().iter().map(|p| p.name()).collect();
    tasks.spawn(
        "rebuilds",
        rebuilder.supervise(names, stopping.child_token()),
    );
    let projector = Projector::new(
        documents,
        log,
        app.known_types(),
        app.projections(),
        projector_metrics,
        ProjectorConfig::default(),
    );
    let follow = FollowConfig {
        name: "platform".into(),
        settle_delay: std::time::Duration::ZERO,
        poll: std::time::Duration::from_secs(1),
        page: 500,
    };
    let worker_stopping = stopping.child_token();
    tasks.spawn("projector", async move {
        projector.follow(follow, worker_stopping).await
    });

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
    #[error("registering the read models: {0}")]
    Registering(#[from] crate::projection::rebuild::RebuildError),
    #[error("opening the data directory: {0}")]
    Opening(String),
}

impl From<crate::grpc::server::RoutesError> for PlatformError {
    fn from(error: crate::grpc::server::RoutesError) -> Self {
        Self::Serve(ServeError::Routes(error))
    }
}
