//! What travels on the bus: the event envelope, Protobuf-encoded, with the
//! properties brokers and tools read without decoding it.

use prost::Message as _;

use crate::envelope::EnvelopeError;
use crate::pb;
use crate::store::RecordedEvent;
use crate::telemetry::trace::TraceParent;

/// The `content_type` of every message body: a [`pb::EventEnvelope`].
pub const CONTENT_TYPE: &str = "application/x-protobuf; proto=scaleout.v1.EventEnvelope";

/// A message as published and as delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusMessage {
    /// The event id: consumers and brokers deduplicate on it.
    pub message_id: String,
    /// The payload's Protobuf full name.
    pub event_type: String,
    /// `stream_type.event_type`: what topic bindings match.
    pub routing_key: String,
    pub correlation_id: String,
    /// W3C trace context: the command's, so one user action is one trace
    /// across services (see [`BusMessage::trace_of`]).
    pub traceparent: String,
    /// The encoded [`pb::EventEnvelope`].
    pub body: Vec<u8>,
}

impl BusMessage {
    /// The message that carries a recorded event.
    pub fn from_event(event: &RecordedEvent) -> Self {
        Self {
            message_id: event.event_id.to_string(),
            event_type: event.event_type.clone(),
            routing_key: format!("{}.{}", event.stream_type, event.event_type),
            correlation_id: event.metadata.correlation_id.to_string(),
            traceparent: Self::trace_of(event).to_string(),
            body: event.to_envelope().encode_to_vec(),
        }
    }

    /// The trace publishing `event` continues: the one stored with it, or
    /// for an event stored without one, the trace its correlation id names.
    pub fn trace_of(event: &RecordedEvent) -> TraceParent {
        event.metadata.trace.unwrap_or_else(|| {
            let (_, low) = event.event_id.as_u64_pair();
            TraceParent::of_correlation(event.metadata.correlation_id, low)
        })
    }

    /// Decodes the body; a body that does not decode is poison.
    pub fn envelope(&self) -> Result<pb::EventEnvelope, EnvelopeError> {
        pb::EventEnvelope::decode(self.body.as_slice())
            .map_err(|e| EnvelopeError::new(format!("undecodable body: {e}")))
    }
}
