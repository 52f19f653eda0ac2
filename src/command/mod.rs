//! Command handling: load an aggregate, decide, append, and retry only what is
//! safe to retry.
//!
//! A command that names an exact expected version was decided by a user on a
//! state they saw; if the stream moved on, the user must look again, so it is
//! never retried. Any other command is the server's to decide: when another
//! writer gets in between load and append, it is decided again on the fresh
//! state, a bounded number of times with jittered backoff.
//!
//! Commands on one stream take turns inside one process (see `locks`), so
//! concurrent callers of one instance queue instead of racing; the expected
//! version check still guards against other instances. Between turns the
//! folded state is cached (see `cache`), so a command reads only the events
//! appended since the previous one.

mod cache;
mod locks;
mod retry;

use std::sync::Arc;
use std::time::SystemTime;

use uuid::Uuid;

pub use self::retry::RetryPolicy;
use crate::domain::values::Id;
use crate::domain::{Aggregate, DomainError, DomainEvent, UnknownEvent, Upcasters};
use crate::store::{
    AppendOutcome, AppendRequest, AppendResult, EventMetadata, EventStore, ExpectedVersion,
    NewEvent, NewEvents, RequestKey, Snapshot, StoreError,
};

/// A command for the aggregate `aggregate_id`, with what the caller expects.
#[derive(Debug, Clone)]
pub struct Command<C> {
    pub aggregate_id: Id,
    pub command: C,
    /// `None` lets the server decide on the latest state (and retry).
    pub expected: Option<ExpectedVersion>,
    /// Makes the command idempotent: sent again, it is answered with the
    /// first result; its id reused for another request is refused.
    pub request_key: Option<RequestKey>,
    /// Shared by everything one user action causes; a new one when `None`.
    pub correlation_id: Option<Uuid>,
}

/// Why a command did not apply.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored event this aggregate cannot read: the log and the code disagree.
    #[error(
        "stream {stream} holds an unreadable event at version {version} (log position {position}): {source}"
    )]
    Unreadable {
        stream: String,
        version: u64,
        position: u64,
        #[source]
        source: UnknownEvent,
    },
}

/// Runs commands against an event store.
#[derive(Debug)]
pub struct CommandHandler {
    store: Arc<dyn EventStore>,
    retry: RetryPolicy,
    locks: locks::StreamLocks,
    states: cache::StateCache,
    /// Take a snapshot each time a stream passes a multiple of this many
    /// events; 0 takes none.
    snapshot_every: u64,
    upcasters: Upcasters,
}

/// Events between two snapshots of a stream, unless configured otherwise.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 100;

/// Aggregate states kept in memory between commands.
const CACHED_STATES: usize = 10_000;

impl CommandHandler {
    pub fn new(store: Arc<dyn EventStore>, retry: RetryPolicy) -> Self {
        Self {
            store,
            retry,
            locks: locks::StreamLocks::default(),
            states: cache::StateCache::new(CACHED_STATES),
            snapshot_every: 0,
            upcasters: Upcasters::default(),
        }
    }

