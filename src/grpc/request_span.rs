//! One span per call, continuing the caller's trace: everything the call
//! does (deciding, appending, waiting for a view) is recorded under it, and
//! every log line it writes names it.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument as _;
use tracing::field::Empty;

use super::wire_status::METRICS_PATH;
use crate::telemetry::trace::{TRACEPARENT, TraceParent, exporting};

/// Health checks come every few seconds from every load balancer: traced,
/// they would bury the calls people look for.
const UNTRACED: &str = "/grpc.health.v1.Health/";

/// Runs the call under a `request` span whose parent is the caller's
/// `traceparent`, when it sent a valid one.
pub async fn trace(request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path == METRICS_PATH || path.starts_with(UNTRACED) {
        return next.run(request).await;
    }
    let span = tracing::info_span!(
        "request",
        otel.name = path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.grpc.status_code = Empty,
        otel.status_code = Empty,
    );
    if exporting()
        && let Some(parent) = request
            .headers()
            .get(TRACEPARENT)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<TraceParent>().ok())
    {
        parent.adopt(&span);
    }
    let response = next.run(request).instrument(span.clone()).await;
    // A failed call answers with its status in the headers; a successful
    // one sends it in the trailers, after this.
    if let Some(code) = response
        .headers()
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
    {
        span.record("rpc.grpc.status_code", code);
        if code != 0 {
            span.record("otel.status_code", "ERROR");
        }
    }
    response
}
