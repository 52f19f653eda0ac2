//! What a batch of appends does, decided once for every backend.
//!
//! A backend loads the current version of each stream in the batch and the
//! recorded results of its request ids, asks [`plan`], writes the planned
//! events in one transaction and answers each caller. Appends are decided in
//! arrival order against the state the earlier ones leave, so a batch is
//! equivalent to running its appends one after another, and one rejected
//! append never takes the others down with it, except the rest of its own
//! chain (see `EventStore::append_chain`).

use std::collections::HashMap;

use super::{AppendOutcome, AppendRequest, AppendResult, RecordedRequest, RequestId, StoreError};

/// The state a batch is decided against, as loaded inside the transaction.
#[derive(Debug, Default)]
pub(crate) struct BatchState {
    /// Current version per stream; a stream missing here is at version 0.
    pub versions: HashMap<String, u64>,
    /// What is already recorded for the request ids of the batch.
    pub requests: HashMap<RequestId, RecordedRequest>,
}

/// The decision for one append.
#[derive(Debug)]
pub(crate) enum Planned {
    /// Write the append's events with versions `first_version..=result.version`.
    Write {
        first_version: u64,
        result: AppendResult,
    },
    /// The request id is recorded already: write nothing, answer with this.
    Replay(AppendResult),
    /// Write nothing, answer with this error.
    Reject(StoreError),
}

impl Planned {
    /// The answer the caller gets once the batch has committed.
    pub fn into_outcome(self) -> Result<AppendOutcome, StoreError> {
        match self {
            Self::Write { result, .. } => Ok(AppendOutcome::Appended(result)),
            Self::Replay(result) => Ok(AppendOutcome::Replayed(result)),
            Self::Reject(error) => Err(error),
        }
    }
}

/// Decides every append of a batch of chains, in order, flattened. Once an
/// append of a chain is not written, the rest of the chain is refused: they
/// were decided on the state it would have left.
pub(crate) fn plan<'a>(
    chains: impl IntoIterator<Item = &'a [AppendRequest]>,
    mut state: BatchState,
) -> Vec<Planned> {
    let mut planned = Vec::new();
    for chain in chains {
        let mut broken = false;
        for request in chain {
            let decided = if broken {
                Planned::Reject(StoreError::WrongExpectedVersion {
                    stream: request.stream_id.clone(),
                    expected: request.expected,
                    actual: state.versions.get(&request.stream_id).copied().unwrap_or(0),
                })
            } else {
                plan_one(request, &mut state)
            };
            broken = !matches!(decided, Planned::Write { .. });
            planned.push(decided);
        }
    }
    planned
}

