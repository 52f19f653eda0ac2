//! Folding events into a stored document, with the per-stream bookkeeping
//! that makes duplicates and gaps visible.
//!
//! A document records the last version it applied of each stream that feeds
//! it. An event at or below that is a duplicate; one further ahead than the
//! next is a gap, which the runtime fills from the event log before it
//! writes, so a document never waits on a delivery that may never come.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Order, Poison, ProjectedEvent, Projection, Refused, Route, SourceEvent};
use crate::domain::Aggregate;

/// What a document looks like at rest: the view's own fields, plus the last
/// version applied of every stream that fed it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored<V> {
    #[serde(flatten)]
    view: V,
    #[serde(rename = "_applied", default)]
    applied: BTreeMap<String, u64>,
}

/// What became of one event for one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// The projection refused it (see [`Projection::apply`]): skipped, and
    /// counted as applied so the stream goes on; its delivery is parked.
    Refused(Refused),
    /// Applied before: skip it.
    Duplicate,
    /// Ahead of its turn: the document has applied its stream only up to
    /// `missing_from - 1`, so the events from `missing_from` on must be
    /// read from the log first.
    Gap {
        missing_from: u64,
    },
}

/// The result of folding events into a document.
#[derive(Debug)]
pub struct Folded {
    /// The new body, or `None` when nothing was applied.
    pub body: Option<Vec<u8>>,
    /// One outcome per event, in the order given.
    pub outcomes: Vec<Outcome>,
}

/// A projection with its types erased, so one runtime runs them all: it
/// decodes the events of its source's stream type itself.
pub trait AnyProjection: Send + Sync {
    fn name(&self) -> &'static str;

    /// The documents `event` changes; none when it is of another stream
    /// type. Poison when it is of this one and does not decode.
    fn routes(&self, event: &ProjectedEvent) -> Result<Vec<Route>, Poison>;

    /// Folds `events` (any order, each with how it lines up) into the
    /// document `body` (`None`: missing). Events behind a gap are not
    /// applied, and nothing after them in their stream is.
    fn fold(
        &self,
        key: &str,
        body: Option<&[u8]>,
        events: &[(&ProjectedEvent, Order)],
    ) -> Result<Folded, FoldError>;
}

/// Why a document could not be folded at all.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    #[error("unreadable document: {0}")]
    Document(#[from] serde_json::Error),
    #[error(transparent)]
    Event(#[from] Poison),
}

impl<P: Projection> AnyProjection for P {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn routes(&self, event: &ProjectedEvent) -> Result<Vec<Route>, Poison> {
        // The documents any of the events it reads as changes, each once.
        let mut routes: Vec<Route> = Vec::new();
        for part in typed::<P>(event)? {
            for route in Projection::routes(self, &part) {
                if !routes.iter().any(|r| r.key == route.key) {
                    routes.push(route);
                }
            }
        }
        Ok(routes)
    }

    fn fold(
        &self,
        key: &str,
        body: Option<&[u8]>,
        events: &[(&ProjectedEvent, Order)],
    ) -> Result<Folded, FoldError> {
        let mut stored: Stored<P::View> = body
            .map(serde_json::from_slice)
            .transpose()?
            .unwrap_or_default();
        let mut order: Vec<usize> = (0..events.len()).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (events[a].0, events[b].0);
            (&a.stream_id, a.version).cmp(&(&b.stream_id, b.version))
        });
        let mut outcomes = vec![Outcome::Duplicate; events.len()];
        let mut changed = false;
        for index in order {
            let (event, line_up) = events[index];
            let stream = &event.stream_id;
            let last = stored.applied.get(stream).copied().unwrap_or(0);
            outcomes[index] = if event.version <= last {
                Outcome::Duplicate
            } else if event.version == last + 1 || line_up == Order::Latest {
                // The events it reads as apply in turn, each refused on its
                // own; the version counts as applied once they all have.
                let mut outcome = Outcome::Applied;
                for part in typed::<P>(event)? {
                    if let Err(refused) = self.apply(key, &mut stored.view, &part)
                        && outcome == Outcome::Applied
                    {
                        outcome = Outcome::Refused(refused);
                    }
                }
                stored.applied.insert(stream.clone(), event.version);
                changed = true;
                outcome
            } else {
                Outcome::Gap {
                    missing_from: last + 1,
                }
            };
        }
        let body = changed.then(|| serde_json::to_vec(&stored)).transpose()?;
        Ok(Folded { body, outcomes })
    }
}

