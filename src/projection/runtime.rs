//! The projection runtime: takes deliveries off the bus, folds them into
//! their documents with CAS, and settles each delivery by what became of it.
//!
//! A worker takes what has arrived (up to a batch), groups the events by the
//! document they change, and writes each document once: read it with its
//! CAS, fold every event of the batch into it, write it back (insert when
//! missing). A document that has not seen the events before one of the
//! batch's (a delivery lost, parked, still in flight elsewhere, or the
//! document rolled back) gets them from the event log in the same write, so
//! no view ever waits on a delivery. A lost race reads and folds again,
//! bounded, with jitter. Then each delivery is settled:
//!
//! | what happened to it | settled |
//! | --- | --- |
//! | applied (or applied before) everywhere | ack |
//! | the document store or the log did not answer, or CAS kept losing | kept, unsettled: the worker pauses with backoff (health NOT_SERVING) and tries again; no attempt is spent |
//! | a document fails the same way every time (unreadable, refused as too large) | handed back (an attempt); parked once out of attempts |
//! | it does not decode, or its type is unknown | parked at once |
//!
//! An outage is not poison: a frozen store pauses the worker, which holds
//! its deliveries until the store answers, instead of spending their
//! attempts and parking good events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::generation::{Generation, Generations, key_in};
use super::metrics::ProjectorMetrics;
use super::{AnyProjection, Order, Outcome, ProjectedEvent};
use crate::backoff::Backoff;
use crate::bus::{Delivery, Subscriber};
use crate::documents::{DocumentError, DocumentStore};
use crate::domain::KnownTypes;
use crate::log::EventLog;
use crate::store::StoreError;
use crate::telemetry::trace::TraceParent;

/// Most events one gap fill reads from the log for one stream of one
/// document; a longer gap (a document rolled far back) is filled over
/// several writes.
const MAX_GAP_FILL: usize = 10_000;

/// Pauses between reading and folding a document again after a lost CAS
/// race: short, and spread so that racing writers do not meet again.
const CAS_BACKOFF: Backoff = Backoff::racing(Duration::from_micros(500), Duration::from_millis(64));

/// How a projector worker paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectorConfig {
    /// Most deliveries folded together; match the subscription's prefetch.
    pub batch: usize,
    /// Reads and folds of one document after lost CAS races before the
    /// worker backs off and tries the batch again.
    pub cas_retries: u32,
    /// Bounds of the pause while a dependency does not answer, doubling.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch: 100,
            cas_retries: 64,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// Which generation of each read model a projector writes.
#[derive(Debug, Clone)]
enum Target {
    /// The one live events go to ([`written`](super::generation::GenerationState::written)), as last read.
    Live(Generations),
    /// One generation, whatever serves: a rebuild filling it.
    Fixed(Generation),
}

/// Projects deliveries into documents.
#[derive(Clone)]
pub struct Projector {
    pub(super) store: Arc<dyn DocumentStore>,
    target: Target,
    pub(super) log: Arc<dyn EventLog>,
    projections: Arc<[Box<dyn AnyProjection>]>,
    /// What the application stores: anything else is poison.
    pub(super) known: Arc<KnownTypes>,
    pub(super) metrics: Arc<ProjectorMetrics>,
    pub(super) config: ProjectorConfig,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.projections.iter().map(|p| p.name()).collect();
        f.debug_struct("Projector")
            .field("store", &self.store)
            .field("log", &self.log)
            .field("projections", &names)
            .field("target", &self.target)
            .field("config", &self.config)
            .finish()
    }
}

/// A decoded delivery being worked on.
struct Held {
    delivery: Delivery,
    event: ProjectedEvent,
    /// Projecting it, until it is settled.
    _span: tracing::Span,
}

/// What a delivery's documents made of it, worst last.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Verdict {
    Duplicate,
    Applied,
    /// A projection refused it (see [`super::Projection::apply`]): the
    /// documents skipped it; park it with the reason.
    Refused(String),
    /// The same failure will come back: spend an attempt.
    Failed(String),
    /// A dependency did not answer: keep it and try again.
    Paused(String),
}

