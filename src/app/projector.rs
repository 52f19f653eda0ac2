//! The projector's wiring.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Application, Background, PROJECTOR_HEALTH, ServeError, serve_then_drain};
use crate::backoff::Backoff;
use crate::bus::{EventBus, Subscription};
use crate::config::ServerArgs;
use crate::documents::DocumentStore;
use crate::grpc::metrics::ExtraMetrics;
use crate::grpc::server::{self, Services};
use crate::grpc::{AdminApi, ReadModelApi};
use crate::log::EventLog;
use crate::projection::metrics::ProjectorMetrics;
use crate::projection::rebuild::Rebuilder;
use crate::projection::runtime::{Projector, ProjectorConfig};
use crate::projection::{FollowConfig, choose};

/// What a projector process runs on.
#[derive(Debug, Clone)]
pub struct ProjectorService {
    pub app: Arc<dyn Application>,
    pub bus: Arc<dyn EventBus>,
    pub documents: Arc<dyn DocumentStore>,
    /// Where gaps are filled from and the sweep reads (command-svc's read API).
    pub log: Arc<dyn EventLog>,
    /// How far the sweep trails the log (see [`FollowConfig::settle_delay`]).
    pub sweep_delay: std::time::Duration,
    pub subscription: Subscription,
    /// Which read models this service type keeps; empty: all of them.
    pub projections: Vec<String>,
    /// Workers in this process, each with its own subscriber.
    pub workers: usize,
    pub config: ProjectorConfig,
    pub server: ServerArgs,
}

/// A projector: workers projecting the application's read models, plus gRPC
/// health (following the bus and the store) and `/metrics` on `listener`,
/// until `stopping` is cancelled.
pub async fn run_projector(
    listener: TcpListener,
    service: ProjectorService,
    stopping: CancellationToken,
) -> Result<(), ServeError> {
    let ProjectorService {
        app,
        bus,
        documents,
        log,
        sweep_delay,
        subscription,
        projections,
        workers,
        config,
        server: server_args,
    } = service;
    let metrics = Arc::new(ProjectorMetrics::default());
    let mut services = Services::new(server_args.max_message_bytes);
    services.add(
        ReadModelApi::new(Arc::clone(&app), Arc::clone(&log), Arc::clone(&documents))
            .into_service(server_args.max_message_bytes),
    );
    services.add(
        AdminApi::new(Some(Arc::clone(&bus)), Arc::clone(&metrics.contention))
            .into_service(server_args.max_message_bytes),
    );
    let health_names = [&[PROJECTOR_HEALTH], services.names()].concat();
    let kept = choose(app.projections(), &projections)?;
    let kept_names: Vec<&'static str> = kept.iter().map(|p| p.name()).collect();
    let rebuilder = Rebuilder::new(
        Arc::clone(&app),
        Arc::clone(&documents),
        Arc::clone(&log),
        Arc::clone(&metrics),
    );
    let projector = Projector::new(
        Arc::clone(&documents),
        log,
        app.known_types(),
        kept,
        Arc::clone(&metrics),
        config,
    );
    let scraped = Arc::clone(&metrics);
    let extra: ExtraMetrics = Arc::new(move || scraped.render());
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
    let (probed_bus, probed_documents, probed_metrics) = (
        Arc::clone(&bus),
        Arc::clone(&documents),
        Arc::clone(&metrics),
    );
    tasks.spawn(
        "health",
        health.clone().follow(
            health_names
                .iter()
                .map(|name| (*name).to_owned())
                .chain([String::new()])
                .collect(),
            "event bus, document store and event log",
            server_args.health_interval,
            move || {
                let (bus, documents, metrics) = (
                    Arc::clone(&probed_bus),
                    Arc::clone(&probed_documents),
                    Arc::clone(&probed_metrics),
                );
                async move {
                    bus.ping().await.map_err(|e| e.to_string())?;
                    documents.ping().await.map_err(|e| e.to_string())?;
                    if metrics.is_paused() {
                        return Err("a worker is waiting for a dependency".to_owned());
                    }
                    Ok(())
                }
            },
        ),
    );
    // Every instance sweeps (the checkpoint is shared, and folding twice is
    // a skipped duplicate), so any one of them keeps the views whole.
    let sweep = FollowConfig {
        name: format!("{}-sweep", subscription.service_type),
        settle_delay: sweep_delay,
        poll: std::time::Duration::from_secs(1),
        page: 500,
    };
    let (sweeper, sweep_stopping) = (projector.clone(), stopping.child_token());
    tasks.spawn("sweep", async move {
        sweeper.follow(sweep, sweep_stopping).await
    });
    // Any instance runs a rebuild whose builder is gone.
    tasks.spawn(
        "rebuilds",
        rebuilder.supervise(kept_names, stopping.child_token()),
    );
    for _ in 0..workers.max(1) {
        let (bus, projector, subscription, stopping) = (
            Arc::clone(&bus),
            projector.clone(),
            subscription.clone(),
            stopping.child_token(),
        );
        let (metrics, supervised) = (Arc::clone(&metrics), Arc::clone(&metrics));
        tasks.spawn(
            "worker",
            supervise(supervised, stopping.clone(), move || {
                let (bus, projector, subscription, stopping) = (
                    Arc::clone(&bus),
                    projector.clone(),
                    subscription.clone(),
                    stopping.clone(),
                );
                let metrics = Arc::clone(&metrics);
                async move {
                    let subscribed = {
                        // Not serving until it consumes: its queue may not even
                        // be declared yet (broker away, arguments refused).
                        let _waiting = metrics.pause();
                        subscribe(bus.as_ref(), &subscription, &stopping).await
                    };
                    if let Some(subscriber) = subscribed {
                        projector.run(subscriber, stopping).await;
                    }
                }
            }),
        );
    }

    serve_then_drain(listener, routes, health, &server_args, stopping, tasks).await
}