/// What `event` reads as, as events of `P`'s source; none when it is of
/// another stream type.
fn typed<P: Projection>(event: &ProjectedEvent) -> Result<Vec<SourceEvent<P>>, Poison> {
    event.typed(<P::Source as Aggregate>::STREAM_TYPE)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::bus::BusMessage;
    use crate::domain::{DomainError, DomainEvent, KnownTypes, UnknownEvent};
    use crate::projection::Event;
    use crate::store::{EventMetadata, RecordedEvent};

    /// A tally: the smallest aggregate with a total that can overflow.
    #[derive(Debug, Default)]
    struct Tally;

    #[derive(Debug, Clone, PartialEq)]
    struct Added(u64);

    impl DomainEvent for Added {
        fn event_type(&self) -> String {
            "test.Added".into()
        }
        fn encode(&self) -> Vec<u8> {
            self.0.to_be_bytes().to_vec()
        }
        fn decode(event_type: &str, payload: &[u8]) -> Result<Self, UnknownEvent> {
            let bytes = payload.try_into().map_err(|_| UnknownEvent {
                event_type: event_type.into(),
                reason: "not 8 bytes".into(),
            })?;
            Ok(Self(u64::from_be_bytes(bytes)))
        }
        fn types() -> Vec<String> {
            vec!["test.Added".into()]
        }
    }

    impl crate::domain::Aggregate for Tally {
        const STREAM_TYPE: &'static str = "tally";
        type Command = ();
        type Event = Added;
        fn decide(&self, _: &str, (): &()) -> Result<Vec<Added>, DomainError> {
            Ok(Vec::new())
        }
        fn apply(&mut self, _: Added) {}
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    struct Total {
        count: u64,
    }

    struct TallyProjection;

    impl Projection for TallyProjection {
        type Source = Tally;
        type View = Total;
        const NAME: &'static str = "tally";
        fn routes(&self, _: &Event<Added>) -> Vec<Route> {
            vec![Route::sequence("tally::c".into())]
        }
        fn apply(&self, _: &str, view: &mut Total, event: &Event<Added>) -> Result<(), Refused> {
            view.count = view
                .count
                .checked_add(event.payload.0)
                .ok_or_else(|| Refused(format!("adding {} overflows", event.payload.0)))?;
            Ok(())
        }
    }

    /// How the first release stored an addition made twice: one event,
    /// read now as two additions.
    #[derive(Clone, PartialEq, prost::Message)]
    struct AddedTwice {
        #[prost(uint64, tag = "1")]
        amount: u64,
    }

    impl prost::Name for AddedTwice {
        const NAME: &'static str = "AddedTwice";
        const PACKAGE: &'static str = "test.v0";
    }

    fn known() -> KnownTypes {
        KnownTypes::default()
            .with::<Tally>()
            .upcast(|old: AddedTwice| vec![Added(old.amount), Added(old.amount)])
    }

    /// An addition as a projector receives it: through a real envelope.
    fn increment(stream: &str, version: u64, amount: u64) -> ProjectedEvent {
        let added = Added(amount);
        delivered(stream, version, added.event_type(), added.encode())
    }

    fn delivered(
        stream: &str,
        version: u64,
        event_type: String,
        payload: Vec<u8>,
    ) -> ProjectedEvent {
        let recorded = RecordedEvent {
            position: version,
            stream_id: stream.into(),
            stream_type: "tally".into(),
            version,
            event_id: uuid::Uuid::now_v7(),
            event_type,
            payload,
            metadata: EventMetadata {
                occurred_at: SystemTime::now(),
                correlation_id: uuid::Uuid::now_v7(),
                causation_id: uuid::Uuid::now_v7(),
                actor: None,
                trace: None,
            },
            request_id: None,
        };
        ProjectedEvent::decode(&BusMessage::from_event(&recorded), &known()).unwrap()
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
        let folded = TallyProjection
            .fold("tally::c", None, &seq(&[&v3, &v1, &v2]))
            .unwrap();
        assert_eq!(folded.outcomes, vec![Outcome::Applied; 3]);
        assert_eq!(count(&folded.body.unwrap()), 111);
    }

    #[test]
    fn duplicates_are_skipped_and_gaps_name_what_is_missing() {
        let first = TallyProjection
            .fold("tally::c", None, &seq(&[&increment("counter-c", 1, 5)]))
            .unwrap();
        let body = first.body.unwrap();
        let again = increment("counter-c", 1, 5);
        let ahead = increment("counter-c", 3, 7);
        let folded = TallyProjection
            .fold("tally::c", Some(&body), &seq(&[&again, &ahead]))
            .unwrap();
        assert_eq!(
            folded.outcomes,
            [Outcome::Duplicate, Outcome::Gap { missing_from: 2 }]
        );
        assert!(folded.body.is_none(), "nothing applied, nothing to write");
        let filled = TallyProjection
            .fold(
                "tally::c",
                Some(&body),
                &seq(&[&ahead, &increment("counter-c", 2, 20)]),
            )
            .unwrap();
        assert_eq!(filled.outcomes, [Outcome::Applied, Outcome::Applied]);
        let body = filled.body.unwrap();
        assert_eq!(count(&body), 5 + 20 + 7);
        let stored: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(stored["_applied"]["counter-c"], 3);
    }

    #[test]
    fn latest_order_lets_the_newest_version_win_without_gaps() {
        let late = increment("counter-c", 2, 10);
        let newest = increment("counter-c", 5, 1);
        let folded = TallyProjection
            .fold(
                "tally::c",
                None,
                &[(&newest, Order::Latest), (&late, Order::Latest)],
            )
            .unwrap();
        // Sorted by version: 2 applies (newer than nothing), then 5.
        assert_eq!(folded.outcomes, [Outcome::Applied, Outcome::Applied]);
        let body = folded.body.unwrap();
        let older = increment("counter-c", 4, 100);
        let again = TallyProjection
            .fold("tally::c", Some(&body), &[(&older, Order::Latest)])
            .unwrap();
        assert_eq!(
            again.outcomes,
            [Outcome::Duplicate],
            "older than what was applied"
        );
    }

    #[test]
    fn an_increment_that_would_overflow_is_refused_and_skipped() {
        let (big, again, small) = (
            increment("counter-c", 1, 1 << 63),
            increment("counter-c", 2, 1 << 63),
            increment("counter-c", 3, 5),
        );
        let folded = TallyProjection
            .fold("tally::c", None, &seq(&[&big, &again, &small]))
            .unwrap();
        let [applied, refused, after] = &folded.outcomes[..] else {
            panic!("three outcomes: {:?}", folded.outcomes);
        };
        assert_eq!((applied, after), (&Outcome::Applied, &Outcome::Applied));
        assert!(
            matches!(refused, Outcome::Refused(reason) if reason.0.contains("overflows")),
            "{refused:?}"
        );
        let body = folded.body.unwrap();
        assert_eq!(count(&body), (1 << 63) + 5, "the refused event is skipped");
        let stored: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(stored["_applied"]["counter-c"], 3, "and the stream goes on");
    }

    #[test]
    fn streams_are_tracked_separately() {
        let folded = TallyProjection
            .fold(
                "tally::c",
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

    #[test]
    fn an_event_stored_in_an_old_shape_applies_as_what_it_reads_as_at_its_version() {
        let old = |version, amount| {
            delivered(
                "counter-c",
                version,
                "test.v0.AddedTwice".into(),
                prost::Message::encode_to_vec(&AddedTwice { amount }),
            )
        };
        let (first, split, after) = (
            increment("counter-c", 1, 1),
            old(2, 10),
            increment("counter-c", 3, 100),
        );
        assert_eq!(split.parts.len(), 2);
        assert_eq!(
            AnyProjection::routes(&TallyProjection, &split)
                .unwrap()
                .len(),
            1,
            "one document, routed once"
        );
        let folded = TallyProjection
            .fold("tally::c", None, &seq(&[&first, &split, &after]))
            .unwrap();
        assert_eq!(folded.outcomes, vec![Outcome::Applied; 3]);
        let body = folded.body.unwrap();
        assert_eq!(count(&body), 1 + 10 + 10 + 100);
        let again = TallyProjection
            .fold("tally::c", Some(&body), &seq(&[&split]))
            .unwrap();
        assert_eq!(
            again.outcomes,
            [Outcome::Duplicate],
            "both parts count as version 2"
        );
    }

    #[test]
    fn an_old_event_its_upcaster_cannot_read_is_poison_naming_where_it_sits() {
        let recorded = RecordedEvent {
            position: 7,
            stream_id: "counter-c".into(),
            stream_type: "tally".into(),
            version: 3,
            event_id: uuid::Uuid::now_v7(),
            event_type: "test.v0.AddedTwice".into(),
            payload: vec![0xff],
            metadata: EventMetadata {
                occurred_at: SystemTime::now(),
                correlation_id: uuid::Uuid::now_v7(),
                causation_id: uuid::Uuid::now_v7(),
                actor: None,
                trace: None,
            },
            request_id: None,
        };
        let poison = ProjectedEvent::from_recorded(recorded, &known()).unwrap_err();
        assert!(
            poison
                .0
                .contains("stream counter-c version 3 (log position 7)")
                && poison.0.contains("test.v0.AddedTwice")
                && poison.0.contains("upcaster"),
            "{poison}"
        );
    }
}
