//! The values an append carries in and out.

use std::fmt;
use std::time::SystemTime;

use uuid::Uuid;

use super::StoreError;
use crate::telemetry::trace::TraceParent;

/// The version a stream must be at for an append to apply.
///
/// Versions count events: a stream's first event has version 1, and a stream
/// that does not exist is at version 0 (so `Exact(0)` means `NoStream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must have no events.
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream's last event must have exactly this version.
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream currently at `actual` satisfies this expectation.
    ///
    /// ```
    /// use scaleout::store::ExpectedVersion;
    ///
    /// assert!(ExpectedVersion::NoStream.accepts(0));
    /// assert!(ExpectedVersion::Exact(3).accepts(3));
    /// assert!(!ExpectedVersion::Exact(3).accepts(4));
    /// assert!(!ExpectedVersion::StreamExists.accepts(0));
    /// ```
    pub fn accepts(self, actual: u64) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual == 0,
            Self::StreamExists => actual > 0,
            Self::Exact(version) => actual == version,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no_stream"),
            Self::StreamExists => f.write_str("stream_exists"),
            Self::Exact(version) => write!(f, "{version}"),
        }
    }
}

/// A client's idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub Uuid);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A digest of what a request asked for, kept with its request id: the same
/// id sent again with a different request is a client bug, not a retry, and
/// answering it with the first request's result would silently drop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// SHA-256 of `kind` (e.g. the request message's full name) and the
    /// request's encoded content. Encode a decoded message again rather than
    /// hashing the bytes received, so that encodings of equal values (field
    /// order, explicit defaults, unknown fields) fingerprint alike.
    ///
    /// ```
    /// use scaleout::store::Fingerprint;
    ///
    /// let create = Fingerprint::of("bank.v1.DepositRequest", b"\x10\x05");
    /// assert_eq!(create, Fingerprint::of("bank.v1.DepositRequest", b"\x10\x05"));
    /// assert_ne!(create, Fingerprint::of("bank.v1.WithdrawRequest", b"\x10\x05"));
    /// ```
    pub fn of(kind: &str, content: &[u8]) -> Self {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update((kind.len() as u64).to_be_bytes());
        hasher.update(kind.as_bytes());
        hasher.update(content);
        Self(hasher.finalize().into())
    }
}

/// An idempotency key: the client's request id and the fingerprint of the
/// request it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestKey {
    pub id: RequestId,
    pub fingerprint: Fingerprint,
}

/// What a store recorded for a request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub result: AppendResult,
    /// `None` for a request recorded before fingerprints were kept; it
    /// matches any request on its stream, as every request did then.
    pub fingerprint: Option<Fingerprint>,
}

impl RecordedRequest {
    /// The first result when `key` repeats the recorded request on
    /// `stream_id`; [`StoreError::RequestIdReused`] when it asks for
    /// something else.
    pub fn replay(self, key: RequestKey, stream_id: &str) -> Result<AppendResult, StoreError> {
        let same_request = self.fingerprint.is_none_or(|f| f == key.fingerprint);
        if self.result.stream_id == stream_id && same_request {
            Ok(self.result)
        } else {
            Err(StoreError::RequestIdReused {
                request_id: key.id,
                first_stream: self.result.stream_id,
            })
        }
    }
}

/// An event about to be appended: its payload is already encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event_id: Uuid,
    /// The payload's Protobuf full name, e.g. `scaleout.v1.FileRenamed`.
    pub event_type: String,
    pub payload: Vec<u8>,
}

/// One or more events: an append of nothing is not representable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvents(Vec<NewEvent>);

/// The error of building [`NewEvents`] from an empty list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an append needs at least one event")]
pub struct EmptyAppend;

impl TryFrom<Vec<NewEvent>> for NewEvents {
    type Error = EmptyAppend;

    fn try_from(events: Vec<NewEvent>) -> Result<Self, EmptyAppend> {
        if events.is_empty() {
            Err(EmptyAppend)
        } else {
            Ok(Self(events))
        }
    }
}

impl NewEvents {
    pub fn as_slice(&self) -> &[NewEvent] {
        &self.0
    }

    pub fn len(&self) -> u64 {
        self.0.len() as u64
    }