/// Runs a worker, and again whenever it ends before `stopping` (a panic in
/// it, say), with a growing pause counted as a paused worker meanwhile, so
/// health says NOT_SERVING instead of serving with nobody consuming. Its
/// unsettled deliveries go back to the queue, whose delivery limit parks a
/// message that kills every worker it reaches.
async fn supervise<F, Fut>(metrics: Arc<ProjectorMetrics>, stopping: CancellationToken, worker: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut restarts = 0;
    loop {
        let ended = tokio::spawn(worker()).await;
        if stopping.is_cancelled() {
            return;
        }
        let pause = RESTART_BACKOFF.pause(restarts);
        restarts = restarts.saturating_add(1);
        match ended {
            Err(error) if error.is_panic() => {
                tracing::error!(%error, ?pause, "a projector worker panicked; restarting it")
            }
            _ => tracing::error!(?pause, "a projector worker stopped; restarting it"),
        }
        ProjectorMetrics::add(&metrics.worker_restarts, 1);
        let _waiting = metrics.pause();
        tokio::select! {
            () = stopping.cancelled() => {}
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Pauses before restarting a worker, or subscribing again.
const RESTART_BACKOFF: Backoff =
    Backoff::waiting(Duration::from_millis(100), Duration::from_secs(5));

/// Subscribes, retrying with backoff while the bus is away; `None` once stopping.
async fn subscribe(
    bus: &dyn EventBus,
    subscription: &Subscription,
    stopping: &CancellationToken,
) -> Option<Box<dyn crate::bus::Subscriber>> {
    let mut failures = 0;
    loop {
        let pause = RESTART_BACKOFF.pause(failures);
        failures = failures.saturating_add(1);
        // Stopping ends a subscription attempt too: one that waits on a
        // half-dead broker must not hold up shutdown.
        let subscribed = tokio::select! {
            () = stopping.cancelled() => return None,
            subscribed = bus.subscribe(subscription) => subscribed,
        };
        match subscribed {
            Ok(subscriber) => return Some(subscriber),
            Err(error) => tracing::warn!(%error, ?pause, "cannot subscribe yet; retrying"),
        }
        tokio::select! {
            () = stopping.cancelled() => return None,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_worker_that_panics_is_restarted_and_counted() {
        let metrics = Arc::new(ProjectorMetrics::default());
        let stopping = CancellationToken::new();
        let (starts, running) = (Arc::new(AtomicU32::new(0)), CancellationToken::new());
        let supervised = tokio::spawn(supervise(Arc::clone(&metrics), stopping.clone(), {
            let (starts, running, stopping) =
                (Arc::clone(&starts), running.clone(), stopping.clone());
            move || {
                let (starts, running, stopping) =
                    (Arc::clone(&starts), running.clone(), stopping.clone());
                async move {
                    if starts.fetch_add(1, Ordering::SeqCst) < 2 {
                        panic!("a bug in a worker");
                    }
                    running.cancel();
                    stopping.cancelled().await;
                }
            }
        }));
        tokio::time::timeout(std::time::Duration::from_secs(10), running.cancelled())
            .await
            .expect("the third start runs");
        assert_eq!(metrics.worker_restarts.load(Ordering::SeqCst), 2);
        assert!(!metrics.is_paused(), "serving again once it runs");
        stopping.cancel();
        supervised.await.unwrap();
        assert_eq!(
            starts.load(Ordering::SeqCst),
            3,
            "not restarted after stopping"
        );
    }
}
