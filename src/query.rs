//! Reading read models, and waiting for a version when the caller asks to
//! read its own write.
//!
//! Read models trail the event log. A caller that just wrote passes the
//! stream versions its commands returned; a read waits, polling with
//! backoff (1 ms doubling to `MAX_POLL`), until the document has applied
//! them (its `_applied` map), and
//! gives up at the deadline with [`QueryError::NotCaughtUp`] rather than
//! answer with a view that is older than what the caller knows happened.
//! Callers reading one document at the same moment share one read of it, so
//! many waiting on a hot document cost about what one does.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::documents::{DocumentError, DocumentStore};

/// The longest pause between two reads of a document a caller waits on:
/// a waiter costs at most 10 reads a second once the view is slow to catch
/// up, while one that is a few milliseconds behind is still read again
/// within them (the pauses double from 1 ms).
const MAX_POLL: Duration = Duration::from_millis(100);

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
    /// Reads under way, by key: a caller that asks for a document while it
    /// is being read shares that read instead of starting another, so many
    /// callers waiting on one hot document cost the reads of one. An entry
    /// lives as long as its read.
    in_flight: Arc<Mutex<HashMap<String, SharedRead>>>,
}

impl Queries {
    pub fn new(documents: Arc<dyn DocumentStore>) -> Self {
        Self {
            documents,
            in_flight: Arc::default(),
        }
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

    /// Reads the document at `key` as a `V` once it has applied every
    /// `wanted` (stream, version), waiting until `deadline` at most. `kind`
    /// and `id` name it in errors (`NotFound`, `NotCaughtUp`).
    pub async fn read<V: DeserializeOwned>(
        &self,
        kind: &'static str,
        id: &str,
        key: &str,
        wanted: &[(String, u64)],
        deadline: Instant,
    ) -> Result<V, QueryError> {
        let mut pause = Duration::from_millis(1);
        loop {
            let document = self.snapshot(key).await?;
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
                (Some(_), _) => {
                    // One last read at the deadline, not a pause early.
                    tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
                    pause = (pause * 2).min(MAX_POLL);
                }
            }
        }
    }
}
