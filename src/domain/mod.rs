//! What an application's domain is made of: pure `decide` and `apply`, no
//! I/O, no clocks.
//!
//! An [`Aggregate`] decides a command against its state and returns events
//! (or a [`DomainError`]); [`Aggregate::apply`] folds an event into the state
//! and never fails. Commands carry validated [`values`], so a decision never
//! has to re-check its input's shape. Events are generated Protobuf messages
//! gathered into an enum by [`domain_event!`](crate::domain_event), so their
//! type names are the stable Protobuf full names. [`testing`] gives
//! aggregate tests their given / when / then.

mod event;
pub mod testing;
mod upcast;
pub mod values;

#[doc(hidden)]
pub use self::event::is_type;
pub use self::event::{DomainEvent, UnknownEvent};
pub use self::upcast::{Upcast, Upcasters, part_id};

/// A consistency boundary: one stream of events, one state folded from them.
pub trait Aggregate: Default + Send + Sync + 'static {
    /// The stream type, also the stream id's prefix (`file-<id>`).
    const STREAM_TYPE: &'static str;
    type Command: Clone + Send + Sync + 'static;
    type Event: DomainEvent;

    /// Decides what `command` does to the aggregate `id` in this state.
    fn decide(&self, id: &str, command: &Self::Command) -> Result<Vec<Self::Event>, DomainError>;

    /// Folds one event into the state.
    fn apply(&mut self, event: Self::Event);

    /// The stream that holds the aggregate `id`.
    fn stream_id(id: &str) -> String {
        format!("{}-{id}", Self::STREAM_TYPE)
    }

    /// The version of [`Aggregate::snapshot`]'s encoding: change it whenever
    /// the encoding changes, and snapshots of the old shape are discarded
    /// (the stream is folded from its start instead), never misread.
    const SNAPSHOT_SHAPE: u32 = 1;

    /// The state, encoded for a snapshot; `None` (the default) takes none,
    /// for aggregates whose state is small or cheap to fold.
    fn snapshot(&self) -> Option<Vec<u8>> {
        None
    }

    /// A state from [`Aggregate::snapshot`]'s bytes; `None` when they do not
    /// decode, and the stream is folded from its start.
    fn from_snapshot(_state: &[u8]) -> Option<Self> {
        None
    }
}

/// The stream and event types an application's aggregates store: what a
/// read API filter may name (anything else is a caller's typo, refused
/// rather than silently matching nothing) and what a projector can take
/// (anything else is poison); and how events stored in an older shape read
/// as the current ones.
#[derive(Debug, Clone, Default)]
pub struct KnownTypes {
    pub stream_types: Vec<String>,
    /// The current event types.
    pub event_types: Vec<String>,
    pub upcasters: Upcasters,
}

impl KnownTypes {
    /// These types and those of the aggregate `A`: an application lists
    /// every aggregate it has, e.g.
    /// `KnownTypes::default().with::<File>().with::<Counter>()`.
    pub fn with<A: Aggregate>(mut self) -> Self {
        self.stream_types.push(A::STREAM_TYPE.to_owned());
        self.event_types.extend(A::Event::types());
        self
    }

    /// Reads stored `Old` events as the current events `convert` makes of
    /// them (see [`Upcasters::upcast`]).
    pub fn upcast<Old, E>(mut self, convert: fn(Old) -> Vec<E>) -> Self
    where
        Old: prost::Message + prost::Name + Default + 'static,
        E: DomainEvent,
    {
        self.upcasters = self.upcasters.upcast(convert);
        self
    }

    /// Whether stored events of `event_type` can be read: a current type, or
    /// an old one with an upcaster.
    pub fn stored(&self, event_type: &str) -> bool {
        self.event_types.iter().any(|t| t == event_type) || self.upcasters.reads(event_type)
    }
}

/// Why an aggregate refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("{kind} {id} does not exist")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} {id} already exists")]
    AlreadyExists { kind: &'static str, id: String },
    /// The command is well-formed but the aggregate's state forbids it.
    #[error("{description}")]
    Precondition {
        /// A short machine-readable name of the rule, e.g. `FILE_DELETED`.
        rule: &'static str,
        /// The aggregate the rule is about, e.g. `file/7d1c`.
        subject: String,
        description: String,
    },
}
