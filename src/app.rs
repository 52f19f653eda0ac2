//! The wiring of each deployable service, so that binaries stay flag parsing
//! and tests run exactly what ships (on port 0).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;

use crate::command::{CommandHandler, RetryPolicy};
use crate::config::ServerArgs;
use crate::grpc::{CommandApi, server};
use crate::pb::command_service_server::SERVICE_NAME as COMMAND_SERVICE;
use crate::store::EventStore;

/// Why a service stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// command-svc: the command service over `store`, with health following the
/// store, until `stopping` is cancelled.
pub async fn run_command_service(
    listener: TcpListener,
    store: Arc<dyn EventStore>,
    server_args: ServerArgs,
    retry: RetryPolicy,
    stopping: CancellationToken,
) -> Result<(), ServeError> {
    let handler = Arc::new(CommandHandler::new(Arc::clone(&store), retry));
    let mut services = RoutesBuilder::default();
    services.add_service(CommandApi::new(handler).into_service(server_args.max_message_bytes));
    let (routes, health) = server::routes(services, &[COMMAND_SERVICE], stopping.clone()).await?;
    let watcher = tokio::spawn(health.clone().follow(
        "event store",
        server_args.health_interval,
        move || {
            let store = Arc::clone(&store);
            async move { store.ping().await }
        },
    ));
    let served = server::serve(listener, routes, health, &server_args, stopping.clone()).await;
    stopping.cancel();
    let _ = watcher.await;
    Ok(served?)
}
