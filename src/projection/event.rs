//! What a projection sees: a delivered envelope, checked against the types
//! the application knows and read in the current shape (see
//! [`crate::domain::Upcasters`]), its payload decoded only by the
//! projections that read its stream type.

use std::time::SystemTime;

use uuid::Uuid;

use crate::bus::BusMessage;
use crate::domain::{DomainEvent, KnownTypes, Upcast, part_id};
use crate::store::RecordedEvent;
use crate::telemetry::trace::TraceParent;

/// An event on its way through the runtime, its payload still encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectedEvent {
    pub event_id: Uuid,
    pub stream_id: String,
    /// The kind of aggregate the stream holds, e.g. `file`.
    pub stream_type: String,
    pub version: u64,
    pub occurred_at: SystemTime,
    /// What the stored event reads as now, still encoded: itself, or the
    /// current events its upcaster makes of it (several for an event split
    /// up), all at this version.
    pub parts: Vec<Upcast>,
    /// The trace its projection continues: the one stored with it, then
    /// (where traces are exported) the span projecting it, which the
    /// document writes it goes into continue.
    pub trace: Option<TraceParent>,
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

    /// An event read from the log, checked against the known types and
    /// upcast; its payload moves over, not copied.
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
        let at = match event.position {
            0 => format!("stream {} version {}", event.stream_id, event.version),
            position => format!(
                "stream {} version {} (log position {position})",
                event.stream_id, event.version
            ),
        };
        let parts = known
            .upcasters
            .read(event.event_type, event.payload)
            .map_err(|e| Poison(format!("unreadable event at {at}: {e}")))?;
        if let Some(part) = parts
            .iter()
            .find(|part| !known.event_types.contains(&part.event_type))
        {
            return Err(Poison(format!(
                "unknown event at {at}: {} is not an event of this application",
                part.event_type
            )));
        }
        Ok(Self {
            event_id: event.event_id,
            stream_id: event.stream_id,
            stream_type: event.stream_type,
            version: event.version,
            occurred_at: event.metadata.occurred_at,
            parts,
            trace: event.metadata.trace,
        })
    }

    /// The events it reads as, typed as `E`, when it is of `stream_type`;
    /// none when it belongs to another stream type.
    pub fn typed<E: DomainEvent>(&self, stream_type: &str) -> Result<Vec<Event<E>>, Poison> {
        if self.stream_type != stream_type {
            return Ok(Vec::new());
        }
        self.parts
            .iter()
            .enumerate()
            .map(|(index, part)| {
                let payload = E::decode(&part.event_type, &part.payload).map_err(|e| {
                    Poison(format!(
                        "unknown event at stream {} version {}: {e}",
                        self.stream_id, self.version
                    ))
                })?;
                Ok(Event {
                    event_id: part_id(self.event_id, index),
                    stream_id: self.stream_id.clone(),
                    version: self.version,
                    occurred_at: self.occurred_at,
                    payload,
                })
            })
            .collect()
    }
}
