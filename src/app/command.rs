//! command-svc's wiring.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;

use super::{ServeError, relay_metrics, report_relay, serve_then_drain};
use crate::bus::EventBus;
use crate::command::{CommandHandler, RetryPolicy};
use crate::config::ServerArgs;
use crate::grpc::{AdminApi, CommandApi, ReadApi, ReadConfig, server};
use crate::pb::command_service_server::SERVICE_NAME as COMMAND_SERVICE;
use crate::relay::{Relay, RelayConfig};
use crate::store::EventStore;

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
    let limit = server_args.max_message_bytes;
    services
        .add_service(CommandApi::new(handler).into_service(limit))
        .add_service(
            ReadApi::new(
                Arc::clone(&store),
                super::reference_types(),
                ReadConfig::default(),
            )
            .into_service(limit),
        );
    let mut served = vec![
        COMMAND_SERVICE,
        crate::pb::read_service_server::SERVICE_NAME,
    ];
    if bus.is_some() {
        served.push(crate::pb::admin_service_server::SERVICE_NAME);
    }
    if let Some(bus) = &bus {
        services.add_service(
            AdminApi::new(Arc::clone(bus)).into_service(server_args.max_message_bytes),
        );
    }
    let relay = bus.map(|bus| Relay::new(Arc::clone(&store), bus, relay));
    let extra = relay.as_ref().map(|relay| relay_metrics(relay.state()));
    let (routes, health) = server::routes(
        services,
        &served,
        &[COMMAND_SERVICE],
        extra,
        &server_args,
        stopping.clone(),
    )
    .await?;

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
