//! Folding events into a stored document, with the per-stream bookkeeping
//! that makes duplicates and gaps visible.
//!
//! An event that arrives before an earlier one of its stream is kept in the
//! document (`_pending`) and applied the moment its predecessor is. So a
//! delivery is settled as soon as its document is written, whatever order
//! competing instances see events in, and waiting for a gap never ties up a
//! consumer's prefetch or spends its delivery attempts.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use super::{Order, ProjectedEvent, Projection, Route};

/// Events kept per stream before the document refuses more and lets the
/// delivery wait instead (its predecessor is missing for a long while).
const MAX_PENDING: usize = 1000;

/// What a document looks like at rest: the view's own fields, plus the last
/// version applied of every stream that fed it and the events that arrived
/// ahead of their turn (base64 envelopes by version).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored<V> {
    #[serde(flatten)]
    view: V,
    #[serde(rename = "_applied", default)]
    applied: BTreeMap<String, u64>,
    #[serde(
        rename = "_pending",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pending: BTreeMap<String, BTreeMap<u64, String>>,
}

/// What became of one event for one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Applied (or kept) before: skip it.
    Duplicate,
    /// Ahead of its turn: kept in the document, applied with its predecessor.
    Deferred,
    /// Ahead of its turn and the document keeps no more: wait, then retry.
    Gap,
}

/// The result of folding events into a document.
#[derive(Debug)]
pub struct Folded {
    /// The new body, or `None` when nothing was applied.
    pub body: Option<Vec<u8>>,
    /// One outcome per event, in the order given.
    pub outcomes: Vec<Outcome>,
}

/// A projection with its view type erased, so one runtime runs them all.
pub trait AnyProjection: Send + Sync {
    fn name(&self) -> &'static str;
    fn routes(&self, event: &ProjectedEvent) -> Vec<Route>;
    /// Folds `events` (any order, each with how it lines up) into the
    /// document `body` (`None`: missing).
    fn fold(
        &self,
        key: &str,
        body: Option<&[u8]>,
        events: &[(&ProjectedEvent, Order)],
    ) -> Result<Folded, serde_json::Error>;

    /// Applies `events` as they come, with no version checks: what a naive
    /// projector does. Only for showing what [`AnyProjection::fold`] prevents.
    fn fold_unchecked(
        &self,
        key: &str,
        body: Option<&[u8]>,
        events: &[(&ProjectedEvent, Order)],
    ) -> Result<Folded, serde_json::Error>;
}

/// Applies the kept events of `stream` that are now next in line.
fn apply_pending<P: Projection>(
    projection: &P,
    key: &str,
    stored: &mut Stored<P::View>,
    stream: &str,
) {
    let Some(pending) = stored.pending.get_mut(stream) else {
        return;
    };
    let mut last = stored.applied.get(stream).copied().unwrap_or(0);
    while let Some(kept) = pending.remove(&(last + 1)) {
        // A kept event decoded once already; one that no longer does is
        // skipped rather than wedging its stream.
        let bytes = BASE64.decode(kept).ok();
        match bytes.and_then(|b| ProjectedEvent::from_envelope(&b).ok()) {
            Some(event) => projection.apply(key, &mut stored.view, &event),
            None => tracing::error!(
                key,
                stream,
                version = last + 1,
                "skipping an undecodable kept event"
            ),
        }
        last += 1;
    }
    stored.applied.insert(stream.to_owned(), last);
    if pending.is_empty() {
        stored.pending.remove(stream);
    }
}

impl<P: Projection> AnyProjection for P {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn routes(&self, event: &ProjectedEvent) -> Vec<Route> {
        Projection::routes(self, event)
    }