/// Why a document could not be written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WriteError {
    /// The store or the log did not answer, or the write kept losing races.
    Transient(String),
    /// The document or an event can never be folded as things are.
    Permanent(String),
}

impl WriteError {
    /// Only a document the store refuses for good is the delivery's fault;
    /// a store that is down or failing (even misconfigured) is waited out,
    /// so that no good event is parked because of it.
    fn document(error: DocumentError) -> Self {
        match error {
            DocumentError::Rejected { .. } => Self::Permanent(error.to_string()),
            error => Self::Transient(error.to_string()),
        }
    }

    /// A log that cannot be read is waited out in the same way.
    fn log(error: StoreError) -> Self {
        Self::Transient(error.to_string())
    }
}

impl Projector {
    /// Projects into `store` the events of the `known` types, reading gaps
    /// from `log`.
    pub fn new(
        store: Arc<dyn DocumentStore>,
        log: Arc<dyn EventLog>,
        known: KnownTypes,
        projections: Vec<Box<dyn AnyProjection>>,
        metrics: Arc<ProjectorMetrics>,
        config: ProjectorConfig,
    ) -> Self {
        Self {
            target: Target::Live(Generations::new(Arc::clone(&store))),
            store,
            log,
            projections: projections.into(),
            known: Arc::new(known),
            metrics,
            config,
        }
    }

    /// The same projector writing only `generation` (what a rebuild fills).
    pub fn writing(mut self, generation: Generation) -> Self {
        self.target = Target::Fixed(generation);
        self
    }

    pub fn metrics(&self) -> &Arc<ProjectorMetrics> {
        &self.metrics
    }

    /// The generation `projection` is written to now; `None` when it has
    /// none (a first build was dropped before it served): the next build
    /// folds the event from the log.
    async fn generation(&self, projection: &str) -> Result<Option<Generation>, DocumentError> {
        match &self.target {
            Target::Fixed(generation) => Ok(Some(*generation)),
            Target::Live(generations) => Ok(generations.state(projection).await?.written()),
        }
    }

    /// Projects from `subscriber` until `stopping` is cancelled. Deliveries
    /// still held then are dropped unsettled, which hands them back.
    pub async fn run(&self, mut subscriber: Box<dyn Subscriber>, stopping: CancellationToken) {
        loop {
            let first = tokio::select! {
                () = stopping.cancelled() => break,
                delivery = subscriber.next() => match delivery {
                    Some(delivery) => delivery,
                    None => break,
                },
            };
            let mut fresh = vec![first];
            while fresh.len() < self.config.batch {
                match subscriber.next().now_or_never() {
                    Some(Some(delivery)) => fresh.push(delivery),
                    _ => break,
                }
            }
            let mut work = Vec::with_capacity(fresh.len());
            for delivery in fresh {
                match ProjectedEvent::decode(&delivery.message, &self.known) {
                    Ok(mut event) => {
                        let span = projecting(&mut event, Some(&delivery.message.traceparent));
                        work.push(Held {
                            delivery,
                            event,
                            _span: span,
                        });
                    }
                    Err(poison) => self.park(delivery, &poison.to_string()).await,
                }
            }
            // Stopping ends a round wherever it waits: what it leaves
            // unsettled goes back to the queue, and comes again as a duplicate.
            let finished = tokio::select! {
                () = stopping.cancelled() => false,
                finished = self.project_until_done(work, &stopping) => finished,
            };
            if !finished {
                break;
            }
        }
    }

