//! What every application's command service reads off a request and gives
//! back, the same way: the correlation id, the idempotency key, the
//! expected version, and the result.

use tonic::Request;
use uuid::Uuid;

use super::auth::Caller;
use crate::command::Origin;
use crate::pb;
use crate::store::{AppendResult, ExpectedVersion, Fingerprint, RequestId, RequestKey};
use crate::telemetry::trace::{TRACEPARENT, TraceParent};

/// The metadata key a caller may set to tie its commands together.
pub const CORRELATION_ID_HEADER: &str = "x-correlation-id";

/// Where a command comes from: the caller's correlation id, if it sent a
/// valid one, who the caller is, if the server authenticated it, and the
/// trace it is part of (the request's span, or the caller's `traceparent`
/// where this process exports no traces). Call it in the handler, under the
/// request's span.
pub fn origin<T>(request: &Request<T>) -> Origin {
    Origin {
        trace: TraceParent::of_span(&tracing::Span::current()).or_else(|| {
            request
                .metadata()
                .get(TRACEPARENT)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse().ok())
        }),
        correlation_id: request
            .metadata()
            .get(CORRELATION_ID_HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| Uuid::parse_str(value).ok()),
        actor: request
            .extensions()
            .get::<Caller>()
            .map(|caller| caller.subject.clone()),
    }
}

/// The request's idempotency key: its `request_id`, when set, and a
/// fingerprint of the whole request, so that the id reused for a different
/// request is refused instead of answered with the first one's result.
pub fn request_key<M: prost::Name>(
    body: &M,
    request_id: &str,
) -> Result<Option<RequestKey>, String> {
    if request_id.is_empty() {
        return Ok(None);
    }
    let id = Uuid::parse_str(request_id).map_err(|e| format!("must be a UUID: {e}"))?;
    if id.is_nil() {
        // An id left at its type's zero value: every such client would
        // share it, and all but the first be refused or answered as a repeat.
        return Err("must not be the nil UUID: each request needs an id of its own".into());
    }
    Ok(Some(RequestKey {
        id: RequestId(id),
        fingerprint: Fingerprint::of(&M::full_name(), &body.encode_to_vec()),
    }))
}

/// `None` (unset or `any`) lets the server decide on the latest state.
pub fn expected_version(value: Option<pb::ExpectedVersion>) -> Option<ExpectedVersion> {
    use pb::expected_version::Kind;
    match value?.kind? {
        Kind::Any(()) => None,
        Kind::NoStream(()) => Some(ExpectedVersion::NoStream),
        Kind::StreamExists(()) => Some(ExpectedVersion::StreamExists),
        Kind::Exact(version) => Some(ExpectedVersion::Exact(version)),
    }
}

/// What a command wrote, as every command response carries it.
pub fn command_result(result: AppendResult) -> pb::CommandResult {
    pb::CommandResult {
        stream_id: result.stream_id,
        version: result.version,
        event_ids: result.event_ids.iter().map(Uuid::to_string).collect(),
    }
}
