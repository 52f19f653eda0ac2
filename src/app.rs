//! The wiring of each deployable service, so that binaries stay flag parsing
//! and tests run exactly what ships (on port 0).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;

use crate::bus::EventBus;
use crate::command::{CommandHandler, RetryPolicy};
use crate::config::ServerArgs;
use crate::grpc::{AdminApi, CommandApi, Health, server};
use crate::pb::command_service_server::SERVICE_NAME as COMMAND_SERVICE;
use crate::relay::{Relay, RelayConfig};
use crate::store::EventStore;

/// The health service name that reports whether the outbox relay can
/// publish. The command service stays SERVING while the bus is away: it
/// keeps accepting commands, and their events wait in the outbox.
pub const OUTBOX_RELAY_HEALTH: &str = "scaleout.OutboxRelay";

/// Why a service stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
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
    let (routes, health) = server::routes(services, &[COMMAND_SERVICE], stopping.clone()).await?;

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
    if let Some(bus) = bus {
        let relay = Relay::new(store, bus, relay);
        tasks.spawn(report_relay(health.clone(), relay.state()));
        tasks.spawn(relay.run(stopping.child_token()));
    }

    let served = server::serve(listener, routes, health, &server_args, stopping.clone()).await;
    stopping.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(served?)
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
