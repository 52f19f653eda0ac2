//! What a projection sees: a delivered envelope, decoded and typed.

use std::time::SystemTime;

use uuid::Uuid;

use crate::bus::BusMessage;
use crate::domain::{CounterEvent, DomainEvent, FileEvent};
use crate::store::RecordedEvent;

/// The payload of any event of the reference domain.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    File(FileEvent),
    Counter(CounterEvent),
}

/// A decoded event with where it sits in its stream.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectedEvent {
    pub event_id: Uuid,
    pub stream_id: String,
    pub version: u64,
    pub occurred_at: SystemTime,
    pub payload: Payload,
}

/// Why a message can never be projected: it is parked at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Poison(pub String);

impl ProjectedEvent {
    /// Decodes a delivered message; anything that does not decode is poison.
    pub fn decode(message: &BusMessage) -> Result<Self, Poison> {
        Self::from_envelope(&message.body)
    }

    /// Decodes an encoded [`crate::pb::EventEnvelope`].
    pub fn from_envelope(bytes: &[u8]) -> Result<Self, Poison> {
        let envelope = <crate::pb::EventEnvelope as prost::Message>::decode(bytes)
            .map_err(|e| Poison(format!("undecodable body: {e}")))?;
        let recorded =
            RecordedEvent::from_envelope(0, envelope).map_err(|e| Poison(e.to_string()))?;
        Self::from_recorded(&recorded)
    }

    /// Types an event read from the log.
    pub fn from_recorded(event: &RecordedEvent) -> Result<Self, Poison> {
        if event.version == 0 {
            return Err(Poison("version 0: versions start at 1".into()));
        }
        let (event_type, payload) = (&event.event_type, &event.payload);
        let payload = match event.stream_type.as_str() {
            "file" => FileEvent::decode(event_type, payload).map(Payload::File),
            "counter" => CounterEvent::decode(event_type, payload).map(Payload::Counter),
            other => {
                return Err(Poison(format!(
                    "unknown stream type {other:?} ({event_type})"
                )));
            }
        }
        .map_err(|e| Poison(format!("unknown event: {e}")))?;
        Ok(Self {
            event_id: event.event_id,
            stream_id: event.stream_id.clone(),
            version: event.version,
            occurred_at: event.metadata.occurred_at,
            payload,
        })
    }
}
