//! Command handling: load an aggregate, decide, append, and retry only what is
//! safe to retry.
//!
//! A command that names an exact expected version was decided by a user on a
//! state they saw; if the stream moved on, the user must look again, so it is
//! never retried. Any other command is the server's to decide: when another
//! writer gets in between load and append, it is decided again on the fresh
//! state, a bounded number of times with jittered backoff.
//!
//! Commands on one stream queue inside one process (see `queue`): a leader
//! decides those waiting one after another, each on the state the ones
//! before it leave, and commits them in one chain, so a hot stream costs one
//! commit per round instead of one per command. Each is answered once its
//! own append is durable; if an append is not written, every command
//! decided on top of it is decided again. The expected version check still
//! guards against other instances. Between rounds the folded state is
//! cached (see `cache`), so a round reads only the events appended since
//! the previous one; and while no other process writes the stream, it reads
//! nothing: it decides on the cached state, and the expected version of its
//! first append proves that state current. A decision no written append
//! proves (a refusal, a command that changes nothing) is made again on the
//! stream as read before it is answered.

mod cache;
mod queue;
mod retry;

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::oneshot;
use uuid::Uuid;

use self::cache::Cached;
pub use self::retry::RetryPolicy;
use crate::contention::Contention;
use crate::domain::values::Id;
use crate::domain::{Aggregate, DomainError, DomainEvent, UnknownEvent, Upcasters};
use crate::store::{
    AppendOutcome, AppendRequest, AppendResult, EventMetadata, EventStore, ExpectedVersion,
    NewEvent, NewEvents, RequestKey, Snapshot, StoreError,
};
use crate::telemetry::trace::TraceParent;

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
    /// Who sent it and as part of what, recorded with its events.
    pub origin: Origin,
}

/// Where a command comes from; see `grpc::command_request::origin`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// Shared by everything one user action causes; a new one when `None`.
    pub correlation_id: Option<Uuid>,
    /// The authenticated caller (a bearer token's subject); `None` where
    /// the server authenticates nobody.
    pub actor: Option<String>,
    /// The trace the request belongs to: its span's where this process
    /// exports traces, otherwise the caller's `traceparent`.
    pub trace: Option<TraceParent>,
}

/// Why a command did not apply.
#[derive(Debug, Clone, thiserror::Error)]
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
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn EventStore>,
    retry: RetryPolicy,
    queues: queue::Queues,
    states: cache::StateCache,
    /// Take a snapshot each time a stream passes a multiple of this many
    /// events; 0 takes none.
    snapshot_every: u64,
    upcasters: Upcasters,
    /// Where lost races are counted, per stream.
    contention: Arc<Contention>,
}

/// Events between two snapshots of a stream, unless configured otherwise.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 100;

/// Aggregate states kept in memory between commands.
const CACHED_STATES: usize = 10_000;

/// Most commands a leader decides and commits in one round: bounds the
/// chain one commit carries.
const MAX_ROUND: usize = 256;

/// A command waiting on its stream, and where its answer goes.
struct Job<A: Aggregate> {
    command: Command<A::Command>,
    metadata: EventMetadata,
    /// Decisions lost to other writers so far.
    attempt: u32,
    /// The command's span, open until it is answered.
    span: tracing::Span,
    reply: oneshot::Sender<Result<AppendOutcome, CommandError>>,
}

impl<A: Aggregate> Job<A> {
    fn answer(self, outcome: Result<AppendOutcome, CommandError>) {
        // A caller that went away no longer listens.
        let _ = self.reply.send(outcome);
    }

    fn retryable(&self) -> bool {
        !matches!(self.command.expected, Some(ExpectedVersion::Exact(_)))
    }
}

/// What a round decided for one command.
enum Decided {
    /// Its append is the chain's entry at `index`, decided at `version`;
    /// `appending` is its span, open until the chain's commit is settled.
    Append {
        index: usize,
        version: u64,
        appending: tracing::Span,
    },
    /// Its answer, which holds if the chain's appends before it were written.
    Answer(Result<AppendOutcome, CommandError>),
}

/// Whether a round read its stream before deciding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// It decided on a cached state at once: only a written append proves
    /// that state was current.
    Skipped,
    /// It read this many events past the state it had (every event, when
    /// it had none).
    Found(usize),
}

impl Read {
    /// Whether the read found events this process had not folded: another
    /// writer's, or a whole stream loaded anew (its own, after a restart).
    fn found_others(self) -> bool {
        matches!(self, Self::Found(events) if events > 0)
    }
}

