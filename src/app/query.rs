//! query-svc's wiring.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Application, Background, ServeError, Services, serve_then_drain};
use crate::config::ServerArgs;
use crate::documents::DocumentStore;
use crate::grpc::query_request::max_wait_within;
use crate::grpc::server;
use crate::projection::rebuild::register_until;
use crate::query::Queries;

/// What query-svc runs on.
#[derive(Debug, Clone)]
pub struct QueryService {
    pub app: Arc<dyn Application>,
    pub documents: Arc<dyn DocumentStore>,
    /// The longest a query waits for `min_version`, whatever the deadline.
    pub max_wait: std::time::Duration,
    pub server: ServerArgs,
}

/// query-svc: the application's query services over the document store, with health
/// following the store, until `stopping` is cancelled.
pub async fn run_query_service(
    listener: TcpListener,
    service: QueryService,
    stopping: CancellationToken,
) -> Result<(), ServeError> {
    let QueryService {
        app,
        documents,
        max_wait,
        server: server_args,
    } = service;
    let mut services = Services::new(server_args.max_message_bytes);
    services.requiring(crate::grpc::auth::Capability::Queries);
    app.query_services(
        Queries::new(Arc::clone(&documents)),
        max_wait_within(max_wait, server_args.request_timeout),
        &mut services,
    );
    let queries = services.names().to_vec();
    let (routes, health) = server::routes(
        services,
        app.file_descriptor_set(),
        &queries,
        None,
        &server_args,
        stopping.clone(),
    )
    .await?;
    let mut tasks = Background::default();
    // Whichever of query-svc and the projectors starts first registers the
    // application's read models, so a new one reads as being built.
    let (registered, registering) = (Arc::clone(&documents), stopping.child_token());
    tasks.spawn("registering read models", async move {
        register_until(registered.as_ref(), app.as_ref(), &registering).await;
    });
    tasks.spawn(
        "health",
        health.clone().follow(
            queries
                .iter()
                .map(|name| (*name).to_owned())
                .chain([String::new()])
                .collect(),
            "document store",
            server_args.health_interval,
            move || {
                let documents = Arc::clone(&documents);
                async move { documents.ping().await }
            },
        ),
    );
    serve_then_drain(listener, routes, health, &server_args, stopping, tasks).await
}