fn plan_one(request: &AppendRequest, state: &mut BatchState) -> Planned {
    if let Some(key) = request.request_key
        && let Some(first) = state.requests.get(&key.id)
    {
        return match first.clone().replay(key, &request.stream_id) {
            Ok(result) => Planned::Replay(result),
            Err(error) => Planned::Reject(error),
        };
    }
    let actual = state.versions.get(&request.stream_id).copied().unwrap_or(0);
    if !request.expected.accepts(actual) {
        return Planned::Reject(StoreError::WrongExpectedVersion {
            stream: request.stream_id.clone(),
            expected: request.expected,
            actual,
        });
    }
    let version = actual + request.events.len();
    state.versions.insert(request.stream_id.clone(), version);
    let result = AppendResult {
        stream_id: request.stream_id.clone(),
        version,
        event_ids: request
            .events
            .as_slice()
            .iter()
            .map(|event| event.event_id)
            .collect(),
    };
    if let Some(key) = request.request_key {
        state.requests.insert(
            key.id,
            RecordedRequest {
                result: result.clone(),
                fingerprint: Some(key.fingerprint),
            },
        );
    }
    Planned::Write {
        first_version: actual + 1,
        result,
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use uuid::Uuid;

    use super::*;
    use crate::store::{EventMetadata, ExpectedVersion, Fingerprint, NewEvent, RequestKey};

    fn append(stream: &str, expected: ExpectedVersion, events: usize) -> AppendRequest {
        let events: Vec<NewEvent> = (0..events)
            .map(|_| NewEvent {
                event_id: Uuid::now_v7(),
                event_type: "test.Event".into(),
                payload: vec![],
            })
            .collect();
        AppendRequest {
            stream_id: stream.into(),
            stream_type: "test".into(),
            expected,
            events: events.try_into().unwrap(),
            request_key: None,
            metadata: EventMetadata {
                occurred_at: SystemTime::now(),
                correlation_id: Uuid::now_v7(),
                causation_id: Uuid::now_v7(),
                actor: None,
                trace: None,
            },
        }
    }

    fn versions(planned: &[Planned]) -> Vec<Option<(u64, u64)>> {
        planned
            .iter()
            .map(|p| match p {
                Planned::Write {
                    first_version,
                    result,
                } => Some((*first_version, result.version)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn appends_in_one_batch_build_on_each_other() {
        let batch = [
            append("a", ExpectedVersion::NoStream, 2),
            append("a", ExpectedVersion::Exact(2), 1),
            append("a", ExpectedVersion::Any, 1),
            append("b", ExpectedVersion::Any, 1),
        ];
        let planned = plan(
            batch.iter().map(std::slice::from_ref),
            BatchState::default(),
        );
        assert_eq!(
            versions(&planned),
            [Some((1, 2)), Some((3, 3)), Some((4, 4)), Some((1, 1))]
        );
    }

    #[test]
    fn a_rejected_append_leaves_the_rest_of_the_batch_alone() {
        let batch = [
            append("a", ExpectedVersion::Exact(5), 1),
            append("a", ExpectedVersion::StreamExists, 1),
            append("a", ExpectedVersion::Any, 1),
        ];
        let mut state = BatchState::default();
        state.versions.insert("a".into(), 3);
        let planned = plan(batch.iter().map(std::slice::from_ref), state);
        assert!(matches!(
            &planned[0],
            Planned::Reject(StoreError::WrongExpectedVersion {
                expected: ExpectedVersion::Exact(5),
                actual: 3,
                ..
            })
        ));
        assert_eq!(versions(&planned[1..]), [Some((4, 4)), Some((5, 5))]);
    }

    #[test]
    fn a_request_key_seen_earlier_in_the_batch_replays() {
        let key = RequestKey {
            id: RequestId(Uuid::new_v4()),
            fingerprint: Fingerprint::of("test.Append", b"a"),
        };
        let mut first = append("a", ExpectedVersion::NoStream, 1);
        first.request_key = Some(key);
        let again = first.clone();
        let mut elsewhere = append("b", ExpectedVersion::Any, 1);
        elsewhere.request_key = Some(key);
        let mut different = append("a", ExpectedVersion::Any, 1);
        different.request_key = Some(RequestKey {
            fingerprint: Fingerprint::of("test.Append", b"other"),
            ..key
        });
        let batch = [first, again, elsewhere, different];
        let planned = plan(
            batch.iter().map(std::slice::from_ref),
            BatchState::default(),
        );
        let Planned::Write { result, .. } = &planned[0] else {
            panic!("first append should write: {planned:?}")
        };
        assert!(matches!(&planned[1], Planned::Replay(replayed) if replayed == result));
        for reused in &planned[2..] {
            assert!(matches!(
                reused,
                Planned::Reject(StoreError::RequestIdReused { first_stream, .. }) if first_stream == "a"
            ));
        }
    }

    #[test]
    fn a_request_recorded_without_a_fingerprint_replays_on_its_stream() {
        let id = RequestId(Uuid::new_v4());
        let mut state = BatchState::default();
        let recorded = AppendResult {
            stream_id: "a".into(),
            version: 1,
            event_ids: vec![Uuid::now_v7()],
        };
        state.requests.insert(
            id,
            RecordedRequest {
                result: recorded.clone(),
                fingerprint: None,
            },
        );
        let mut again = append("a", ExpectedVersion::Any, 1);
        again.request_key = Some(RequestKey {
            id,
            fingerprint: Fingerprint::of("test.Append", b"anything"),
        });
        let planned = plan([std::slice::from_ref(&again)], state);
        assert!(matches!(&planned[0], Planned::Replay(replayed) if *replayed == recorded));
    }

    #[test]
    fn a_chain_stops_at_its_first_append_not_written() {
        let chain = [
            append("a", ExpectedVersion::Exact(3), 1),
            append("a", ExpectedVersion::Exact(4), 2),
            append("a", ExpectedVersion::Exact(6), 1),
        ];
        let mut broken = chain.clone();
        broken[0].expected = ExpectedVersion::Exact(2);
        let mut state = BatchState::default();
        state.versions.insert("a".into(), 3);
        // A whole chain builds on itself; after a refusal nothing of it is
        // written, and a lone append behind it still is.
        let alone = [append("a", ExpectedVersion::Any, 1)];
        let planned = plan([&chain[..], &broken[..], &alone[..]], state);
        assert_eq!(
            versions(&planned),
            [
                Some((4, 4)),
                Some((5, 6)),
                Some((7, 7)),
                None,
                None,
                None,
                Some((8, 8))
            ]
        );
        for refused in &planned[3..6] {
            assert!(matches!(
                refused,
                Planned::Reject(StoreError::WrongExpectedVersion { actual: 7, .. })
            ));
        }
    }
}
