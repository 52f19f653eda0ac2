//! command-svc's wiring.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{
    Application, Background, ServeError, Services, relay_metrics, report_relay, serve_then_drain,
};
use crate::bus::EventBus;
use crate::command::{CommandHandler, RetryPolicy};
use crate::config::ServerArgs;
use crate::contention::Contention;
use crate::grpc::auth::Capability;
use crate::grpc::metrics::ExtraMetrics;
use crate::grpc::{AdminApi, ReadApi, ReadConfig, server};
use crate::relay::{Relay, RelayConfig};
use crate::store::EventStore;

/// What command-svc runs on.
#[derive(Debug, Clone)]
pub struct CommandService {
    pub app: Arc<dyn Application>,
    pub store: Arc<dyn EventStore>,
    /// Where the outbox relay publishes; `None` runs no relay (events wait
    /// in the outbox for a process that has one).
    pub bus: Option<Arc<dyn EventBus>>,
    pub server: ServerArgs,
    pub retry: RetryPolicy,
    /// Events between two snapshots of a stream (0: none); see
    /// [`CommandHandler::with_snapshots_every`].
    pub snapshot_every: u64,
    pub relay: RelayConfig,
}

/// command-svc: the application's command services over the store, with health following
/// the store, the admin service (contention; with a bus, dead letters) and
/// with a bus the outbox relay, until `stopping` is cancelled.
pub async fn run_command_service(
    listener: TcpListener,
    service: CommandService,
    stopping: CancellationToken,
) -> Result<(), ServeError> {
    let CommandService {
        app,
        store,
        bus,
        server: server_args,
        retry,
        snapshot_every,
        relay,
    } = service;
    let known = app.known_types();
    let contention = Arc::new(Contention::new());
    let handler = Arc::new(
        CommandHandler::new(Arc::clone(&store), retry)
            .with_snapshots_every(snapshot_every)
            .with_upcasters(known.upcasters.clone())
            .with_contention(Arc::clone(&contention)),
    );
    let mut services = Services::new(server_args.max_message_bytes);
    services.requiring(Capability::Commands);
    app.command_services(handler, &mut services);
    // Health reports on the application's command services.
    let commands = services.names().to_vec();
    let limit = services.max_message_bytes;
    services
        .requiring(Capability::Read)
        .add(ReadApi::new(Arc::clone(&store), known, ReadConfig::default()).into_service(limit));
    services
        .requiring(Capability::Admin)
        .add(AdminApi::new(bus.clone(), Arc::clone(&contention)).into_service(limit));
    let relay = bus.map(|bus| Relay::new(Arc::clone(&store), bus, relay));
    let relay_state = relay.as_ref().map(|relay| relay_metrics(relay.state()));
    let extra: ExtraMetrics = Arc::new(move || {
        let relay = relay_state
            .as_ref()
            .map(|render| render())
            .unwrap_or_default();
        relay + &contention.render()
    });
    let (routes, health) = server::routes(
        services,
        app.file_descriptor_set(),
        &commands,
        Some(extra),
        &server_args,
        stopping.clone(),
    )
    .await?;

    let mut tasks = Background::default();
    let probed = Arc::clone(&store);
    tasks.spawn(
        "health: event store",
        health.clone().follow(
            commands
                .iter()
                .map(|name| (*name).to_owned())
                .chain([String::new()])
                .collect(),
            "event store",
            server_args.health_interval,
            move || {
                let store = Arc::clone(&probed);
                async move { store.ping().await }
            },
        ),
    );
    if let Some(relay) = relay {
        tasks.spawn("health: relay", report_relay(health.clone(), relay.state()));
        tasks.spawn("outbox relay", relay.run(stopping.child_token()));
    }

    serve_then_drain(listener, routes, health, &server_args, stopping, tasks).await
}
