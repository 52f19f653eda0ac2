//! Verifying read models against the event log: fold the log in memory for
//! the projections, compare every document they produce with the stored
//! one, report the drift, and optionally repair it.
//!
//! The log is read up to the head as of the start; a stored document that
//! has applied a later event of one of its streams has moved on since, and
//! is not counted as drift. Documents are kept in memory while the log is
//! folded (one per key the projections route to), up to [`MAX_FOLD_BYTES`];
//! a read model larger than that is rebuilt, not verified.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use super::{AnyProjection, Poison, ProjectedEvent, generation};
use crate::documents::{DocumentError, DocumentStore};
use crate::domain::KnownTypes;
use crate::log::EventLog;
use crate::store::{LogFilter, StoreError};

/// Drifted documents named in a report; the count covers them all.
pub const MAX_REPORTED: usize = 20;

/// Events read from the log per page.
const PAGE: usize = 1000;

/// The most bytes of folded documents (keys and bodies) a verification
/// holds: it is reachable over gRPC, and must not take a process's memory.
pub const MAX_FOLD_BYTES: usize = 512 << 20;

/// One document that differs from the fold of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Drift {
    pub key: String,
    /// What the fold of the log gives.
    pub expected: Value,
    /// What is stored; `None` when the document is missing.
    pub actual: Option<Value>,
}

/// What a verification found (and repaired).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verification {
    /// Log events folded, up to the head as of the start.
    pub events: u64,
    /// Documents the fold produced and compared.
    pub documents: usize,
    /// Documents that differ from the fold.
    pub drifted: usize,
    /// The first [`MAX_REPORTED`] of them.
    pub examples: Vec<Drift>,
    /// Documents that had moved on past the head (not drift).
    pub moved_on: usize,
    /// Drifted documents written back as the fold gives them.
    pub repaired: usize,
    /// Events the application cannot read (skipped, as a projector does).
    pub unreadable: u64,
    /// Why, for the first [`MAX_REPORTED`] of them; each names the event's
    /// stream, version and log position.
    pub unreadable_examples: Vec<String>,
}

impl Verification {
    fn unreadable(&mut self, poison: Poison) {
        self.unreadable += 1;
        if self.unreadable_examples.len() < MAX_REPORTED {
            self.unreadable_examples.push(poison.0);
        }
    }
}

/// Why a verification could not finish.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("reading the event log: {0}")]
    Log(#[from] StoreError),
    #[error("reading or writing a document: {0}")]
    Document(#[from] DocumentError),
    #[error("folding {key}: {reason}")]
    Fold { key: String, reason: String },
    #[error(
        "the read models' documents pass {} MiB by event {events}: too large to verify in memory",
        MAX_FOLD_BYTES >> 20
    )]
    TooLarge { events: u64 },
}

