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
use std::time::Duration;

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

/// Reads the files `args` name (the TLS certificate and key, the token
/// keys), so that a binary refuses a bad one before it binds and says where
/// it serves; the server reads them again as it starts, and on change.
pub fn check_files(args: &ServerArgs) -> Result<(), ServeError> {
    if let Some(files) = args.tls.files() {
        ServerTls::load(files)?;
    }
    crate::grpc::auth::Authenticator::from_args(&args.auth)
        .map_err(crate::grpc::server::RoutesError::Auth)?;
    Ok(())
}

/// Serves until `stopping` is cancelled, then cancels and awaits the
/// background `tasks` (dependency followers, relay, workers).
async fn serve_then_drain(
    listener: TcpListener,
    routes: tonic::service::Routes,
    health: Health,
    server_args: &ServerArgs,
    stopping: CancellationToken,
    mut tasks: Background,
) -> Result<(), ServeError> {
    let tls = match server_args.tls.files().map(ServerTls::load).transpose() {
        Ok(tls) => tls,
        Err(error) => {
            stopping.cancel();
            tasks.join().await;
            return Err(error.into());
        }
    };
    if let Some(tls) = &tls {
        tasks.spawn(
            "TLS reload",
            tls.clone().reload_on_change(stopping.child_token()),
        );
    }
    let served = server::serve(listener, routes, health, tls, server_args, stopping.clone()).await;
    stopping.cancel();
    tasks.join().await;
    Ok(served?)
}

/// A service's background tasks, by name, so that a shutdown that waits
/// says for what.
#[derive(Debug, Default)]
struct Background {
    tasks: tokio::task::JoinSet<&'static str>,
    running: Vec<&'static str>,
}

impl Background {
    fn spawn(
        &mut self,
        name: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.running.push(name);
        self.tasks.spawn(async move {
            task.await;
            name
        });
    }

    /// Waits for every task (once they were told to stop), naming the ones
    /// still running every few seconds.
    async fn join(mut self) {
        tracing::info!(tasks = ?self.running, "stopping background tasks");
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.tasks.join_next()).await {
                Ok(Some(ended)) => {
                    let name = ended.unwrap_or("a task that panicked");
                    if let Some(index) = self.running.iter().position(|r| *r == name) {
                        self.running.remove(index);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(waiting_for = ?self.running, "shutdown is waiting for background tasks")
                }
            }
        }
        tracing::info!("background tasks stopped");
    }
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
