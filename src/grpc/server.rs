//! Serving a set of gRPC services with what every scaleout server carries.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use super::Health;
use super::auth::{AuthError, Authenticator, Capability, Gate};
use super::idle::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, Quiet, Watched};
use super::metrics::{ExtraMetrics, RpcMetrics, track};
use super::tls::ServerTls;
use super::wire_status::METRICS_PATH;
use crate::config::{ServerArgs, Unprotected};
use crate::pb;

/// gRPC services being gathered for one server, with their full names and
/// the capability each needs (see [`Services::requiring`]).
#[derive(Debug)]
pub struct Services {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    capabilities: HashMap<String, Capability>,
    requiring: Capability,
    /// The request size limit every service of this server applies.
    pub max_message_bytes: usize,
}

impl Services {
    pub fn new(max_message_bytes: usize) -> Self {
        Self {
            routes: RoutesBuilder::default(),
            names: Vec::new(),
            capabilities: HashMap::new(),
            requiring: Capability::Admin,
            max_message_bytes,
        }
    }

    /// Services added from now on need `capability`'s scope in a caller's
    /// token (where the server authenticates); until this is called, the
    /// admin scope.
    pub fn requiring(&mut self, capability: Capability) -> &mut Self {
        self.requiring = capability;
        self
    }

    /// The full names of the services added so far.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// Serves `service` (apply [`Services::max_message_bytes`] to it first).
    pub fn add<S>(&mut self, service: S) -> &mut Self
    where
        S: tonic::codegen::Service<tonic::codegen::http::Request<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.capabilities.insert(S::NAME.to_owned(), self.requiring);
        self.routes.add_service(service);
        self
    }
}

/// Why a server's routes could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("building reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
}

/// The Prometheus text exposition format's content type.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Health, reflection (v1 and v1alpha: grpcurl from PyPI speaks only
/// v1alpha) and Prometheus metrics at `/metrics` beside the given services.
/// Reflection lists those services, health and itself, from the kernel's
/// descriptors and the application's (`app_descriptors`), and also serves
/// the `google.rpc` error details, so that grpcurl prints them decoded;
/// `service_names` are the services health reports on.
pub async fn routes(
    services: Services,
    app_descriptors: &'static [u8],
    service_names: &[&str],
    extra_metrics: Option<ExtraMetrics>,
    args: &ServerArgs,
    stopping: CancellationToken,
) -> Result<(Routes, Health), RoutesError> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health::new(reporter, stopping.clone());
    // Nothing serves until its dependencies say so.
    for service in service_names.iter().chain(&[""]) {
        health.report(service, false).await;
    }
    // Only what this server serves: a listed service that answers
    // UNIMPLEMENTED would only mislead.
    let Services {
        routes: mut services,
        names: served,
        capabilities,
        ..
    } = services;
    let reflection = |itself: &str| {
        served
            .iter()
            .copied()
            .chain(["grpc.health.v1.Health", itself])
            .fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(app_descriptors)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET),
                |builder, name| builder.with_service_name(name),
            )
    };
    // The same request size limit as every other service.
    let limit = args.max_message_bytes;
    services
        .add_service(health_service.max_decoding_message_size(limit))
        .add_service(
            reflection("grpc.reflection.v1.ServerReflection")
                .build_v1()?
                .max_decoding_message_size(limit),
        )
        .add_service(
            reflection("grpc.reflection.v1alpha.ServerReflection")
                .build_v1alpha()?
                .max_decoding_message_size(limit),
        );
    let metrics = Arc::new(RpcMetrics::new(extra_metrics, app_descriptors));
    let scraped = Arc::clone(&metrics);
    let gate = match Authenticator::from_args(&args.auth)? {
        Some(authenticator) => {
            let authenticator = Arc::new(authenticator);
            tokio::spawn(
                Arc::clone(&authenticator).reload_on_change(health.clone(), stopping.child_token()),
            );
            let unprotected = [
                Unprotected::Health,
                Unprotected::Reflection,
                Unprotected::Metrics,
            ]
            .into_iter()
            .filter(|open| !args.auth.auth_protect.contains(open))
            .collect();
            Some(Arc::new(Gate::new(
                authenticator,
                capabilities,
                unprotected,
            )))
        }
        None => None,
    };
    let mut router = services.routes().into_axum_router().route(
        METRICS_PATH,
        axum::routing::get(move || {
            let metrics = Arc::clone(&scraped);
            async move { ([(CONTENT_TYPE, PROMETHEUS_TEXT)], metrics.render()) }
        }),
    );
    // Innermost: the checks below run first, then the token's.
    if let Some(gate) = gate {
        router = router.layer(axum::middleware::from_fn_with_state(
            gate,
            super::auth::authorize,
        ));
    }
    let router = router
        .layer(axum::middleware::from_fn_with_state(
            args.request_timeout,
            super::wire_status::enforce,
        ))
        // So that it counts the statuses as corrected.
        .layer(axum::middleware::from_fn_with_state(metrics, track))
        // Outermost: a refused call is traced too.
        .layer(axum::middleware::from_fn(super::request_span::trace));
    Ok((Routes::from(router), health))
}

/// Serves until `stopping` is cancelled, then: reports NOT_SERVING, waits
/// `shutdown_grace` so that load balancers stop sending, stops accepting and
/// lets requests in flight finish (each bounded by the request timeout).
/// With `tls`, every connection is a TLS one (see [`ServerTls`]).
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    health: Health,
    tls: Option<ServerTls>,
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
    let quiet = Quiet {
        handshake: args.handshake_timeout,
        idle: args.idle_timeout,
    };
    let router = Server::builder()
        // HTTP/1.1 too, for plain GETs such as a projector's /metrics.
        .accept_http1(true)
        .concurrency_limit_per_connection(args.max_concurrent_requests)
        .max_concurrent_streams(u32::try_from(args.max_concurrent_requests).ok())
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_routes(routes);
    match tls {
        None => {
            router
                .serve_with_incoming_shutdown(incoming(listener, quiet), drained)
                .await
        }
        Some(tls) => {
            let connections = tls.incoming(listener, quiet, args.handshake_timeout);
            router
                .serve_with_incoming_shutdown(connections, drained)
                .await
        }
    }
}

/// Accepted connections send small frames at once: with Nagle's algorithm a
/// response waits for the ACK of the previous one, which a client that
/// shares one connection between calls delays by up to its next request.
/// Each is closed once its peer has been silent too long (see `idle`).
fn incoming(
    listener: TcpListener,
    quiet: Quiet,
) -> impl Stream<Item = std::io::Result<Watched<TcpStream>>> {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(move |accepted| accepted.map(|stream| Watched::new(stream, quiet)))
}
