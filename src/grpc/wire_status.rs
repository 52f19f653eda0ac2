//! The statuses gRPC documents, where tonic would answer otherwise: a
//! request over the size limit is RESOURCE_EXHAUSTED (tonic: OUT_OF_RANGE),
//! one that does not decode (invalid UTF-8 in a string field, a frame cut
//! short, no message at all) is the caller's INVALID_ARGUMENT (tonic:
//! INTERNAL), and a call that runs out of time is DEADLINE_EXCEEDED (tonic's
//! server timeout: CANCELLED). A request that is not gRPC at all (its
//! content-type is not `application/grpc…`) is HTTP 415, as the gRPC HTTP/2
//! protocol asks, instead of being decoded as if it were.
//!
//! Both tonic answers are trailers-only responses, so the status is in the
//! headers and can be corrected before the response leaves.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tonic::Code;

/// Runs the call within the server's request timeout (or the caller's
/// `grpc-timeout`, if shorter), and corrects the status of what tonic
/// refused before it reached a handler.
pub async fn enforce(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    if request.uri().path() != METRICS_PATH && !is_grpc(&request) {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            "this is a gRPC server: send content-type application/grpc (Prometheus metrics are at /metrics)\n",
        )
            .into_response();
    }
    let timeout = request
        .headers()
        .get("grpc-timeout")
        .and_then(|value| value.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(timeout, |asked| asked.min(timeout));
    let Ok(mut response) = tokio::time::timeout(timeout, next.run(request)).await else {
        let status = tonic::Status::deadline_exceeded(format!(
            "no answer within {timeout:?} (the server's --request-timeout or the call's deadline)"
        ));
        return status.into_http::<axum::body::Body>();
    };
    let headers = response.headers_mut();
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32);
    let message = headers
        .get("grpc-message")
        .map(|v| percent_decoded(v.as_bytes()))
        .unwrap_or_default();
    let corrected = match code {
        Some(Code::OutOfRange)
            if message.starts_with("Error, decoded message length too large") =>
        {
            Some(Code::ResourceExhausted)
        }
        Some(Code::Internal) if UNDECODABLE.iter().any(|m| message.starts_with(m)) => {
            Some(Code::InvalidArgument)
        }
        _ => None,
    };
    if let Some(code) = corrected {
        headers.insert("grpc-status", HeaderValue::from(code as i32));
    }
    response
}

/// Where a server's Prometheus metrics are, the one path that is not gRPC.
pub const METRICS_PATH: &str = "/metrics";

/// How tonic words the INTERNAL it answers for a request that does not
/// decode: a bad message, a frame cut short, or no message at all.
const UNDECODABLE: [&str; 3] = [
    "failed to decode Protobuf message",
    "Unexpected EOF decoding stream",
    "Missing request message",
];

/// Whether the request says it is gRPC (`application/grpc`, optionally
/// `+proto` or parameters).
fn is_grpc(request: &Request) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value == "application/grpc"
                || value.starts_with("application/grpc+")
                || value.starts_with("application/grpc;")
        })
}

/// A `grpc-message` header's text (percent-encoded on the wire).
fn percent_decoded(value: &[u8]) -> String {
    let mut decoded = Vec::with_capacity(value.len());
    let mut bytes = value.iter().copied();
    while let Some(byte) = bytes.next() {
        let hex = |b: Option<u8>| b.and_then(|b| (b as char).to_digit(16));
        decoded.push(match byte {
            b'%' => match (hex(bytes.next()), hex(bytes.next())) {
                (Some(high), Some(low)) => (high * 16 + low) as u8,
                _ => b'%',
            },
            byte => byte,
        });
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Parses the `grpc-timeout` header: up to 8 digits and a unit.
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(percent_decoded(b"too%20large:%2050%25"), "too large: 50%");
    }

    #[test]
    fn grpc_timeouts_parse_by_unit() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("10Q"), None);
    }
}