/// One round's decisions, made without I/O: the chain to append, and for
/// each command how many of the chain's appends precede its decision and
/// what it awaits.
struct Round<A: Aggregate> {
    /// The state once every append of the chain is written.
    state: A,
    /// The stream's version then.
    version: u64,
    chain: Vec<AppendRequest>,
    decided: Vec<(Job<A>, usize, Decided)>,
}

impl<A: Aggregate> Round<A> {
    /// Decides `jobs` in order on `state` (at `version`), each on what the
    /// ones before it leave.
    fn decide(stream_id: &str, mut state: A, mut version: u64, jobs: Vec<Job<A>>) -> Self {
        let mut chain = Vec::new();
        let mut decided = Vec::with_capacity(jobs.len());
        for job in jobs {
            let prior = chain.len();
            let expected = job.command.expected.unwrap_or(ExpectedVersion::Any);
            let decision = if expected.accepts(version) {
                let _deciding =
                    tracing::debug_span!(parent: &job.span, "decide", version).entered();
                state
                    .decide(job.command.aggregate_id.as_str(), &job.command.command)
                    .map_err(CommandError::from)
            } else {
                Err(StoreError::WrongExpectedVersion {
                    stream: stream_id.to_owned(),
                    expected,
                    actual: version,
                }
                .into())
            };
            let outcome = match decision {
                Err(refused) => Decided::Answer(Err(refused)),
                Ok(events) => match NewEvents::try_from(encode(&events)) {
                    // Nothing to do is a success that changes nothing.
                    Err(_) => Decided::Answer(Ok(AppendOutcome::Appended(AppendResult {
                        stream_id: stream_id.to_owned(),
                        version,
                        event_ids: Vec::new(),
                    }))),
                    Ok(new_events) => {
                        let appending = tracing::debug_span!(
                            parent: &job.span,
                            "append",
                            version,
                            events = new_events.len(),
                        );
                        // Relaying and projecting these events continue from here.
                        let mut metadata = job.metadata.clone();
                        if let Some(trace) = TraceParent::of_span(&appending) {
                            metadata.trace = Some(trace);
                        }
                        chain.push(AppendRequest {
                            stream_id: stream_id.to_owned(),
                            stream_type: A::STREAM_TYPE.to_owned(),
                            // The decision holds for exactly the state it was made on.
                            expected: ExpectedVersion::Exact(version),
                            events: new_events,
                            request_key: job.command.request_key,
                            metadata,
                        });
                        let decided_at = version;
                        version += events.len() as u64;
                        events.into_iter().for_each(|event| state.apply(event));
                        Decided::Append {
                            index: prior,
                            version: decided_at,
                            appending,
                        }
                    }
                },
            };
            decided.push((job, prior, outcome));
        }
        Self {
            state,
            version,
            chain,
            decided,
        }
    }
}