    /// Always false; here because clippy asks for it beside `len`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What every event of one append shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMetadata {
    pub occurred_at: SystemTime,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    /// Who sent the command: its bearer token's subject; `None` where the
    /// server authenticates nobody.
    pub actor: Option<String>,
    /// The trace the command that recorded it belongs to, so that relaying
    /// and projecting it join that trace; `None` when nobody traced it.
    pub trace: Option<TraceParent>,
}

/// One atomic append to one stream.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub stream_id: String,
    /// The kind of aggregate the stream holds, e.g. `file`.
    pub stream_type: String,
    pub expected: ExpectedVersion,
    pub events: NewEvents,
    pub request_key: Option<RequestKey>,
    pub metadata: EventMetadata,
}

/// What an append wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendResult {
    pub stream_id: String,
    /// The stream's version after the append (its last event's version).
    pub version: u64,
    pub event_ids: Vec<Uuid>,
}

/// An append either wrote its events or found its request id already recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    Appended(AppendResult),
    /// The request id was recorded by an earlier append: nothing was written
    /// and this is that append's result.
    Replayed(AppendResult),
}

impl AppendOutcome {
    pub fn result(&self) -> &AppendResult {
        match self {
            Self::Appended(result) | Self::Replayed(result) => result,
        }
    }

    pub fn into_result(self) -> AppendResult {
        match self {
            Self::Appended(result) | Self::Replayed(result) => result,
        }
    }
}

/// An event as the store recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    /// The event's place in the whole log, from 1, in commit order: once a
    /// reader has seen a position, no event with a lower one can commit
    /// later (see [`super::EventStore::read_all`]).
    pub position: u64,
    pub stream_id: String,
    pub stream_type: String,
    pub version: u64,
    pub event_id: Uuid,
    pub event_type: String,
    pub payload: Vec<u8>,
    pub metadata: EventMetadata,
    pub request_id: Option<RequestId>,
}

/// An aggregate's state as of a version of its stream, encoded by the
/// aggregate, so that loading it needs only the events after `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub stream_id: String,
    pub version: u64,
    /// The encoding's own version (see
    /// [`crate::domain::Aggregate::SNAPSHOT_SHAPE`]): a snapshot of another
    /// shape is discarded, never decoded.
    pub shape: u32,
    pub state: Vec<u8>,
}

/// Which events a read of the whole log returns: an empty list does not
/// filter, a non-empty one keeps the events whose field is in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogFilter {
    /// Stream types, e.g. `file`.
    pub stream_types: Vec<String>,
    /// Event types (Protobuf full names), e.g. `scaleout.v1.FileRenamed`.
    pub event_types: Vec<String>,
}

impl LogFilter {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    pub fn is_all(&self) -> bool {
        self.stream_types.is_empty() && self.event_types.is_empty()
    }

    /// Whether an event of this stream type and event type passes.
    pub fn accepts(&self, stream_type: &str, event_type: &str) -> bool {
        let passes = |allowed: &[String], value: &str| {
            allowed.is_empty() || allowed.iter().any(|a| a == value)
        };
        passes(&self.stream_types, stream_type) && passes(&self.event_types, event_type)
    }
}

/// One page of the log, read in position order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogPage {
    /// The events that passed the filter, by position.
    pub events: Vec<RecordedEvent>,
    /// Where the next read continues: one past the last position this read
    /// covered, matching or not. A filtered page may be empty and still
    /// move this forward.
    pub next_position: u64,
    /// The last committed position when the page was read (0: empty log).
    pub head: u64,
}

/// The positions one page of the log may cover, decided once for every
/// backend: from `from_position` (0 reads as 1) up to the head, at most
/// `limit` positions unfiltered (positions are dense, so those hold the page)
/// and [`super::MAX_SCAN`] filtered. `None` when the page covers nothing.
pub(crate) fn page_window(
    from_position: u64,
    limit: usize,
    filter: &LogFilter,
    head: u64,
) -> (u64, Option<std::ops::RangeInclusive<u64>>) {
    let from = from_position.max(1);
    let width = if filter.is_all() {
        limit as u64
    } else {
        super::MAX_SCAN
    };
    let last = head.min(from.saturating_add(width.saturating_sub(1)));
    let range = (limit > 0 && from <= last).then_some(from..=last);
    (from, range)
}