    /// Projects `work`, pausing with backoff while a dependency does not
    /// answer; `false` if stopped first.
    async fn project_until_done(&self, mut work: Vec<Held>, stopping: &CancellationToken) -> bool {
        let mut pauses = 0u32;
        // Counted as paused while it waits, however the wait ends.
        let mut paused = None;
        let finished = loop {
            work = self.project(work).await;
            let Some(first) = work
                .first()
                .map(|held| held.delivery.message.message_id.clone())
            else {
                break true;
            };
            if pauses == 0 {
                paused = Some(self.metrics.pause());
                tracing::warn!(
                    deliveries = work.len(),
                    first = %first,
                    "a dependency does not answer; pausing this worker until it does"
                );
            }
            pauses += 1;
            tokio::select! {
                () = stopping.cancelled() => break false,
                () = tokio::time::sleep(self.backoff(pauses)) => {}
            }
        };
        if paused.take().is_some() && finished {
            tracing::info!(pauses, "dependencies answer again; worker resumed");
        }
        finished
    }

    /// Folds `work` into its documents and settles what is done, all at
    /// once (a broker that stopped answering costs one timeout, not one per
    /// delivery); returns the deliveries that wait for a dependency to answer.
    async fn project(&self, work: Vec<Held>) -> Vec<Held> {
        let events: Vec<&ProjectedEvent> = work.iter().map(|held| &held.event).collect();
        let verdicts = self.verdicts(&events).await;
        let mut waiting = Vec::new();
        let mut settling = Vec::new();
        for (held, verdict) in work.into_iter().zip(verdicts) {
            match verdict {
                Verdict::Paused(_) => waiting.push(held),
                verdict => settling.push(self.settle(held, verdict)),
            }
        }
        futures_util::future::join_all(settling).await;
        waiting
    }

    /// Folds `events` into their documents, one write per document; says
    /// what became of each event.
    pub(super) async fn verdicts(&self, events: &[&ProjectedEvent]) -> Vec<Verdict> {
        let mut documents: HashMap<(usize, String), Vec<(usize, Order)>> = HashMap::new();
        let mut verdicts: Vec<Verdict> = events.iter().map(|_| Verdict::Duplicate).collect();
        for (index, event) in events.iter().enumerate() {
            for (projection, p) in self.projections.iter().enumerate() {
                let routes = match p.routes(event) {
                    Ok(routes) => routes,
                    Err(poison) => {
                        verdicts[index] = Verdict::Refused(poison.to_string());
                        continue;
                    }
                };
                for route in routes {
                    documents
                        .entry((projection, route.key))
                        .or_default()
                        .push((index, route.order));
                }
            }
        }
        let writes = documents
            .into_iter()
            .map(|((projection, key), items)| async move {
                let batch: Vec<_> = items.iter().map(|&(i, order)| (events[i], order)).collect();
                let written = self
                    .write(self.projections[projection].as_ref(), &key, &batch)
                    .await;
                (items, written)
            });
        for (items, written) in futures_util::future::join_all(writes).await {
            for (position, &(index, _)) in items.iter().enumerate() {
                let verdict = match &written {
                    Err(WriteError::Transient(reason)) => Verdict::Paused(reason.clone()),
                    Err(WriteError::Permanent(reason)) => Verdict::Failed(reason.clone()),
                    Ok(outcomes) => match &outcomes[position] {
                        Outcome::Applied => Verdict::Applied,
                        Outcome::Duplicate => Verdict::Duplicate,
                        Outcome::Refused(refused) => Verdict::Refused(refused.to_string()),
                        // Filled only part of a long gap: the next round goes on.
                        Outcome::Gap { .. } => Verdict::Paused("filling a long gap".into()),
                    },
                };
                verdicts[index] = verdicts[index].clone().max(verdict);
            }
        }
        verdicts
    }

    /// Reads, folds and writes one document with CAS until it sticks,
    /// traced as part of the first event's trace, linked to the others'.
    async fn write(
        &self,
        projection: &dyn AnyProjection,
        key: &str,
        events: &[(&ProjectedEvent, Order)],
    ) -> Result<Vec<Outcome>, WriteError> {
        let span = tracing::debug_span!(
            "write document",
            projection = projection.name(),
            key,
            events = events.len(),
        );
        if !span.is_disabled() {
            let mut traces = events.iter().filter_map(|(event, _)| event.trace);
            if let Some(first) = traces.next() {
                first.adopt(&span);
            }
            traces.for_each(|other| other.link(&span));
        }
        self.write_with_cas(projection, key, events)
            .instrument(span)
            .await
    }

