//! Prometheus metrics at `/metrics` on every server's gRPC port: requests by
//! method and status code, and the time they took; plus whatever the
//! service adds (a projector's counters, the relay's state).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// More metrics text a service appends to the page.
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Calls by (method path, gRPC code): count and total seconds.
#[derive(Default)]
pub struct RpcMetrics {
    calls: Mutex<BTreeMap<(String, String), (u64, f64)>>,
    extra: Option<ExtraMetrics>,
}

impl std::fmt::Debug for RpcMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcMetrics").finish_non_exhaustive()
    }
}

impl RpcMetrics {
    pub fn new(extra: Option<ExtraMetrics>) -> Self {
        Self {
            calls: Mutex::default(),
            extra,
        }
    }

    fn observe(&self, method: String, code: String, seconds: f64) {
        let mut calls = self
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = calls.entry((method, code)).or_default();
        entry.0 += 1;
        entry.1 += seconds;
    }

    /// The page, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let calls = self
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut out = String::from(
            "# HELP scaleout_grpc_requests_total gRPC requests by method and status code.\n\
             # TYPE scaleout_grpc_requests_total counter\n",
        );
        for ((method, code), (count, _)) in calls.iter() {
            let _ = writeln!(
                out,
                "scaleout_grpc_requests_total{{method=\"{method}\",code=\"{code}\"}} {count}"
            );
        }
        out.push_str(
            "# HELP scaleout_grpc_request_seconds_total Time spent serving gRPC requests.\n\
             # TYPE scaleout_grpc_request_seconds_total counter\n",
        );
        for ((method, code), (_, seconds)) in calls.iter() {
            let _ = writeln!(
                out,
                "scaleout_grpc_request_seconds_total{{method=\"{method}\",code=\"{code}\"}} {seconds:.6}"
            );
        }
        if let Some(extra) = &self.extra {
            out.push_str(&extra());
        }
        out
    }
}

/// Counts every request but the scrape itself. A unary gRPC error is a
/// trailers-only response, so its status is in the headers; a response
/// without one succeeded.
pub async fn track(
    State(metrics): State<Arc<RpcMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.uri().path().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    if method != "/metrics" {
        let code = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map_or(tonic::Code::Ok, tonic::Code::from_i32);
        metrics.observe(method, format!("{code:?}"), started.elapsed().as_secs_f64());
    }
    response
}
