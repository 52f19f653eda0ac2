//! The event store port: append with an expected version, read a stream back.
//!
//! Backends are narrow on purpose: they keep rows (already-encoded payloads
//! plus metadata), check versions and commit; serialization and rehydration
//! belong to the kernel. Every backend shares `plan`'s decision of what a
//! batch of appends does, so their semantics cannot drift apart, and each one
//! commits many concurrent appends in one durable transaction (group commit).
//!
//! Chosen at run time from config, so the trait is object safe and held as
//! `Arc<dyn EventStore>`.

mod plan;
pub mod postgres;
pub mod redb;
mod types;

use self::types::page_window;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Notify;

pub use self::types::{
    AppendOutcome, AppendRequest, AppendResult, EmptyAppend, EventMetadata, ExpectedVersion,
    Fingerprint, LogFilter, LogPage, NewEvent, NewEvents, RecordedEvent, RecordedRequest,
    RequestId, RequestKey, Snapshot,
};
pub use crate::error::Cause;

/// Appends queued together, each decided on the state the ones before it
/// leave (see [`EventStore::append_chain`]), and their outcomes, in order.
type Chain = Vec<AppendRequest>;
type Outcomes = Vec<Result<AppendOutcome, StoreError>>;

/// A chain waiting for its batch to commit (see [`crate::group_commit`]).
type Pending = crate::group_commit::Pending<Chain, Outcomes>;
type Submitter = crate::group_commit::Submitter<Chain, Outcomes>;
type Batches = crate::group_commit::Batches<Chain, Outcomes>;

/// Queues a chain on its stream's writer and waits for its outcomes.
async fn submit(submitter: &Submitter, chain: Chain) -> Outcomes {
    if chain.is_empty() {
        return Vec::new();
    }
    let len = chain.len();
    submitter
        .submit(chain, |chain| {
            chain.first().map_or("", |r| r.stream_id.as_str())
        })
        .await
        .unwrap_or_else(|crate::group_commit::Stopped| {
            let stopped = StoreError::unavailable("the event store's writer has stopped");
            vec![Err(stopped); len]
        })
}

/// Every append of a batch, chain after chain, in order.
fn appends(batch: &[Pending]) -> impl Iterator<Item = &AppendRequest> {
    batch.iter().flat_map(|pending| pending.write.iter())
}

/// The appends of a planned batch that write events: each with the version
/// of its first event and its result.
fn writes<'a>(
    batch: &'a [Pending],
    planned: &'a [plan::Planned],
) -> impl Iterator<Item = (&'a AppendRequest, u64, &'a AppendResult)> {
    appends(batch)
        .zip(planned)
        .filter_map(|(request, planned)| match planned {
            plan::Planned::Write {
                first_version,
                result,
            } => Some((request, *first_version, result)),
            plan::Planned::Replay(_) | plan::Planned::Reject(_) => None,
        })
}

/// Answers each chain of a committed batch from the batch's plan.
fn answer(batch: Vec<Pending>, planned: Vec<plan::Planned>) {
    let mut planned = planned.into_iter();
    for pending in batch {
        let outcomes = planned
            .by_ref()
            .take(pending.write.len())
            .map(plan::Planned::into_outcome)
            .collect();
        pending.answer(outcomes);
    }
}

/// Answers every append of a batch that did not commit with `failure`.
fn answer_all(batch: Vec<Pending>, failure: &StoreError) {
    for pending in batch {
        let outcomes = vec![Err(failure.clone()); pending.write.len()];
        pending.answer(outcomes);
    }
}

/// Most positions a filtered [`EventStore::read_all`] looks at in one call,
/// so that a filter matching little of a long log still answers promptly
/// (with an empty page whose `next_position` has moved on).
pub const MAX_SCAN: u64 = 16_384;

/// Everything an append or a read can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The stream was not at the version the append required; nothing was written.
    #[error("wrong expected version on stream {stream}: expected {expected}, actual {actual}")]
    WrongExpectedVersion {
        stream: String,
        expected: ExpectedVersion,
        /// The stream's current version; 0 when it does not exist.
        actual: u64,
    },
    /// The request id was first used for a different request (another
    /// stream, or other content): a client bug, not a retry.
    #[error(
        "request id {request_id} was already used for a different request (on stream {first_stream})"
    )]
    RequestIdReused {
        request_id: RequestId,
        first_stream: String,
    },
    /// Writers of other processes kept taking the rows this append needed,
    /// past the store's budget of retries: nothing was written, and the same
    /// append will most likely go through if sent again.
    #[error("event store contended: {context}")]
    Contended {
        context: String,
        #[source]
        cause: Option<Cause>,
    },
    /// The backend cannot be reached or did not answer in time; the outcome
    /// of an append is unknown, so the caller may retry it with the same
    /// request id.
    #[error("event store unavailable: {context}")]
    Unavailable {
        context: String,
        #[source]
        cause: Option<Cause>,
    },
    /// The backend answered with something the store cannot make sense of:
    /// retrying the same call will fail the same way.
    #[error("event store failure: {context}")]
    Backend {
        context: String,
        #[source]
        cause: Option<Cause>,
    },
}

