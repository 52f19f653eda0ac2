//! Projecting straight from the event log, from a durable checkpoint.
//!
//! The embedded platform projects this way only: a crash at any instant
//! loses nothing, because the checkpoint (the next log position, kept in the
//! document store) is written only after the documents it covers, and
//! folding an event twice is a skipped duplicate. Beside a bus, the same
//! follower trails the live path by a settle delay and brings up to date any
//! document whose delivery was lost or parked and that nothing new has
//! touched since.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::ProjectedEvent;
use super::metrics::ProjectorMetrics;
use super::runtime::{Projector, Verdict};
use crate::documents::{DocumentError, DocumentStore};
use crate::log::Follower;
use crate::store::LogFilter;

/// How a projector follows the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowConfig {
    /// Names the checkpoint document (`_checkpoint::<name>`): followers with
    /// one name share it.
    pub name: String,
    /// How old an event must be before it is projected: zero when the log is
    /// the only path, a few seconds when it trails a bus that usually gets
    /// there first.
    pub settle_delay: Duration,
    /// How often to look for other processes' commits at the head.
    pub poll: Duration,
    /// Events read and folded at a time.
    pub page: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    next_position: u64,
}

impl FollowConfig {
    fn key(&self) -> String {
        checkpoint_key(&self.name)
    }
}

/// The key of the checkpoint of the followers named `name`.
pub(super) fn checkpoint_key(name: &str) -> String {
    format!("_checkpoint::{name}")
}

/// The next position stored under `key`; 1 (the start) when none is stored yet.
pub(super) async fn stored_checkpoint(
    store: &dyn DocumentStore,
    key: &str,
) -> Result<u64, DocumentError> {
    Ok(match store.get(key).await? {
        Some(document) => read_checkpoint(key, &document.body)?,
        None => 1,
    })
}

impl Projector {
    /// Projects the log from the stored checkpoint until `stopping` is
    /// cancelled, pausing with backoff while the log or the document store
    /// does not answer.
    pub async fn follow(&self, config: FollowConfig, stopping: CancellationToken) {
        let key = config.key();
        let Some(start) = self
            .retrying(&stopping, || stored_checkpoint(self.store.as_ref(), &key))
            .await
        else {
            return;
        };
        tracing::info!(checkpoint = %key, from = start, "following the event log");
        let mut follower = Follower::new(
            Arc::clone(&self.log),
            start,
            LogFilter::all(),
            config.page,
            config.poll,
        );
        let mut pauses = 0;
        loop {
            let step = tokio::select! {
                () = stopping.cancelled() => return,
                step = follower.next() => step,
            };
            let step = match step {
                Ok(step) => step,
                Err(error) => {
                    pauses += 1;
                    tracing::warn!(%error, "the event log does not answer; retrying");
                    if !self.pause(pauses, &stopping).await {
                        return;
                    }
                    continue;
                }
            };
            pauses = 0;
            let mut events = self.decode(step.events);
            // Open until the page is applied.
            let _projecting: Vec<tracing::Span> = events
                .iter_mut()
                .map(|event| super::runtime::projecting(event, None))
                .collect();
            if let Some(newest) = events.iter().map(|e| e.occurred_at).max()
                && !settle(newest, config.settle_delay, &stopping).await
            {
                return;
            }
            let refs: Vec<&ProjectedEvent> = events.iter().collect();
            // Stopping ends the page wherever it waits: the checkpoint is
            // not moved, so the next run folds it again (as duplicates).
            let applied = tokio::select! {
                () = stopping.cancelled() => false,
                applied = self.apply_all(&refs, &stopping) => applied,
            };
            if !applied {
                return;
            }
            let next = step.next_position;
            if self
                .retrying(&stopping, || self.save_checkpoint(&key, next))
                .await
                .is_none()
            {
                return;
            }
        }
    }

    /// Events that do not decode cannot be projected by this version of the
    /// application: counted and logged, never guessed at.
    fn decode(&self, recorded: Vec<crate::store::RecordedEvent>) -> Vec<ProjectedEvent> {
        recorded
            .into_iter()
            .filter_map(|event| {
                let position = event.position;
                match ProjectedEvent::from_recorded(event, &self.known) {
                    Ok(event) => Some(event),
                    Err(poison) => {
                        ProjectorMetrics::add(&self.metrics.parked, 1);
                        tracing::error!(
                            position,
                            %poison,
                            "an event in the log cannot be projected; skipping it"
                        );
                        None
                    }
                }
            })
            .collect()
    }