    /// Reads events stored in an older shape through `upcasters` (the
    /// application's [`crate::domain::KnownTypes::upcasters`]).
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// Snapshots every `every` events (0: none) for aggregates that take
    /// them (see [`Aggregate::snapshot`]): a state that is not cached here
    /// (after a restart, or last changed by another instance) is then loaded
    /// from its snapshot plus the events after it, not from the stream's start.
    pub fn with_snapshots_every(mut self, every: u64) -> Self {
        self.snapshot_every = every;
        self
    }

    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Decides and appends `command`; a repeated request returns the first result.
    pub async fn execute<A: Aggregate>(
        &self,
        command: Command<A::Command>,
    ) -> Result<AppendOutcome, CommandError> {
        let stream_id = A::stream_id(command.aggregate_id.as_str());
        if let Some(key) = command.request_key
            && let Some(first) = self.store.find_request(key.id).await?
        {
            return Ok(AppendOutcome::Replayed(first.replay(key, &stream_id)?));
        }
        let mut turn = self.locks.lock(&stream_id).await;
        let retryable = !matches!(command.expected, Some(ExpectedVersion::Exact(_)));
        let expected = command.expected.unwrap_or(ExpectedVersion::Any);
        let metadata = EventMetadata {
            occurred_at: SystemTime::now(),
            correlation_id: command.correlation_id.unwrap_or_else(Uuid::now_v7),
            causation_id: command
                .request_key
                .map_or_else(Uuid::now_v7, |key| key.id.0),
        };
        let mut attempt = 0;
        let mut known = match self.states.take::<A>(&stream_id) {
            Some(cached) => Some(cached),
            None => self.load_snapshot::<A>(&stream_id).await,
        };
        loop {
            let (state, version) = self.catch_up(&stream_id, known.take()).await?;
            if !expected.accepts(version) {
                return Err(StoreError::WrongExpectedVersion {
                    stream: stream_id,
                    expected,
                    actual: version,
                }
                .into());
            }
            let decided = state.decide(command.aggregate_id.as_str(), &command.command)?;
            let Ok(events) = NewEvents::try_from(encode(&decided)) else {
                // Nothing to do is a success that changes nothing.
                return Ok(AppendOutcome::Appended(AppendResult {
                    stream_id,
                    version,
                    event_ids: Vec::new(),
                }));
            };
            let appended = self
                .store
                .append(AppendRequest {
                    stream_id: stream_id.clone(),
                    stream_type: A::STREAM_TYPE.to_owned(),
                    // The decision holds for exactly the state it was made on.
                    expected: ExpectedVersion::Exact(version),
                    events,
                    request_key: command.request_key,
                    metadata: metadata.clone(),
                })
                .await;
            match appended {
                Ok(AppendOutcome::Appended(result)) => {
                    let mut state = state;
                    decided.into_iter().for_each(|event| state.apply(event));
                    self.take_snapshot(&stream_id, version, result.version, &state);
                    self.states.put(stream_id, result.version, state);
                    return Ok(AppendOutcome::Appended(result));
                }
                Err(StoreError::WrongExpectedVersion { actual, .. }) => {
                    if !retryable || attempt >= self.retry.max_retries {
                        return Err(StoreError::WrongExpectedVersion {
                            stream: stream_id,
                            expected: command.expected.unwrap_or(ExpectedVersion::Exact(version)),
                            actual,
                        }
                        .into());
                    }
                }
                // Nothing was written: as safe to decide again as a lost race.
                Err(contended @ StoreError::Contended { .. }) => {
                    if !retryable || attempt >= self.retry.max_retries {
                        return Err(contended.into());
                    }
                }
                // Includes a replay: another call with this request id
                // committed between our lookup and our append.
                other => return Ok(other?),
            }
            tracing::debug!(stream = %stream_id, attempt, "lost a race, deciding again");
            // Not holding the turn: the stream's other commands go on meanwhile.
            drop(turn);
            tokio::time::sleep(self.retry.backoff(attempt)).await;
            turn = self.locks.lock(&stream_id).await;
            attempt += 1;
            known = Some((version, state));
        }
    }

    /// The stream's snapshot, if snapshots are on, one is kept, and it is of
    /// `A`'s current shape; anything else reads as none (folded from the
    /// stream's start), so a snapshot never makes a command fail.
    async fn load_snapshot<A: Aggregate>(&self, stream_id: &str) -> Option<(u64, A)> {
        if self.snapshot_every == 0 {
            return None;
        }
        let snapshot = match self.store.load_snapshot(stream_id).await {
            Ok(snapshot) => snapshot?,
            Err(error) => {
                tracing::warn!(%error, stream = %stream_id, "no snapshot: folding the whole stream");
                return None;
            }
        };
        if snapshot.shape != A::SNAPSHOT_SHAPE {
            tracing::debug!(stream = %stream_id, shape = snapshot.shape, "discarding a snapshot of another shape");
            return None;
        }
        A::from_snapshot(&snapshot.state).map(|state| (snapshot.version, state))
    }

    /// Saves a snapshot in the background when the append from `before` to
    /// `after` passed a multiple of `snapshot_every`: the command's answer
    /// does not wait for it, and a lost one only costs a longer fold.
    fn take_snapshot<A: Aggregate>(&self, stream_id: &str, before: u64, after: u64, state: &A) {
        let every = self.snapshot_every;
        if every == 0 || after / every == before / every {
            return;
        }
        let Some(encoded) = state.snapshot() else {
            return;
        };
        let snapshot = Snapshot {
            stream_id: stream_id.to_owned(),
            version: after,
            shape: A::SNAPSHOT_SHAPE,
            state: encoded,
        };
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            if let Err(error) = store.save_snapshot(snapshot).await {
                tracing::warn!(%error, "could not save a snapshot");
            }
        });
    }

    /// Folds the events after `known` (or the whole stream) into the state;
    /// returns it with the stream's version.
    async fn catch_up<A: Aggregate>(
        &self,
        stream_id: &str,
        known: Option<(u64, A)>,
    ) -> Result<(A, u64), CommandError> {
        let (mut version, mut state) = known.unwrap_or_default();
        for recorded in self
            .store
            .read_stream(stream_id, version + 1, usize::MAX)
            .await?
        {
            let unreadable = |source| CommandError::Unreadable {
                stream: stream_id.to_owned(),
                version: recorded.version,
                position: recorded.position,
                source,
            };
            let events = self
                .upcasters
                .read(recorded.event_type, recorded.payload)
                .map_err(unreadable)?;
            for event in events {
                state.apply(
                    A::Event::decode(&event.event_type, &event.payload).map_err(unreadable)?,
                );
            }
            version = recorded.version;
        }
        Ok((state, version))
    }
}

fn encode<E: DomainEvent>(events: &[E]) -> Vec<NewEvent> {
    events
        .iter()
        .map(|event| NewEvent {
            event_id: Uuid::now_v7(),
            event_type: event.event_type(),
            payload: event.encode(),
        })
        .collect()
}
