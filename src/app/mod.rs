//! The wiring of each deployable service, for any [`Application`], so that
//! binaries stay flag parsing and tests run exactly what ships (on port 0):
//! one file per service, plus the embedded platform that runs them all in
//! one process.

mod application;
mod command;
mod platform;
mod projector;
mod query;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use self::application::Application;
pub use self::command::{CommandService, run_command_service};
pub use self::platform::{Platform, PlatformError, run_platform};
pub use self::projector::{ProjectorService, run_projector};
pub use self::query::{QueryService, run_query_service};
use crate::config::ServerArgs;
use crate::grpc::metrics::ExtraMetrics;
pub use crate::grpc::server::Services;
use crate::grpc::tls::ServerTls;
use crate::grpc::{Health, server};

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
    Projection(#[from] crate::projection::UnknownProjection),
    #[error(transparent)]
    Routes(#[from] crate::grpc::server::RoutesError),
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::grpc::tls::TlsError),
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
    let tls = match server_args.tls.files().map(ServerTls::load).transpose() {
        Ok(tls) => tls,
        Err(error) => {
            stopping.cancel();
            while tasks.join_next().await.is_some() {}
            return Err(error.into());
        }
    };
    if let Some(tls) = &tls {
        tasks.spawn(tls.clone().reload_on_change(stopping.child_token()));
    }
    let served = server::serve(listener, routes, health, tls, server_args, stopping.clone()).await;
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