    /// Applies every event, retrying with backoff until each is applied or
    /// a duplicate; `false` if stopped first. A document that fails the
    /// same way every time stops the line here (there is no dead-letter
    /// queue to park it in), loudly, rather than skip an event.
    async fn apply_all(&self, events: &[&ProjectedEvent], stopping: &CancellationToken) -> bool {
        let mut pending: Vec<&ProjectedEvent> = events.to_vec();
        let mut pauses = 0;
        while !pending.is_empty() {
            let verdicts = self.verdicts(&pending).await;
            let mut again = Vec::new();
            for (event, verdict) in pending.into_iter().zip(verdicts) {
                match verdict {
                    Verdict::Applied => ProjectorMetrics::add(&self.metrics.log_applied, 1),
                    Verdict::Duplicate => ProjectorMetrics::add(&self.metrics.log_skipped, 1),
                    Verdict::Refused(reason) => {
                        ProjectorMetrics::add(&self.metrics.parked, 1);
                        tracing::error!(%reason, stream = %event.stream_id, version = event.version, "a projection refused an event; the views skip it");
                    }
                    Verdict::Failed(reason) | Verdict::Paused(reason) => {
                        if pauses == 0 {
                            tracing::warn!(%reason, stream = %event.stream_id, version = event.version, "cannot project yet; retrying");
                        }
                        again.push(event);
                    }
                }
            }
            pending = again;
            if !pending.is_empty() {
                pauses += 1;
                if !self.pause(pauses, stopping).await {
                    return false;
                }
            }
        }
        true
    }

    /// Sleeps the backoff for the `pauses`th pause in a row, counted as a
    /// paused worker meanwhile; `false` if stopped first.
    async fn pause(&self, pauses: u32, stopping: &CancellationToken) -> bool {
        let _paused = self.metrics.pause();
        tokio::select! {
            () = stopping.cancelled() => false,
            () = tokio::time::sleep(self.backoff(pauses)) => true,
        }
    }

    /// Runs `attempt` until it answers, pausing in between; `None` if stopped.
    async fn retrying<T, F, Fut>(&self, stopping: &CancellationToken, attempt: F) -> Option<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, DocumentError>>,
    {
        let mut pauses = 0;
        loop {
            match attempt().await {
                Ok(value) => return Some(value),
                Err(error) => {
                    pauses += 1;
                    tracing::warn!(%error, "cannot reach the checkpoint; retrying");
                    if !self.pause(pauses, stopping).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Moves the checkpoint forward to `next` (never back: another follower
    /// of the same name may be ahead).
    async fn save_checkpoint(&self, key: &str, next: u64) -> Result<(), DocumentError> {
        let body = serde_json::to_vec(&Checkpoint {
            next_position: next,
        })
        .map_err(|e| DocumentError::backend(e.to_string()).caused_by(e))?;
        loop {
            let written = match self.store.get(key).await? {
                Some(document) if read_checkpoint(key, &document.body)? >= next => return Ok(()),
                Some(document) => self.store.replace(key, &body, document.cas).await,
                None => self.store.insert(key, &body).await,
            };
            match written {
                Ok(_) => return Ok(()),
                Err(DocumentError::CasMismatch(_) | DocumentError::Exists(_)) => continue,
                Err(error) => return Err(error),
            }
        }
    }
}

fn read_checkpoint(key: &str, body: &[u8]) -> Result<u64, DocumentError> {
    serde_json::from_slice::<Checkpoint>(body)
        .map(|c| c.next_position)
        .map_err(|e| DocumentError::backend(format!("unreadable checkpoint {key}: {e}")))
}

/// Waits until an event that occurred at `occurred_at` is `delay` old;
/// `false` if stopped first.
async fn settle(occurred_at: SystemTime, delay: Duration, stopping: &CancellationToken) -> bool {
    let age = SystemTime::now()
        .duration_since(occurred_at)
        .unwrap_or_default();
    let Some(wait) = delay.checked_sub(age).filter(|w| !w.is_zero()) else {
        return true;
    };
    tokio::select! {
        () = stopping.cancelled() => false,
        () = tokio::time::sleep(wait) => true,
    }
}