/// Folds the whole log for `projections` and compares (and with `repair`,
/// rewrites) the documents in `documents`.
pub async fn verify(
    log: &dyn EventLog,
    documents: &dyn DocumentStore,
    known: &KnownTypes,
    projections: &[Box<dyn AnyProjection>],
    repair: bool,
) -> Result<Verification, VerifyError> {
    let mut report = Verification::default();
    // Each projection is compared in the generation its documents are
    // written to now (the serving one, else a first build's).
    let mut generations = Vec::with_capacity(projections.len());
    for projection in projections {
        let (state, _) = generation::load(documents, projection.name()).await?;
        generations.push(state.written().unwrap_or(1));
    }
    // Document (projection, key) → its body as folded so far.
    let mut folded: HashMap<(usize, String), Vec<u8>> = HashMap::new();
    let mut held = 0usize;
    let mut from = 1;
    let mut head = None;
    loop {
        let page = log.read_all(from, PAGE, &LogFilter::all()).await?;
        let head = *head.get_or_insert(page.head);
        for recorded in page.events.into_iter().filter(|e| e.position <= head) {
            report.events += 1;
            let event = match ProjectedEvent::from_recorded(recorded, known) {
                Ok(event) => event,
                Err(poison) => {
                    report.unreadable(poison);
                    continue;
                }
            };
            for (index, projection) in projections.iter().enumerate() {
                let routes = match projection.routes(&event) {
                    Ok(routes) => routes,
                    Err(poison) => {
                        report.unreadable(poison);
                        continue;
                    }
                };
                for route in routes {
                    let slot = (index, route.key);
                    let body = folded.get(&slot).map(Vec::as_slice);
                    let outcome = projection
                        .fold(&slot.1, body, &[(&event, route.order)])
                        .map_err(|e| VerifyError::Fold {
                            key: slot.1.clone(),
                            reason: e.to_string(),
                        })?;
                    if let Some(body) = outcome.body {
                        let key_len = slot.1.len();
                        held += key_len + body.len();
                        if let Some(old) = folded.insert(slot, body) {
                            held -= key_len + old.len();
                        }
                        if held > MAX_FOLD_BYTES {
                            return Err(VerifyError::TooLarge {
                                events: report.events,
                            });
                        }
                    }
                }
            }
        }
        from = page.next_position;
        if from > head {
            break;
        }
    }
    let mut keys: Vec<(usize, String)> = folded.keys().cloned().collect();
    keys.sort();
    for slot in keys {
        let expected_body = &folded[&slot];
        let key = &generation::key_in(generations[slot.0], &slot.1);
        report.documents += 1;
        let expected: Value = parse(key, expected_body)?;
        let stored = documents.get(key).await?;
        let actual = stored
            .as_ref()
            .map(|document| parse(key, &document.body))
            .transpose()?;
        if actual.as_ref() == Some(&expected) {
            continue;
        }
        if actual
            .as_ref()
            .is_some_and(|actual| moved_on(actual, &expected))
        {
            report.moved_on += 1;
            continue;
        }
        report.drifted += 1;
        if repair {
            let written = match &stored {
                None => documents.insert(key, expected_body).await.map(drop),
                Some(document) => documents
                    .replace(key, expected_body, document.cas)
                    .await
                    .map(drop),
            };
            match written {
                Ok(()) => report.repaired += 1,
                // Written meanwhile: a projector is on it; left as it is.
                Err(DocumentError::Exists(_) | DocumentError::CasMismatch(_)) => {}
                Err(error) => return Err(error.into()),
            }
        }
        if report.examples.len() < MAX_REPORTED {
            report.examples.push(Drift {
                key: key.clone(),
                expected,
                actual,
            });
        }
    }
    Ok(report)
}

fn parse(key: &str, body: &[u8]) -> Result<Value, VerifyError> {
    serde_json::from_slice(body).map_err(|e| VerifyError::Fold {
        key: key.to_owned(),
        reason: format!("not JSON: {e}"),
    })
}

/// Whether `actual` has applied an event of one of its streams that the
/// fold (up to the head as of the start) had not: it moved on, live.
fn moved_on(actual: &Value, expected: &Value) -> bool {
    let applied = |document: &Value| -> BTreeMap<String, u64> {
        document
            .get("_applied")
            .and_then(Value::as_object)
            .map(|streams| {
                streams
                    .iter()
                    .filter_map(|(stream, version)| Some((stream.clone(), version.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (actual, expected) = (applied(actual), applied(expected));
    actual
        .iter()
        .any(|(stream, version)| expected.get(stream).is_none_or(|folded| version > folded))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_document_that_applied_later_events_moved_on_and_is_not_drift() {
        let folded = json!({"count": 3, "_applied": {"counter-c": 3}});
        let ahead = json!({"count": 5, "_applied": {"counter-c": 4}});
        let behind = json!({"count": 1, "_applied": {"counter-c": 1}});
        let other_stream = json!({"count": 9, "_applied": {"counter-c": 3, "counter-d": 1}});
        assert!(moved_on(&ahead, &folded));
        assert!(moved_on(&other_stream, &folded));
        assert!(!moved_on(&behind, &folded));
        assert!(!moved_on(&json!({"count": 7}), &folded));
    }
}
