//! What a projection sees: a delivered envelope, checked against the types
//! the application knows, its payload decoded only by the projections that
//! read its stream type.

use std::time::SystemTime;

use uuid::Uuid;

use crate::bus::BusMessage;
use crate::domain::{DomainEvent, KnownTypes};
use crate::store::RecordedEvent;

/// An event on its way through the runtime, its payload still encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectedEvent {
    pub event_id: Uuid,
    pub stream_id: String,
    /// The kind of aggregate the stream holds, e.g. `file`.
    pub stream_type: String,
    pub version: u64,
    pub occurred_at: SystemTime,
    /// The payload's Protobuf full name.
    pub event_type: String,
    pub payload: Vec<u8>,
}

/// An event decoded for a projection: what it is, and where it sits in its
/// stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<E> {
    pub event_id: Uuid,
    pub stream_id: String,
    pub version: u64,
    pub occurred_at: SystemTime,
    pub payload: E,
}

/// Why a message can never be projected: it is parked at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Poison(pub String);

impl ProjectedEvent {
    /// Decodes a delivered message; anything that does not decode, or that
    /// the application does not know, is poison.
    pub fn decode(message: &BusMessage, known: &KnownTypes) -> Result<Self, Poison> {
        let envelope = <crate::pb::EventEnvelope as prost::Message>::decode(&*message.body)
            .map_err(|e| Poison(format!("undecodable body: {e}")))?;
        let recorded =
            RecordedEvent::from_envelope(0, envelope).map_err(|e| Poison(e.to_string()))?;
        Self::from_recorded(recorded, known)
    }

    /// An event read from the log, checked against the known types; its
    /// payload moves over, not copied.
    pub fn from_recorded(event: RecordedEvent, known: &KnownTypes) -> Result<Self, Poison> {
        if event.version == 0 {
            return Err(Poison("version 0: versions start at 1".into()));
        }
        let (stream_type, event_type) = (&event.stream_type, &event.event_type);
        if !known.stream_types.contains(stream_type) {
            return Err(Poison(format!(
                "unknown stream type {stream_type:?} ({event_type})"
            )));
        }
        if !known.event_types.contains(event_type) {
            return Err(Poison(format!(
                "unknown event: cannot decode event {event_type}: not an event of this application"
            )));
        }
        Ok(Self {
            event_id: event.event_id,
            stream_id: event.stream_id,
            stream_type: event.stream_type,
            version: event.version,
            occurred_at: event.metadata.occurred_at,
            event_type: event.event_type,
            payload: event.payload,
        })
    }

    /// The event typed as `E`, when it is of `stream_type`; `Ok(None)` when
    /// it belongs to another stream type.
    pub fn typed<E: DomainEvent>(&self, stream_type: &str) -> Result<Option<Event<E>>, Poison> {
        if self.stream_type != stream_type {
            return Ok(None);
        }
        let payload = E::decode(&self.event_type, &self.payload)
            .map_err(|e| Poison(format!("unknown event: {e}")))?;
        Ok(Some(Event {
            event_id: self.event_id,
            stream_id: self.stream_id.clone(),
            version: self.version,
            occurred_at: self.occurred_at,
            payload,
        }))
    }
}
