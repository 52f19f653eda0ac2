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
        .map_or(max_wait, |timeout| answered_within(timeout).min(max_wait));
    Instant::now() + wait
}

/// The longest a read may wait on a server that ends every request after
/// `request_timeout`: `max_wait`, or less, so that a read given up on still
/// answers with the service's status before the server's timeout cuts it.
/// Says so in the log when it cuts, as the operator asked for longer.
pub fn max_wait_within(max_wait: Duration, request_timeout: Duration) -> Duration {
    let within = answered_within(request_timeout);
    if max_wait > within {
        tracing::warn!(
            ?max_wait,
            ?request_timeout,
            "queries wait at most {within:?}, to answer before the request timeout"
        );
    }
    max_wait.min(within)
}

/// How long a wait may last to leave time to answer before `timeout`.
fn answered_within(timeout: Duration) -> Duration {
    let margin = (timeout / 10).min(Duration::from_millis(50));
    timeout.saturating_sub(margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_ends_before_the_server_would_cut_the_request() {
        let second = Duration::from_secs(1);
        assert_eq!(
            max_wait_within(10 * second, 10 * second),
            Duration::from_millis(9_950)
        );
        assert_eq!(max_wait_within(5 * second, 10 * second), 5 * second);
        assert_eq!(
            max_wait_within(second, Duration::from_millis(100)),
            Duration::from_millis(90)
        );
    }
}
