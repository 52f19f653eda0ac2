//! query-svc's wiring.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;

use super::{ServeError, serve_then_drain};
use crate::config::ServerArgs;
use crate::documents::DocumentStore;
use crate::grpc::{QueryApi, server};
use crate::query::Queries;

/// What query-svc runs on.
#[derive(Debug, Clone)]
pub struct QueryService {
    pub documents: Arc<dyn DocumentStore>,
    /// The longest a query waits for `min_version`, whatever the deadline.
    pub max_wait: std::time::Duration,
    pub server: ServerArgs,
}

/// query-svc: the query service over the document store, with health
/// following the store, until `stopping` is cancelled.
pub async fn run_query_service(
    listener: TcpListener,
    service: QueryService,
    stopping: CancellationToken,
) -> Result<(), ServeError> {
    use crate::pb::query_service_server::SERVICE_NAME as QUERY_SERVICE;
    let QueryService {
        documents,
        max_wait,
        server: server_args,
    } = service;
    let api = QueryApi::new(Queries::new(Arc::clone(&documents)), max_wait);
    let mut services = RoutesBuilder::default();
    services.add_service(api.into_service(server_args.max_message_bytes));
    let (routes, health) = server::routes(
        services,
        &[QUERY_SERVICE],
        &[QUERY_SERVICE],
        None,
        &server_args,
        stopping.clone(),
    )
    .await?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(health.clone().follow(
        vec![QUERY_SERVICE.to_owned(), String::new()],
        "document store",
        server_args.health_interval,
        move || {
            let documents = Arc::clone(&documents);
            async move { documents.ping().await }
        },
    ));
    serve_then_drain(listener, routes, health, &server_args, stopping, tasks).await
}
