//! What every application's query service reads off a request the same way.

use std::time::Duration;

use tokio::time::Instant;
use tonic::Request;

/// When a read that waits for a version stops waiting: a little before the
/// caller's deadline (so that the answer is the service's, with details,
/// not a bare DEADLINE_EXCEEDED), and after `max_wait` at most.
pub fn wait_deadline<T>(request: &Request<T>, max_wait: Duration) -> Instant {
    let wait = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|value| value.to_str().ok())
        .and_then(super::wire_status::parse_grpc_timeout)
        .map_or(max_wait, |timeout| {
            let margin = (timeout / 10).min(Duration::from_millis(50));
            timeout.saturating_sub(margin).min(max_wait)
        });
    Instant::now() + wait
}