    async fn write_with_cas(
        &self,
        projection: &dyn AnyProjection,
        key: &str,
        events: &[(&ProjectedEvent, Order)],
    ) -> Result<Vec<Outcome>, WriteError> {
        let context = |e: WriteError| match e {
            WriteError::Transient(m) => {
                WriteError::Transient(format!("{} {key}: {m}", projection.name()))
            }
            WriteError::Permanent(m) => {
                WriteError::Permanent(format!("{} {key}: {m}", projection.name()))
            }
        };
        let generation = self
            .generation(projection.name())
            .await
            .map_err(WriteError::document)
            .map_err(context)?;
        let Some(generation) = generation else {
            return Ok(vec![Outcome::Duplicate; events.len()]);
        };
        let stored = key_in(generation, key);
        for attempt in 0..=self.config.cas_retries {
            let current = self
                .store
                .get(&stored)
                .await
                .map_err(WriteError::document)
                .map_err(context)?;
            let body = current.as_ref().map(|d| d.body.as_slice());
            let folded = self
                .fold_filling_gaps(projection, key, body, events)
                .await
                .map_err(context)?;
            let Some(body) = folded.body else {
                return Ok(folded.outcomes);
            };
            let written = match &current {
                None => self.store.insert(&stored, &body).await.map(drop),
                Some(document) => self
                    .store
                    .replace(&stored, &body, document.cas)
                    .await
                    .map(drop),
            };
            match written {
                Ok(()) => return Ok(folded.outcomes),
                Err(
                    DocumentError::Exists(_)
                    | DocumentError::CasMismatch(_)
                    | DocumentError::NotFound(_),
                ) => {
                    ProjectorMetrics::add(&self.metrics.cas_conflicts, 1);
                    self.metrics.contention.lost_cas_race(&stored);
                    tracing::debug!(attempt, "lost a CAS race");
                    tokio::time::sleep(CAS_BACKOFF.pause(attempt)).await;
                }
                Err(error) => return Err(context(WriteError::document(error))),
            }
        }
        Err(context(WriteError::Transient(format!(
            "still losing CAS races after {} tries",
            self.config.cas_retries + 1
        ))))
    }

    /// Folds `events` into `body`; where the document lacks events before
    /// them, reads those from the log and folds them in too.
    async fn fold_filling_gaps(
        &self,
        projection: &dyn AnyProjection,
        key: &str,
        body: Option<&[u8]>,
        events: &[(&ProjectedEvent, Order)],
    ) -> Result<super::Folded, WriteError> {
        let folded = guarded_fold(projection, key, body, events)?;
        // Per stream: the first version missing, and the newest one the batch has.
        let mut gaps: HashMap<&str, (u64, u64)> = HashMap::new();
        for ((event, _), outcome) in events.iter().zip(&folded.outcomes) {
            if let Outcome::Gap { missing_from } = *outcome {
                let gap = gaps.entry(&event.stream_id).or_insert((missing_from, 0));
                gap.1 = gap.1.max(event.version);
            }
        }
        if gaps.is_empty() {
            return Ok(folded);
        }
        let mut filled = Vec::new();
        for (stream, (from, before)) in gaps {
            let wanted = usize::try_from(before - from)
                .unwrap_or(usize::MAX)
                .min(MAX_GAP_FILL);
            let read = self
                .log
                .read_stream(stream, from, wanted)
                .await
                .map_err(WriteError::log)?;
            for recorded in read {
                let event = ProjectedEvent::from_recorded(recorded, &self.known)
                    .map_err(|poison| WriteError::Permanent(format!("in the log: {poison}")))?;
                filled.push(event);
            }
        }
        ProjectorMetrics::add(&self.metrics.gap_fills, filled.len() as u64);
        let mut all = events.to_vec();
        all.extend(filled.iter().map(|event| (event, Order::Sequence)));
        let mut refolded = guarded_fold(projection, key, body, &all)?;
        refolded.outcomes.truncate(events.len());
        Ok(refolded)
    }

