//! Serving a set of gRPC services with what every scaleout server carries.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use std::sync::Arc;

use super::Health;
use super::metrics::{ExtraMetrics, RpcMetrics, track};
use crate::config::ServerArgs;
use crate::pb;

/// Health, reflection (v1 and v1alpha: grpcurl from PyPI speaks only
/// v1alpha) and Prometheus metrics at `/metrics` beside the given services'
/// routes. Reflection lists `served` (the full names of what `services`
/// holds), health and itself, and also serves the `google.rpc` error
/// details, so that grpcurl prints them decoded; `service_names` are the
/// services health reports on.
pub async fn routes(
    services: RoutesBuilder,
    served: &[&str],
    service_names: &[&str],
    extra_metrics: Option<ExtraMetrics>,
    args: &ServerArgs,
    stopping: CancellationToken,
) -> Result<(Routes, Health), tonic_reflection::server::Error> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health::new(reporter, stopping);
    // Nothing serves until its dependencies say so.
    for service in service_names.iter().chain(&[""]) {
        health.report(service, false).await;
    }
    // Only what this server serves: a listed service that answers
    // UNIMPLEMENTED would only mislead.
    let reflection = |itself: &str| {
        served
            .iter()
            .copied()
            .chain(["grpc.health.v1.Health", itself])
            .fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET),
                |builder, name| builder.with_service_name(name),
            )
    };
    let mut routes = services;
    routes
        .add_service(health_service)
        .add_service(reflection("grpc.reflection.v1.ServerReflection").build_v1()?)
        .add_service(reflection("grpc.reflection.v1alpha.ServerReflection").build_v1alpha()?);
    let metrics = Arc::new(RpcMetrics::new(extra_metrics));
    let scraped = Arc::clone(&metrics);
    let router = routes
        .routes()
        .into_axum_router()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = Arc::clone(&scraped);
                async move { metrics.render() }
            }),
        )
        .layer(axum::middleware::from_fn_with_state(
            args.request_timeout,
            super::wire_status::enforce,
        ))
        // Outermost, so that it counts the statuses as corrected.
        .layer(axum::middleware::from_fn_with_state(metrics, track));
    Ok((Routes::from(router), health))
}

/// Serves until `stopping` is cancelled, then: reports NOT_SERVING, waits
/// `shutdown_grace` so that load balancers stop sending, stops accepting and
/// lets requests in flight finish (each bounded by the request timeout).
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    health: Health,
    args: &ServerArgs,
    stopping: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let grace = args.shutdown_grace;
    let drained = async move {
        stopping.cancelled().await;
        health.stop().await;
        tracing::info!(?grace, "shutting down: not serving, draining");
        tokio::time::sleep(grace).await;
    };
    Server::builder()
        // HTTP/1.1 too, for plain GETs such as a projector's /metrics.
        .accept_http1(true)
        .concurrency_limit_per_connection(args.max_concurrent_requests)
        .max_concurrent_streams(u32::try_from(args.max_concurrent_requests).ok())
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming(listener), drained)
        .await
}

/// Accepted connections send small frames at once: with Nagle's algorithm a
/// response waits for the ACK of the previous one, which a client that
/// shares one connection between calls delays by up to its next request.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}
