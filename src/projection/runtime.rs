//! The projection runtime: takes deliveries off the bus, folds them into
//! their documents with CAS, and settles each delivery by what became of it.
//!
//! A worker takes what has arrived (up to a batch), groups the events by the
//! document they change, and writes each document once: read it with its
//! CAS, fold every event of the batch into it, write it back (insert when
//! missing). A lost race reads and folds again, bounded, with jitter. Then
//! each delivery is settled:
//!
//! | what happened to it | settled |
//! | --- | --- |
//! | applied (or applied before) everywhere | ack |
//! | an earlier event of its stream is missing | held and tried again, backing off, up to `gap_patience`; then handed back |
//! | the store failed or CAS kept losing | handed back to the bus (counts as an attempt) |
//! | it does not decode, or its type is unknown | parked at once |
//!
//! Holding a gap in the worker rather than handing it back keeps it from
//! spending its bus attempts while it only waits for its turn.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metrics::ProjectorMetrics;
use super::{AnyProjection, Order, Outcome, ProjectedEvent};
use crate::bus::{Delivery, Subscriber};
use crate::documents::{DocumentError, DocumentStore};

/// How a projector worker paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectorConfig {
    /// Most deliveries folded together; match the subscription's prefetch.
    pub batch: usize,
    /// Reads and folds of one document after lost CAS races before the
    /// deliveries are handed back.
    pub cas_retries: u32,
    /// How long a delivery waits for an earlier event of its stream before
    /// it is handed back to the bus.
    pub gap_patience: Duration,
    pub writes: Writes,
}

/// How documents are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Writes {
    /// Read with CAS, fold with version checks, write back with the CAS.
    #[default]
    Checked,
    /// Deliberately wrong, for tests only: apply without version checks and
    /// overwrite whatever is there (a GET then SET). It loses updates under
    /// concurrency and counts redeliveries twice, which is how a test shows
    /// that its harness can tell.
    NaiveGetSet,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch: 100,
            cas_retries: 64,
            gap_patience: Duration::from_secs(2),
            writes: Writes::Checked,
        }
    }
}

/// Projects deliveries into documents.
#[derive(Clone)]
pub struct Projector {
    store: Arc<dyn DocumentStore>,
    projections: Arc<[Box<dyn AnyProjection>]>,
    metrics: Arc<ProjectorMetrics>,
    config: ProjectorConfig,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.projections.iter().map(|p| p.name()).collect();
        f.debug_struct("Projector")
            .field("store", &self.store)
            .field("projections", &names)
            .field("config", &self.config)
            .finish()
    }
}

/// A decoded delivery being worked on.
struct Held {
    delivery: Delivery,
    event: ProjectedEvent,
    /// When it first found a gap, if it has.
    waiting_since: Option<Instant>,
    /// When to try it again.
    due: Instant,
    waits: u32,
}

/// What a delivery's documents made of it.
enum Verdict {
    Applied,
    Duplicate,
    Gap,
    Failed(String),
}

impl Projector {
    pub fn new(
        store: Arc<dyn DocumentStore>,
        projections: Vec<Box<dyn AnyProjection>>,
        metrics: Arc<ProjectorMetrics>,
        config: ProjectorConfig,
    ) -> Self {
        Self {
            store,
            projections: projections.into(),
            metrics,
            config,
        }
    }

    pub fn metrics(&self) -> &Arc<ProjectorMetrics> {
        &self.metrics
    }

    /// Projects from `subscriber` until `stopping` is cancelled. Deliveries
    /// still held then are dropped unsettled, which hands them back.
    pub async fn run(&self, mut subscriber: Box<dyn Subscriber>, stopping: CancellationToken) {
        let mut held: Vec<Held> = Vec::new();
        loop {
            let next_due = held.iter().map(|h| h.due).min();
            let first = tokio::select! {
                () = stopping.cancelled() => break,
                delivery = subscriber.next() => match delivery {
                    Some(delivery) => Some(delivery),
                    None => break,
                },
                () = sleep_until(next_due), if next_due.is_some() => None,
            };
            let mut fresh: Vec<Delivery> = first.into_iter().collect();
            while fresh.len() + held.len() < self.config.batch {
                match subscriber.next().now_or_never() {
                    Some(Some(delivery)) => fresh.push(delivery),
                    _ => break,
                }
            }
            let now = Instant::now();
            let (due, later): (Vec<Held>, Vec<Held>) = held.into_iter().partition(|h| h.due <= now);
            held = later;
            let mut work = due;
            for delivery in fresh {
                match ProjectedEvent::decode(&delivery.message) {
                    Ok(event) => work.push(Held {
                        delivery,
                        event,
                        waiting_since: None,
                        due: now,
                        waits: 0,
                    }),
                    Err(poison) => self.park(delivery, &poison.to_string()).await,
                }
            }
            if !work.is_empty() {
                held.extend(self.project(work).await);
            }
        }
    }

