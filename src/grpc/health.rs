//! Health that follows dependencies and goes NOT_SERVING first on shutdown.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::tls::TlsFiles;

/// The health one server reports, per service name (the empty name is the
/// server as a whole).
#[derive(Debug, Clone)]
pub struct Health {
    reporter: HealthReporter,
    /// Every name reported so far, so shutdown can turn them all off.
    known: Arc<Mutex<BTreeSet<String>>>,
    stopping: CancellationToken,
}

impl Health {
    pub fn new(reporter: HealthReporter, stopping: CancellationToken) -> Self {
        Self {
            reporter,
            known: Arc::default(),
            stopping,
        }
    }

    /// Marks `service` serving or not; once shutdown has begun only
    /// NOT_SERVING sticks, so a late dependency check cannot undo it.
    pub async fn report(&self, service: &str, serving: bool) {
        self.known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(service.to_owned());
        let status = if serving && !self.stopping.is_cancelled() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status(service, status).await;
    }

    /// Marks every service reported so far NOT_SERVING.
    pub async fn stop(&self) {
        let known: Vec<String> = self
            .known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .cloned()
            .collect();
        for service in known {
            self.report(&service, false).await;
        }
    }

    /// Probes a dependency every `interval` (each probe bounded by it) and
    /// reports the result for `services`, until shutdown.
    pub async fn follow<F, Fut, E>(
        self,
        services: Vec<String>,
        dependency: &str,
        interval: Duration,
        mut probe: F,
    ) where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let mut last = None;
        loop {
            let outcome = match tokio::time::timeout(interval, probe()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err(format!("no answer within {interval:?}")),
            };
            let serving = outcome.is_ok();
            if last != Some(serving) {
                match &outcome {
                    Ok(()) => tracing::info!(dependency, "dependency is up: serving"),
                    Err(error) => {
                        tracing::warn!(dependency, %error, "dependency is down: not serving");
                    }
                }
            }
            last = Some(serving);
            for service in &services {
                self.report(service, serving).await;
            }
            tokio::select! {
                () = self.stopping.cancelled() => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}

/// Asks the gRPC health service at `addr` about the server as a whole:
/// `Ok(true)` when SERVING. What a container health check runs, so images
/// need no probe tool of their own. `tls`: the server's own TLS files, when
/// it serves TLS.
pub async fn check(
    addr: std::net::SocketAddr,
    timeout: Duration,
    tls: Option<&TlsFiles>,
) -> Result<bool, String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let ask = async {
        let channel = match tls {
            Some(files) => super::tls::health_channel(addr, files).await?,
            None => tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?,
        };
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .map_err(|e| e.message().to_owned())?
            .into_inner()
            .status();
        Ok(status == ServingStatus::Serving)
    };
    tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
}

impl crate::config::ServerArgs {
    /// With `--check-health`: asks the server on `listen` for its health and
    /// says what the process should exit with (success when SERVING); the
    /// binary exits with it. `None` without the flag.
    pub async fn check_health_exit_code(
        &self,
        listen: std::net::SocketAddr,
    ) -> Option<std::process::ExitCode> {
        if !self.check_health {
            return None;
        }
        // A server bound to all interfaces answers on loopback.
        let addr = if listen.ip().is_unspecified() {
            std::net::SocketAddr::from(([127, 0, 0, 1], listen.port()))
        } else {
            listen
        };
        let tls = self.tls.files();
        Some(
            match check(addr, Duration::from_secs(3), tls.as_ref()).await {
                Ok(true) => std::process::ExitCode::SUCCESS,
                Ok(false) => {
                    eprintln!("{addr} is NOT_SERVING");
                    std::process::ExitCode::FAILURE
                }
                Err(error) => {
                    eprintln!("{error}");
                    std::process::ExitCode::FAILURE
                }
            },
        )
    }
}
