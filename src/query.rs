//! Reading read models, and waiting for a version when the caller asks to
//! read its own write.
//!
//! Read models trail the event log. A caller that just wrote passes the
//! stream versions its commands returned; a read waits, polling with
//! backoff (pauses of a quarter of the wait so far, from 1 ms to
//! `MAX_POLL`, on grids every waiter shares),
//! until the document has applied
//! them (its `_applied` map), and
//! gives up at the deadline with [`QueryError::NotCaughtUp`] rather than
//! answer with a view that is older than what the caller knows happened.
//! Callers reading one document at the same moment share one read of it, so
//! many waiting on a hot document cost about what one does.
//!
//! A read goes to the projection's serving generation (see
//! [`generation`](crate::projection::generation)); a read model that has
//! never been built is waited for like a version, then reported as
//! [`QueryError::Building`]. Just after a switch, the generation that served
//! before is read beside the new one and the document that has applied more
//! answers, so a switch never shows an older view than the one before it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use serde::Deserialize;
use tokio::time::Instant;

use crate::documents::{DocumentError, DocumentStore};
use crate::projection::Projection;
use crate::projection::generation::{GenerationState, Generations, key_in, now_ms, progress};

/// The longest pause between two reads of a document a caller waits on: a
/// waiter costs at most 8 reads a second once the view is slow to catch up.
const MAX_POLL: Duration = Duration::from_millis(128);

/// The pause before a waiter's next read, `waited` after its first: a power
/// of two milliseconds, at most a quarter of `waited`, so the view is seen
/// at most a quarter later than it caught up (doubling pauses would see a
/// view that caught up at 17 ms only at 31 ms), while a waiter still reads
/// only about 4 times per doubling of its wait.
fn pause_after(waited: Duration) -> Duration {
    let quarter = (waited.as_millis() / 4).max(1);
    let power_of_two = 1u64 << quarter.ilog2();
    Duration::from_millis(power_of_two).min(MAX_POLL)
}

/// When a waiter reads next: the first point after now on a grid of
/// `pause` steps counted from one origin for the process, so that waiters
/// with the same pause wake together and share their reads (see
/// `Queries::snapshot`) however far apart they started; pauses are powers
/// of two, so a shorter pause's grid holds every point of a longer one's.
fn next_poll(pause: Duration) -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let step = pause.as_nanos().max(1);
    let steps = Instant::now().duration_since(origin).as_nanos() / step + 1;
    let since = u64::try_from(steps * step).unwrap_or(u64::MAX);
    origin + Duration::from_nanos(since)
}