    fn fold(
        &self,
        key: &str,
        body: Option<&[u8]>,
        events: &[(&ProjectedEvent, Order)],
    ) -> Result<Folded, serde_json::Error> {
        let mut stored: Stored<P::View> = body
            .map(serde_json::from_slice)
            .transpose()?
            .unwrap_or_default();
        let mut order: Vec<usize> = (0..events.len()).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (events[a].0, events[b].0);
            (&a.stream_id, a.version).cmp(&(&b.stream_id, b.version))
        });
        let mut outcomes = vec![Outcome::Gap; events.len()];
        let mut changed = false;
        for index in order {
            let (event, line_up) = events[index];
            let stream = &event.stream_id;
            let last = stored.applied.get(stream).copied().unwrap_or(0);
            let pending = stored.pending.get(stream);
            let kept = pending.is_some_and(|p| p.contains_key(&event.version));
            outcomes[index] = if event.version <= last || kept {
                Outcome::Duplicate
            } else if event.version == last + 1 || line_up == Order::Latest {
                self.apply(key, &mut stored.view, event);
                stored.applied.insert(stream.clone(), event.version);
                apply_pending(self, key, &mut stored, stream);
                changed = true;
                Outcome::Applied
            } else if pending.map_or(0, BTreeMap::len) < MAX_PENDING {
                let envelope = BASE64.encode(&event.envelope);
                let pending = stored.pending.entry(stream.clone()).or_default();
                pending.insert(event.version, envelope);
                changed = true;
                Outcome::Deferred
            } else {
                Outcome::Gap
            };
        }
        let body = changed.then(|| serde_json::to_vec(&stored)).transpose()?;
        Ok(Folded { body, outcomes })
    }

    fn fold_unchecked(
        &self,
        key: &str,
        body: Option<&[u8]>,
        events: &[(&ProjectedEvent, Order)],
    ) -> Result<Folded, serde_json::Error> {
        let mut stored: Stored<P::View> = body
            .map(serde_json::from_slice)
            .transpose()?
            .unwrap_or_default();
        for (event, _) in events {
            self.apply(key, &mut stored.view, event);
        }
        Ok(Folded {
            body: Some(serde_json::to_vec(&stored)?),
            outcomes: vec![Outcome::Applied; events.len()],
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::bus::BusMessage;
    use crate::domain::{CounterEvent, DomainEvent};
    use crate::pb;
    use crate::projection::views::CounterProjection;
    use crate::store::{EventMetadata, RecordedEvent};

    /// An increment as a projector receives it: through a real envelope.
    fn increment(stream: &str, version: u64, amount: u64) -> ProjectedEvent {
        let event = CounterEvent::Incremented(pb::CounterIncremented {
            counter_id: "c".into(),
            amount,
        });
        let recorded = RecordedEvent {
            position: version,
            stream_id: stream.into(),
            stream_type: "counter".into(),
            version,
            event_id: uuid::Uuid::now_v7(),
            event_type: event.event_type(),
            payload: event.encode(),
            metadata: EventMetadata {
                occurred_at: SystemTime::now(),
                correlation_id: uuid::Uuid::now_v7(),
                causation_id: uuid::Uuid::now_v7(),
            },
            request_id: None,
        };
        ProjectedEvent::decode(&BusMessage::from_event(&recorded)).unwrap()
    }

    fn seq<'a>(events: &[&'a ProjectedEvent]) -> Vec<(&'a ProjectedEvent, Order)> {
        events.iter().map(|e| (*e, Order::Sequence)).collect()
    }

    fn count(body: &[u8]) -> u64 {
        serde_json::from_slice::<serde_json::Value>(body).unwrap()["count"]
            .as_u64()
            .unwrap()
    }

    #[test]
    fn events_apply_in_version_order_whatever_order_they_arrive_in() {
        let (v1, v2, v3) = (
            increment("counter-c", 1, 1),
            increment("counter-c", 2, 10),
            increment("counter-c", 3, 100),
        );
        let folded = CounterProjection
            .fold("counter::c", None, &seq(&[&v3, &v1, &v2]))
            .unwrap();
        assert_eq!(folded.outcomes, [Outcome::Applied; 3]);
        assert_eq!(count(&folded.body.unwrap()), 111);
    }

    #[test]
    fn duplicates_are_skipped_and_gaps_wait() {
        let first = CounterProjection
            .fold("counter::c", None, &seq(&[&increment("counter-c", 1, 5)]))
            .unwrap();
        let body = first.body.unwrap();
        let again = increment("counter-c", 1, 5);
        let ahead = increment("counter-c", 3, 7);
        let folded = CounterProjection
            .fold("counter::c", Some(&body), &seq(&[&again, &ahead]))
            .unwrap();
        assert_eq!(folded.outcomes, [Outcome::Duplicate, Outcome::Deferred]);
        let body = folded.body.expect("the early event is kept");
        let filled = CounterProjection
            .fold(
                "counter::c",
                Some(&body),
                &seq(&[&increment("counter-c", 2, 20)]),
            )
            .unwrap();
        assert_eq!(filled.outcomes, [Outcome::Applied]);
        let body = filled.body.unwrap();
        assert_eq!(
            count(&body),
            5 + 20 + 7,
            "the kept event applied with its predecessor"
        );
        let stored: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(stored["_applied"]["counter-c"], 3);
        assert!(stored.get("_pending").is_none(), "nothing left pending");
    }

    #[test]
    fn latest_order_lets_the_newest_version_win_without_gaps() {
        let late = increment("counter-c", 2, 10);
        let newest = increment("counter-c", 5, 1);
        let folded = CounterProjection
            .fold(
                "counter::c",
                None,
                &[(&newest, Order::Latest), (&late, Order::Latest)],
            )
            .unwrap();
        // Sorted by version: 2 applies (newer than nothing), then 5.
        assert_eq!(folded.outcomes, [Outcome::Applied, Outcome::Applied]);
        let body = folded.body.unwrap();
        let older = increment("counter-c", 4, 100);
        let again = CounterProjection
            .fold("counter::c", Some(&body), &[(&older, Order::Latest)])
            .unwrap();
        assert_eq!(
            again.outcomes,
            [Outcome::Duplicate],
            "older than what was applied"
        );
    }

    #[test]
    fn streams_are_tracked_separately() {
        let folded = CounterProjection
            .fold(
                "counter::c",
                None,
                &seq(&[&increment("counter-a", 1, 1), &increment("counter-b", 1, 2)]),
            )
            .unwrap();
        let body = folded.body.unwrap();
        let stored: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            stored["_applied"],
            serde_json::json!({"counter-a": 1, "counter-b": 1})
        );
    }
}
