//! Health that follows dependencies and goes NOT_SERVING first on shutdown.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The health of the services one server hosts (and of the server as a
/// whole, the empty service name).
#[derive(Debug, Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Vec<String>,
    stopping: CancellationToken,
}

impl Health {
    /// Starts NOT_SERVING until a dependency check says otherwise.
    pub async fn new(
        reporter: HealthReporter,
        services: impl IntoIterator<Item = impl Into<String>>,
        stopping: CancellationToken,
    ) -> Self {
        let mut services: Vec<String> = services.into_iter().map(Into::into).collect();
        services.push(String::new());
        let health = Self {
            reporter,
            services,
            stopping,
        };
        health.set(ServingStatus::NotServing).await;
        health
    }

    /// Marks every service serving or not; once shutdown has begun, only
    /// NOT_SERVING sticks, so a late dependency check cannot undo it.
    pub async fn report(&self, serving: bool) {
        let status = if serving && !self.stopping.is_cancelled() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.set(status).await;
    }

    async fn set(&self, status: ServingStatus) {
        for service in &self.services {
            self.reporter.set_service_status(service, status).await;
        }
    }

    /// Probes a dependency every `interval` (each probe bounded by it) and
    /// reports the result, until shutdown, which reports NOT_SERVING.
    pub async fn follow<F, Fut, E>(self, dependency: &str, interval: Duration, mut probe: F)
    where
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
                        tracing::warn!(dependency, %error, "dependency is down: not serving")
                    }
                }
            }
            last = Some(serving);
            self.report(serving).await;
            tokio::select! {
                () = self.stopping.cancelled() => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
        self.report(false).await;
    }
}