/// Why a query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{kind} {id} does not exist")]
    NotFound { kind: &'static str, id: String },
    /// The view has not applied the wanted version by the deadline.
    #[error("{kind} {id} reflects {stream} up to version {current}, not yet {wanted}")]
    NotCaughtUp {
        kind: &'static str,
        id: String,
        stream: String,
        wanted: u64,
        current: u64,
    },
    #[error(transparent)]
    Store(#[from] DocumentError),
    /// The read model has never been built: its first build from the log
    /// is under way (or waits for a projector to run it).
    #[error("the {projection} read model is being built from the event log{progress}")]
    Building {
        projection: &'static str,
        /// How far the build is, when known (", at position N, head M").
        progress: String,
    },
    /// A stored document that does not parse: a bug, not the caller's.
    #[error("{kind} {id} is stored in a shape this version cannot read: {reason}")]
    Corrupt {
        kind: &'static str,
        id: String,
        reason: String,
    },
}

/// The versions a document has applied, read beside its view.
#[derive(Deserialize)]
struct Applied {
    #[serde(rename = "_applied", default)]
    applied: BTreeMap<String, u64>,
}

/// A document as one read found it, with the versions it has applied.
#[derive(Debug)]
struct Snapshot {
    body: Vec<u8>,
    /// `Err` with the reason when the document does not parse.
    applied: Result<BTreeMap<String, u64>, String>,
}

type SharedRead = Shared<BoxFuture<'static, Result<Option<Arc<Snapshot>>, DocumentError>>>;

/// Reads of read models, shared by an application's queries.
#[derive(Debug, Clone)]
pub struct Queries {
    documents: Arc<dyn DocumentStore>,
    generations: Generations,
    /// Reads under way, by key: a caller that asks for a document while it
    /// is being read shares that read instead of starting another, so many
    /// callers waiting on one hot document cost the reads of one. An entry
    /// lives as long as its read.
    in_flight: Arc<Mutex<HashMap<String, SharedRead>>>,
}

impl Queries {
    pub fn new(documents: Arc<dyn DocumentStore>) -> Self {
        Self {
            generations: Generations::new(Arc::clone(&documents)),
            documents,
            in_flight: Arc::default(),
        }
    }

    /// The document at `key` in the serving generation; during a handover,
    /// whichever of it and the previous generation's has applied more.
    async fn freshest(
        &self,
        key: &str,
        serving: u32,
        state: &GenerationState,
    ) -> Result<Option<Arc<Snapshot>>, DocumentError> {
        let current = self.snapshot(&key_in(serving, key)).await?;
        let Some(previous) = state.handing_over(now_ms()) else {
            return Ok(current);
        };
        let before = self.snapshot(&key_in(previous, key)).await?;
        let ahead = |a: &Snapshot, b: &Snapshot| match (&a.applied, &b.applied) {
            (Ok(a), Ok(b)) => a
                .iter()
                .any(|(stream, v)| b.get(stream).is_none_or(|w| v > w)),
            _ => false,
        };
        Ok(match (current, before) {
            (None, before) => before,
            (Some(current), Some(before)) if ahead(&before, &current) => Some(before),
            (current, _) => current,
        })
    }

    /// The document at `key`, read once for every caller asking meanwhile.
    async fn snapshot(&self, key: &str) -> Result<Option<Arc<Snapshot>>, DocumentError> {
        let read = self
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(key.to_owned())
            .or_insert_with(|| {
                let (documents, in_flight, key) = (
                    Arc::clone(&self.documents),
                    Arc::clone(&self.in_flight),
                    key.to_owned(),
                );
                async move {
                    let read = documents.get(&key).await;
                    in_flight
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .remove(&key);
                    Ok(read?.map(|document| {
                        let applied = serde_json::from_slice::<Applied>(&document.body)
                            .map(|a| a.applied)
                            .map_err(|e| e.to_string());
                        Arc::new(Snapshot {
                            body: document.body,
                            applied,
                        })
                    }))
                }
                .boxed()
                .shared()
            })
            .clone();
        read.await
    }

    /// Reads `P`'s document at `key` once it has applied every `wanted`
    /// (stream, version), waiting until `deadline` at most. `kind` and `id`
    /// name it in errors (`NotFound`, `NotCaughtUp`).
    #[tracing::instrument(level = "debug", name = "read view", skip_all, fields(projection = P::NAME, key))]
    pub async fn read<P: Projection>(
        &self,
        kind: &'static str,
        id: &str,
        key: &str,
        wanted: &[(String, u64)],
        deadline: Instant,
    ) -> Result<P::View, QueryError> {
        let started = Instant::now();
        loop {
            let state = self.generations.state(P::NAME).await?;
            let Some(serving) = state.serving else {
                if Instant::now() >= deadline {
                    let progress = state
                        .building
                        .as_ref()
                        .map(|b| format!(", {}", progress(b.next_position, b.head)))
                        .unwrap_or_default();
                    return Err(QueryError::Building {
                        projection: P::NAME,
                        progress,
                    });
                }
                let pause = pause_after(started.elapsed());
                tokio::time::sleep_until(next_poll(pause).min(deadline)).await;
                continue;
            };
            let document = self.freshest(key, serving, &state).await?;
            let corrupt = |reason: String| QueryError::Corrupt {
                kind,
                id: id.to_owned(),
                reason,
            };
            let applied = match &document {
                Some(d) => d.applied.as_ref().map_err(|e| corrupt(e.clone()))?,
                None => &BTreeMap::new(),
            };
            let behind = wanted
                .iter()
                .find(|(stream, version)| applied.get(stream).copied().unwrap_or(0) < *version);
            match (behind, &document) {
                (None, Some(document)) => {
                    return serde_json::from_slice(&document.body)
                        .map_err(|e| corrupt(e.to_string()));
                }
                (None, None) => {
                    return Err(QueryError::NotFound {
                        kind,
                        id: id.to_owned(),
                    });
                }
                (Some((stream, version)), _) if Instant::now() >= deadline => {
                    return Err(QueryError::NotCaughtUp {
                        kind,
                        id: id.to_owned(),
                        stream: stream.clone(),
                        wanted: *version,
                        current: applied.get(stream).copied().unwrap_or(0),
                    });
                }
                (Some((stream, version)), _) => {
                    tracing::debug!(stream, version, "the view is behind; waiting");
                    // One last read at the deadline, not a pause early.
                    let pause = pause_after(started.elapsed());
                    tokio::time::sleep_until(next_poll(pause).min(deadline)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiter_pauses_a_power_of_two_at_most_a_quarter_of_its_wait() {
        let ms = Duration::from_millis;
        for (waited, pause) in [
            (0, 1),
            (7, 1),
            (8, 2),
            (17, 4),
            (31, 4),
            (32, 8),
            (100, 16),
            (511, 64),
            (512, 128),
            (60_000, 128),
        ] {
            assert_eq!(pause_after(ms(waited)), ms(pause), "after {waited} ms");
        }
    }
}