impl StoreError {
    pub fn unavailable(context: impl Into<String>) -> Self {
        Self::Unavailable {
            context: context.into(),
            cause: None,
        }
    }

    pub fn backend(context: impl Into<String>) -> Self {
        Self::Backend {
            context: context.into(),
            cause: None,
        }
    }

    /// The same error, caused by `cause`.
    pub fn caused_by(mut self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        if let Self::Contended { cause: kept, .. }
        | Self::Unavailable { cause: kept, .. }
        | Self::Backend { cause: kept, .. } = &mut self
        {
            *kept = Some(Cause::new(cause));
        }
        self
    }

    /// Whether the same call may succeed later: the backend was away or
    /// busy. Expected-version and request-id refusals are answers, not
    /// failures, and a backend failure repeats.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Contended { .. } | Self::Unavailable { .. })
    }
}

/// Where events are appended and read back.
#[async_trait]
pub trait EventStore: Send + Sync + std::fmt::Debug + 'static {
    /// Appends the events atomically if the stream is at the expected version.
    ///
    /// With a request key already recorded for the same request, writes
    /// nothing and returns the first append's result as
    /// [`AppendOutcome::Replayed`]; its id recorded for a different request
    /// is [`StoreError::RequestIdReused`].
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        self.append_chain(vec![request])
            .await
            .pop()
            .unwrap_or_else(|| Err(StoreError::backend("an append without an outcome")))
    }

    /// Appends `chain` in order, in one commit, each as [`EventStore::append`]
    /// would; one outcome per request. Each request was decided on the state
    /// the ones before it leave, so once one is not written (refused, or a
    /// replay) the rest are refused with
    /// [`StoreError::WrongExpectedVersion`], and nothing of theirs is
    /// written. This is how the commands queued on one stream commit
    /// together instead of one commit each.
    async fn append_chain(
        &self,
        chain: Vec<AppendRequest>,
    ) -> Vec<Result<AppendOutcome, StoreError>>;

    /// Reads up to `limit` of a stream's events with a version of at least
    /// `from_version`, in order. A missing stream reads as empty.
    async fn read_stream(
        &self,
        stream_id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Reads the log in position order from `from_position`: up to `limit`
    /// events that pass `filter`, looking at no more than [`MAX_SCAN`]
    /// positions when filtering.
    ///
    /// Gap-safe: positions are handed out in commit order, so a reader that
    /// has seen position `p` will never later find an event below `p` that
    /// it missed, however many writers and processes append at once. A
    /// reader can therefore keep just its next position as a checkpoint.
    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<LogPage, StoreError>;

    /// What was recorded for a request id, if anything.
    async fn find_request(
        &self,
        request_id: RequestId,
    ) -> Result<Option<RecordedRequest>, StoreError>;

    /// The outbox rows not yet published past position `after` (0: all),
    /// oldest first, at most `limit`.
    async fn read_outbox(&self, after: u64, limit: usize)
    -> Result<Vec<RecordedEvent>, StoreError>;

    /// Makes this process the outbox's one relay, or confirms that it still
    /// is; `false` while another process is. Two relays publishing the same
    /// rows would only duplicate messages, but one relay keeps them in order.
    async fn lease_outbox(&self) -> Result<bool, StoreError>;

    /// Removes published rows (by position) from the outbox.
    async fn delete_outbox(&self, positions: &[u64]) -> Result<(), StoreError>;

    /// Notified after every commit that wrote events, so that a relay in this
    /// process publishes at once instead of polling.
    fn appended(&self) -> &Notify;

    /// Checks that the backend answers, for health reporting.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Keeps `snapshot` as its stream's snapshot, unless one at a later
    /// version is kept already.
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError>;

    /// The stream's latest snapshot, if any.
    async fn load_snapshot(&self, stream_id: &str) -> Result<Option<Snapshot>, StoreError>;
}

/// Opens the store a `--event-store` value names: `redb:PATH` or a
/// `postgres://` URL (see [`postgres::PostgresConfig`] for its options,
/// `sslmode` among them), whose tables live in `postgres_schema`, its
/// certificate checked against `postgres_ca` where `sslmode` asks.
pub async fn open(
    spec: &str,
    postgres_schema: &str,
    postgres_ca: Option<std::path::PathBuf>,
) -> Result<Arc<dyn EventStore>, StoreError> {
    if let Some(path) = spec.strip_prefix("redb:") {
        // Opening may repair a file after a crash: not on a runtime thread.
        let path = path.to_owned();
        let opened = tokio::task::spawn_blocking(move || redb::RedbStore::open(path))
            .await
            .map_err(|e| StoreError::backend(format!("opening the event store: {e}")))?;
        Ok(Arc::new(opened?))
    } else if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        let config = postgres::PostgresConfig::new(spec)
            .with_schema(postgres_schema.to_owned())
            .with_ca(postgres_ca);
        Ok(Arc::new(postgres::PostgresStore::connect(config).await?))
    } else {
        Err(StoreError::backend(format!(
            "unknown event store {spec:?}: expected redb:PATH or postgres://…"
        )))
    }
}