    /// Folds `work` into its documents and settles what is done; returns
    /// the deliveries that wait for a gap.
    async fn project(&self, work: Vec<Held>) -> Vec<Held> {
        let mut documents: HashMap<(usize, String), Vec<(usize, Order)>> = HashMap::new();
        for (index, held) in work.iter().enumerate() {
            for (projection, p) in self.projections.iter().enumerate() {
                for route in p.routes(&held.event) {
                    documents
                        .entry((projection, route.key))
                        .or_default()
                        .push((index, route.order));
                }
            }
        }
        let writes = documents.into_iter().map(|((projection, key), items)| {
            let work = &work;
            async move {
                let events: Vec<_> = items
                    .iter()
                    .map(|&(i, order)| (&work[i].event, order))
                    .collect();
                let written = self
                    .write(self.projections[projection].as_ref(), &key, &events)
                    .await;
                (items, written)
            }
        });
        let mut verdicts: Vec<Verdict> = work.iter().map(|_| Verdict::Duplicate).collect();
        for (items, written) in futures_util::future::join_all(writes).await {
            for (position, &(index, _)) in items.iter().enumerate() {
                let verdict = &mut verdicts[index];
                match &written {
                    Err(reason) => *verdict = Verdict::Failed(reason.clone()),
                    Ok(outcomes) => match (&*verdict, outcomes[position]) {
                        (Verdict::Failed(_), _) | (_, Outcome::Duplicate) => {}
                        (_, Outcome::Gap) => *verdict = Verdict::Gap,
                        (Verdict::Gap, Outcome::Applied | Outcome::Deferred) => {}
                        (_, Outcome::Applied | Outcome::Deferred) => *verdict = Verdict::Applied,
                    },
                }
            }
        }
        let mut waiting = Vec::new();
        for (held, verdict) in work.into_iter().zip(verdicts) {
            if let Some(held) = self.settle(held, verdict).await {
                waiting.push(held);
            }
        }
        waiting
    }

    /// Reads, folds and writes one document with CAS until it sticks.
    async fn write(
        &self,
        projection: &dyn AnyProjection,
        key: &str,
        events: &[(&ProjectedEvent, Order)],
    ) -> Result<Vec<Outcome>, String> {
        let failed = |e: &dyn std::fmt::Display| format!("{} {key}: {e}", projection.name());
        if self.config.writes == Writes::NaiveGetSet {
            return self
                .write_naively(projection, key, events)
                .await
                .map_err(|e| failed(&e));
        }
        for attempt in 0..=self.config.cas_retries {
            let current = self.store.get(key).await.map_err(|e| failed(&e))?;
            let folded = projection
                .fold(key, current.as_ref().map(|d| d.body.as_slice()), events)
                .map_err(|e| failed(&e))?;
            let Some(body) = folded.body else {
                return Ok(folded.outcomes);
            };
            let written = match &current {
                None => self.store.insert(key, &body).await.map(drop),
                Some(document) => self.store.replace(key, &body, document.cas).await.map(drop),
            };
            match written {
                Ok(()) => return Ok(folded.outcomes),
                Err(
                    DocumentError::Exists(_)
                    | DocumentError::CasMismatch(_)
                    | DocumentError::NotFound(_),
                ) => {
                    ProjectorMetrics::add(&self.metrics.cas_conflicts, 1);
                    let ceiling = 500u64 << attempt.min(7);
                    tokio::time::sleep(Duration::from_micros(fastrand::u64(0..=ceiling))).await;
                }
                Err(error) => return Err(failed(&error)),
            }
        }
        Err(failed(&format!(
            "still losing CAS races after {} tries",
            self.config.cas_retries + 1
        )))
    }

    /// GET, apply, SET: the body written is the one folded from the first
    /// read, whatever was written since (see [`Writes::NaiveGetSet`]).
    async fn write_naively(
        &self,
        projection: &dyn AnyProjection,
        key: &str,
        events: &[(&ProjectedEvent, Order)],
    ) -> Result<Vec<Outcome>, Box<dyn std::error::Error + Send + Sync>> {
        let current = self.store.get(key).await?;
        let folded =
            projection.fold_unchecked(key, current.as_ref().map(|d| d.body.as_slice()), events)?;
        let body = folded.body.unwrap_or_default();
        let mut cas = current.map(|d| d.cas);
        loop {
            // The port has no blind write: emulate SET with the latest CAS.
            let written = match cas {
                None => self.store.insert(key, &body).await.map(drop),
                Some(cas) => self.store.replace(key, &body, cas).await.map(drop),
            };
            match written {
                Err(
                    DocumentError::Exists(_)
                    | DocumentError::CasMismatch(_)
                    | DocumentError::NotFound(_),
                ) => {
                    cas = self.store.get(key).await?.map(|d| d.cas);
                }
                other => {
                    other?;
                    return Ok(folded.outcomes);
                }
            }
        }
    }

    /// Acks, holds, hands back or parks one delivery; returns it if held.
    async fn settle(&self, mut held: Held, verdict: Verdict) -> Option<Held> {
        let metrics = &self.metrics;
        match verdict {
            Verdict::Applied | Verdict::Duplicate => {
                let counter = if matches!(verdict, Verdict::Applied) {
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
                None
            }
            Verdict::Gap => {
                let now = Instant::now();
                let since = *held.waiting_since.get_or_insert(now);
                if now.duration_since(since) < self.config.gap_patience {
                    ProjectorMetrics::add(&metrics.gap_waits, 1);
                    held.due = now + Duration::from_millis(2 << held.waits.min(5));
                    held.waits += 1;
                    return Some(held);
                }
                let reason = format!(
                    "waited {:?} for the events of {} before version {}",
                    self.config.gap_patience, held.event.stream_id, held.event.version
                );
                self.hand_back(held.delivery, &reason).await;
                None
            }
            Verdict::Failed(reason) => {
                self.hand_back(held.delivery, &reason).await;
                None
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
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
