//! Conversion between recorded events and their wire envelope
//! ([`pb::EventEnvelope`]), used at rest by the embedded store and on the bus.

use uuid::Uuid;

use crate::pb;
use crate::store::{EventMetadata, RecordedEvent, RequestId};

/// An envelope that does not hold a valid event.
#[derive(Debug, thiserror::Error)]
#[error("invalid event envelope: {0}")]
pub struct EnvelopeError(String);

impl EnvelopeError {
    pub(crate) fn new(reason: String) -> Self {
        Self(reason)
    }
}

impl RecordedEvent {
    /// The envelope this event travels in.
    pub fn to_envelope(&self) -> pb::EventEnvelope {
        pb::EventEnvelope {
            event_id: self.event_id.to_string(),
            stream_id: self.stream_id.clone(),
            stream_type: self.stream_type.clone(),
            version: self.version,
            occurred_at: Some(self.metadata.occurred_at.into()),
            correlation_id: self.metadata.correlation_id.to_string(),
            causation_id: self.metadata.causation_id.to_string(),
            request_id: self.request_id.map(|id| id.to_string()).unwrap_or_default(),
            event_type: self.event_type.clone(),
            payload: self.payload.clone(),
            actor: self.metadata.actor.clone().unwrap_or_default(),
            traceparent: self
                .metadata
                .trace
                .map(|trace| trace.to_string())
                .unwrap_or_default(),
        }
    }

    /// Reads an envelope back; `position` is not part of the envelope.
    pub fn from_envelope(
        position: u64,
        envelope: pb::EventEnvelope,
    ) -> Result<Self, EnvelopeError> {
        let uuid = |field: &str, value: &str| {
            Uuid::parse_str(value).map_err(|e| EnvelopeError(format!("{field} {value:?}: {e}")))
        };
        let occurred_at = envelope
            .occurred_at
            .ok_or_else(|| EnvelopeError("occurred_at is missing".into()))?
            .try_into()
            .map_err(|e| EnvelopeError(format!("occurred_at: {e}")))?;
        let request_id = match envelope.request_id.as_str() {
            "" => None,
            id => Some(RequestId(uuid("request_id", id)?)),
        };
        Ok(Self {
            position,
            event_id: uuid("event_id", &envelope.event_id)?,
            metadata: EventMetadata {
                occurred_at,
                correlation_id: uuid("correlation_id", &envelope.correlation_id)?,
                causation_id: uuid("causation_id", &envelope.causation_id)?,
                actor: Some(envelope.actor).filter(|actor| !actor.is_empty()),
                // A trace context is a hint for observers: one that does
                // not read is dropped, never the event.
                trace: envelope.traceparent.parse().ok(),
            },
            request_id,
            stream_id: envelope.stream_id,
            stream_type: envelope.stream_type,
            version: envelope.version,
            event_type: envelope.event_type,
            payload: envelope.payload,
        })
    }
}