    /// Acks, hands back or parks one delivery.
    async fn settle(&self, held: Held, verdict: Verdict) {
        let metrics = &self.metrics;
        match verdict {
            Verdict::Applied | Verdict::Duplicate => {
                let counter = if verdict == Verdict::Applied {
                    if let Ok(lag) = SystemTime::now().duration_since(held.event.occurred_at) {
                        let lag = u64::try_from(lag.as_millis()).unwrap_or(u64::MAX);
                        metrics
                            .lag_ms
                            .store(lag, std::sync::atomic::Ordering::Relaxed);
                    }
                    &metrics.handled
                } else {
                    &metrics.duplicates
                };
                ProjectorMetrics::add(counter, 1);
                if let Err(error) = held.delivery.ack().await {
                    // The bus will deliver it again; it will be a duplicate.
                    tracing::warn!(%error, "ack failed");
                }
            }
            Verdict::Refused(reason) => self.park(held.delivery, &reason).await,
            Verdict::Failed(reason) | Verdict::Paused(reason) => {
                self.hand_back(held.delivery, &reason).await;
            }
        }
    }

    /// Hands a delivery back for a later attempt (parked once out of attempts).
    async fn hand_back(&self, delivery: Delivery, reason: &str) {
        let counter = if delivery.is_last_attempt() {
            &self.metrics.parked
        } else {
            &self.metrics.retries
        };
        ProjectorMetrics::add(counter, 1);
        tracing::warn!(
            reason,
            attempt = delivery.attempt,
            "handing a delivery back"
        );
        if let Err(error) = delivery.retry(reason).await {
            tracing::warn!(%error, "could not hand a delivery back; the bus will redeliver it");
        }
    }

    async fn park(&self, delivery: Delivery, reason: &str) {
        ProjectorMetrics::add(&self.metrics.parked, 1);
        tracing::warn!(reason, message_id = %delivery.message.message_id, "parking poison");
        if let Err(error) = delivery.dead_letter(reason).await {
            tracing::warn!(%error, "could not park a delivery; the bus will redeliver it");
        }
    }

    /// Exponential from `backoff_min` to `backoff_max`, jittered.
    pub(super) fn backoff(&self, pauses: u32) -> Duration {
        Backoff::waiting(self.config.backoff_min, self.config.backoff_max).pause(pauses)
    }
}

/// The span of projecting `event`, continuing `carried` (the `traceparent`
/// its delivery carries, read only where spans are recorded) or else the
/// trace stored with it; `event` remembers the span for the writes it goes
/// into.
pub(super) fn projecting(event: &mut ProjectedEvent, carried: Option<&str>) -> tracing::Span {
    let span = tracing::debug_span!(
        "project",
        otel.kind = "consumer",
        stream = %event.stream_id,
        version = event.version,
    );
    if !span.is_disabled() {
        let parent = carried.and_then(|text| text.parse::<TraceParent>().ok());
        if let Some(parent) = parent.or(event.trace) {
            parent.adopt(&span);
        }
        event.trace = TraceParent::of_span(&span);
    }
    span
}

/// A projection's fold, with a panic in it (a bug in application code)
/// turned into a failure of this document rather than the end of the worker.
fn guarded_fold(
    projection: &dyn AnyProjection,
    key: &str,
    body: Option<&[u8]>,
    events: &[(&ProjectedEvent, Order)],
) -> Result<super::Folded, WriteError> {
    let folded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        projection.fold(key, body, events)
    }))
    .map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned());
        WriteError::Permanent(format!("the projection panicked: {message}"))
    })?;
    folded.map_err(|e| WriteError::Permanent(e.to_string()))
}