impl CommandHandler {
    pub fn new(store: Arc<dyn EventStore>, retry: RetryPolicy) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                retry,
                queues: queue::Queues::default(),
                states: cache::StateCache::new(CACHED_STATES),
                snapshot_every: 0,
                upcasters: Upcasters::default(),
                contention: Arc::default(),
            }),
        }
    }

    /// Snapshots every `every` events (0: none) for aggregates that take
    /// them (see [`Aggregate::snapshot`]): a state that is not cached here
    /// (after a restart, or last changed by another instance) is then loaded
    /// from its snapshot plus the events after it, not from the stream's start.
    pub fn with_snapshots_every(mut self, every: u64) -> Self {
        self.configure(|inner| inner.snapshot_every = every);
        self
    }

    /// Reads events stored in an older shape through `upcasters` (the
    /// application's [`crate::domain::KnownTypes::upcasters`]).
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Self {
        self.configure(|inner| inner.upcasters = upcasters);
        self
    }

    /// Counts the races its commands lose in `contention` (shared with the
    /// rest of the process, which reports it).
    pub fn with_contention(mut self, contention: Arc<Contention>) -> Self {
        self.configure(|inner| inner.contention = contention);
        self
    }

    /// The races its commands lost, per stream.
    pub fn contention(&self) -> &Arc<Contention> {
        &self.inner.contention
    }

    /// Configures a handler that has not run a command yet (nothing else
    /// holds its inner part then).
    fn configure(&mut self, change: impl FnOnce(&mut Inner)) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            change(inner);
        }
    }

    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// Decides and appends `command`; a repeated request returns the first result.
    pub async fn execute<A: Aggregate>(
        &self,
        command: Command<A::Command>,
    ) -> Result<AppendOutcome, CommandError> {
        let stream_id = A::stream_id(command.aggregate_id.as_str());
        if let Some(key) = command.request_key
            && let Some(first) = self.inner.store.find_request(key.id).await?
        {
            return Ok(AppendOutcome::Replayed(first.replay(key, &stream_id)?));
        }
        let metadata = EventMetadata {
            occurred_at: SystemTime::now(),
            // A caller that names no correlation but a trace is correlated by it.
            correlation_id: command
                .origin
                .correlation_id
                .or(command.origin.trace.map(|trace| trace.correlation_id()))
                .unwrap_or_else(Uuid::now_v7),
            causation_id: command
                .request_key
                .map_or_else(Uuid::now_v7, |key| key.id.0),
            actor: command.origin.actor.clone(),
            trace: command.origin.trace,
        };
        let span = tracing::info_span!(
            "command",
            stream = %stream_id,
            correlation_id = %metadata.correlation_id,
            causation_id = %metadata.causation_id,
        );
        let key = command.request_key;
        let (reply, answer) = oneshot::channel();
        let job = Job::<A> {
            command,
            metadata,
            attempt: 0,
            span,
            reply,
        };
        if let Some(lead) = self.inner.queues.push(&stream_id, job) {
            // Its own task: a caller that goes away does not take the other
            // commands of the round with it.
            let inner = Arc::clone(&self.inner);
            tokio::spawn(inner.lead::<A>(stream_id.clone(), lead));
        }
        let outcome = answer.await.unwrap_or_else(|_| {
            Err(StoreError::backend("the command's round ended without an answer").into())
        });
        // The same request sent twice at once: the second is decided on
        // the state the first left, where it may be refused or change
        // nothing; it is a repeat, answered with the first's result.
        let unwritten = match &outcome {
            Err(CommandError::Domain(_)) => true,
            Ok(AppendOutcome::Appended(result)) => result.event_ids.is_empty(),
            _ => false,
        };
        if let Some(key) = key
            && unwritten
            && let Some(first) = self.inner.store.find_request(key.id).await?
        {
            return Ok(AppendOutcome::Replayed(first.replay(key, &stream_id)?));
        }
        outcome
    }
}

