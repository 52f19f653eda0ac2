//! Prometheus metrics at `/metrics` on every server's gRPC port: requests by
//! method and status code, and the time they took; plus whatever the
//! service adds (a projector's counters, the relay's state).
//!
//! The label set is closed: a method is labelled by name only if the
//! contract defines it (the kernel's and the application's services,
//! health, reflection), and any
//! other path a client sends counts as `other`, so no client can grow the
//! page or break its syntax.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// More metrics text a service appends to the page.
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// The label of a path the contract does not define.
const OTHER: &str = "other";

/// Calls by (method, gRPC code): count and total seconds. At most one row
/// per known method (plus `other`) and code, so the map is bounded.
pub struct RpcMetrics {
    calls: Mutex<BTreeMap<(String, i32), (u64, f64)>>,
    known: HashSet<String>,
    extra: Option<ExtraMetrics>,
}

impl std::fmt::Debug for RpcMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcMetrics").finish_non_exhaustive()
    }
}

impl RpcMetrics {
    /// Metrics of a server of the kernel's services and those described by
    /// `app_descriptors` (an encoded `FileDescriptorSet`).
    pub fn new(extra: Option<ExtraMetrics>, app_descriptors: &[u8]) -> Self {
        Self {
            calls: Mutex::default(),
            known: known_methods(app_descriptors),
            extra,
        }
    }

    /// Counts one call of the request path `path`.
    fn observe(&self, path: &str, code: tonic::Code, seconds: f64) {
        let method = if self.known.contains(path) {
            path
        } else {
            OTHER
        };
        let mut calls = self
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = calls.entry((method.to_owned(), code as i32)).or_default();
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
            let code = tonic::Code::from_i32(*code);
            let _ = writeln!(
                out,
                "scaleout_grpc_requests_total{{method=\"{method}\",code=\"{code:?}\"}} {count}"
            );
        }
        out.push_str(
            "# HELP scaleout_grpc_request_seconds_total Time spent serving gRPC requests.\n\
             # TYPE scaleout_grpc_request_seconds_total counter\n",
        );
        for ((method, code), (_, seconds)) in calls.iter() {
            let code = tonic::Code::from_i32(*code);
            let _ = writeln!(
                out,
                "scaleout_grpc_request_seconds_total{{method=\"{method}\",code=\"{code:?}\"}} {seconds:.6}"
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
    let path = request.uri().path().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    if path != "/metrics" {
        let code = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map_or(tonic::Code::Ok, tonic::Code::from_i32);
        metrics.observe(&path, code, started.elapsed().as_secs_f64());
    }
    response
}

/// Every `/package.Service/Method` path the contract defines: the kernel's
/// and the application's services, health and reflection (identifiers
/// only, so nothing to escape).
fn known_methods(app_descriptors: &[u8]) -> HashSet<String> {
    let mut known: HashSet<String> = [
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ]
    .map(str::to_owned)
    .into();
    for encoded in [
        crate::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        app_descriptors,
    ] {
        let Ok(set) = <prost_types::FileDescriptorSet as prost::Message>::decode(encoded) else {
            continue;
        };
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    known.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    known
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_paths_share_one_label_and_cannot_break_the_page() {
        let metrics = RpcMetrics::new(None, &[]);
        metrics.observe("/scaleout.v1.ReadService/ReadAll", tonic::Code::Ok, 0.001);
        for n in 0..10_000 {
            metrics.observe(&format!("/random/{n}\"\\"), tonic::Code::Unimplemented, 0.0);
        }
        let page = metrics.render();
        let rows: Vec<&str> = page.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(rows.len(), 4, "{page}");
        assert!(page.contains(
            "scaleout_grpc_requests_total{method=\"/scaleout.v1.ReadService/ReadAll\",code=\"Ok\"} 1"
        ));
        assert!(page.contains(
            "scaleout_grpc_requests_total{method=\"other\",code=\"Unimplemented\"} 10000"
        ));
        assert!(!page.contains('\\'), "nothing a client sent is on the page");
    }

    #[test]
    fn the_contract_names_every_served_method() {
        let known = known_methods(&[]);
        for method in [
            "/scaleout.v1.ReadService/Subscribe",
            "/scaleout.v1.AdminService/ListDeadLetters",
            "/grpc.health.v1.Health/Check",
        ] {
            assert!(known.contains(method), "{method}");
        }
    }
}