impl Inner {
    /// Runs rounds on `stream_id` as `lead` until nothing is queued there.
    async fn lead<A: Aggregate>(self: Arc<Self>, stream_id: String, lead: queue::Lead) {
        /// Ends the lead however the leader stops, so that a leader that
        /// panicked does not leave its stream without one.
        struct Leading<'a, A: Aggregate>(&'a Inner, &'a str, queue::Lead, PhantomData<A>);
        impl<A: Aggregate> Drop for Leading<'_, A> {
            fn drop(&mut self) {
                self.0.queues.end::<Job<A>>(self.1, self.2);
            }
        }
        let _leading = Leading::<A>(&self, &stream_id, lead, PhantomData);
        loop {
            let jobs = self.queues.take::<Job<A>>(&stream_id, lead, MAX_ROUND);
            if jobs.is_empty() {
                return;
            }
            if let Some(attempt) = self.round(&stream_id, lead, jobs).await {
                // Lost to another writer: give it room before deciding again.
                tracing::debug!(stream = %stream_id, attempt, "lost a race, deciding again");
                tokio::time::sleep(self.retry.backoff(attempt)).await;
            }
        }
    }

    /// Decides `jobs` in order, each on the state the ones before it leave,
    /// appends their events as one chain and answers each command whose
    /// decision held; the others go back to the queue. Returns the attempt
    /// to back off for when one lost a race to another writer.
    async fn round<A: Aggregate>(
        &self,
        stream_id: &str,
        lead: queue::Lead,
        jobs: Vec<Job<A>>,
    ) -> Option<u32> {
        let (state, start, read) = match self.states.take::<A>(stream_id) {
            Some(cached) if !cached.others_write => (cached.state, cached.version, Read::Skipped),
            cached => {
                let known = match cached {
                    Some(cached) => Some((cached.version, cached.state)),
                    None => self.load_snapshot::<A>(stream_id).await,
                };
                match self.catch_up(stream_id, known).await {
                    Ok((state, version, events)) => (state, version, Read::Found(events)),
                    Err(error) => {
                        for job in jobs {
                            job.answer(Err(error.clone()));
                        }
                        return None;
                    }
                }
            }
        };
        let round = Round::decide(stream_id, state, start, jobs);
        if read == Read::Skipped && round.chain.is_empty() {
            // No append will prove the cached state current: read first,
            // then decide again (deciding changed nothing).
            let cached = Cached {
                version: start,
                state: round.state,
                others_write: true,
            };
            self.states.put(stream_id.to_owned(), cached);
            let jobs = round.decided.into_iter().map(|(job, ..)| job).collect();
            self.queues.requeue(stream_id, lead, jobs);
            return None;
        }
        let outcomes = if round.chain.is_empty() {
            Vec::new()
        } else {
            self.store.append_chain(round.chain).await
        };
        let written = outcomes
            .iter()
            .take_while(|o| matches!(o, Ok(AppendOutcome::Appended(_))))
            .count();
        if written == outcomes.len() {
            self.take_snapshot(stream_id, start, round.version, &round.state);
            let cached = Cached {
                version: round.version,
                state: round.state,
                others_write: read.found_others(),
            };
            self.states.put(stream_id.to_owned(), cached);
        }
        self.settle(stream_id, lead, round.decided, outcomes, written, read)
    }

    /// Answers each command of a round from its chain's `outcomes` (the
    /// first `written` were written), or queues it again: decided on a state
    /// that was not written or not proven current, or lost to another
    /// writer and retryable. Returns the attempt to back off for after a
    /// lost race.
    fn settle<A: Aggregate>(
        &self,
        stream_id: &str,
        lead: queue::Lead,
        decided: Vec<(Job<A>, usize, Decided)>,
        outcomes: Vec<Result<AppendOutcome, StoreError>>,
        written: usize,
        read: Read,
    ) -> Option<u32> {
        // The state after `prior` appends was current when the append
        // decided on it was written, or the last was, or the round read it.
        let all_written = written == outcomes.len();
        let proven = |prior: usize| prior < written || all_written || read != Read::Skipped;
        let mut outcomes: Vec<Option<_>> = outcomes.into_iter().map(Some).collect();
        let mut lost = None;
        let mut requeued = Vec::new();
        for (mut job, prior, decision) in decided {
            let (index, decided_at, appending) = match decision {
                Decided::Answer(answer) if prior <= written && proven(prior) => {
                    if let Err(CommandError::Store(StoreError::WrongExpectedVersion { .. })) =
                        &answer
                    {
                        // Another client's command moved the version first.
                        self.contention.lost_command_race(stream_id);
                    }
                    job.answer(answer);
                    continue;
                }
                Decided::Answer(_) => {
                    requeued.push(job);
                    continue;
                }
                Decided::Append {
                    index,
                    version,
                    appending,
                } => (index, version, appending),
            };
            let Some(appended) = outcomes.get_mut(index).and_then(Option::take) else {
                job.answer(Err(
                    StoreError::backend("an append without an outcome").into()
                ));
                continue;
            };
            match appended {
                Ok(outcome) => job.answer(Ok(outcome)),
                // Refused only because an earlier append of the chain was
                // not written: decide it again, on what was.
                Err(StoreError::WrongExpectedVersion { .. }) if index > written => {
                    tracing::debug!(parent: &appending, "an append before it was not written");
                    requeued.push(job);
                }
                // Decided on a cached state another writer had moved past:
                // not a retry, nor a lost race (a read would have seen that
                // write), as nothing was decided on the stream as it is.
                Err(StoreError::WrongExpectedVersion { .. }) if read == Read::Skipped => {
                    tracing::debug!(parent: &appending, "the cached state was behind the stream");
                    requeued.push(job);
                }
                Err(StoreError::WrongExpectedVersion { .. } | StoreError::Contended { .. })
                    if job.retryable() && job.attempt < self.retry.max_retries =>
                {
                    tracing::debug!(parent: &appending, "lost a race to another writer");
                    self.contention.lost_command_race(stream_id);
                    lost = lost.max(Some(job.attempt));
                    job.attempt += 1;
                    requeued.push(job);
                }
                Err(StoreError::WrongExpectedVersion { actual, .. }) => {
                    self.contention.lost_command_race(stream_id);
                    let expected = job
                        .command
                        .expected
                        .unwrap_or(ExpectedVersion::Exact(decided_at));
                    job.answer(Err(StoreError::WrongExpectedVersion {
                        stream: stream_id.to_owned(),
                        expected,
                        actual,
                    }
                    .into()));
                }
                // Includes a replay's refusal and a store that failed.
                Err(other) => job.answer(Err(other.into())),
            }
        }
        if !requeued.is_empty() {
            self.queues.requeue(stream_id, lead, requeued);
        }
        lost
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
    /// returns it with the stream's version and how many events it read.
    async fn catch_up<A: Aggregate>(
        &self,
        stream_id: &str,
        known: Option<(u64, A)>,
    ) -> Result<(A, u64, usize), CommandError> {
        let (mut version, mut state) = known.unwrap_or_default();
        let recorded = self
            .store
            .read_stream(stream_id, version + 1, usize::MAX)
            .await?;
        let read = recorded.len();
        for recorded in recorded {
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
        Ok((state, version, read))
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
