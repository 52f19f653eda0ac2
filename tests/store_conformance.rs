//! The event store's contract, run unchanged against every backend.
//!
//! Each case is an async fn taking a fresh store; `conformance!` turns every
//! case into one test per backend. The PostgreSQL tests need a server
//! (`SCALEOUT_TEST_POSTGRES_URL`, by default the local `scaleout` database):
//! without one they fail rather than skip.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use scaleout::store::postgres::{PostgresConfig, PostgresStore};
use scaleout::store::redb::RedbStore;
use scaleout::store::{
    AppendOutcome, AppendRequest, AppendResult, EventMetadata, EventStore, ExpectedVersion,
    Fingerprint, LogFilter, LogPage, NewEvent, RecordedEvent, RecordedRequest, RequestId,
    RequestKey, Snapshot, StoreError,
};
use tokio::sync::Barrier;
use uuid::Uuid;

use ExpectedVersion::{Any, Exact, NoStream, StreamExists};

// ---------------------------------------------------------------- helpers

/// An append of `events` fresh events to `stream`.
fn append(stream: &str, expected: ExpectedVersion, events: usize) -> AppendRequest {
    let events: Vec<NewEvent> = (0..events)
        .map(|n| NewEvent {
            event_id: Uuid::now_v7(),
            event_type: "test.Happened".into(),
            payload: format!("{stream} #{n}").into_bytes(),
        })
        .collect();
    AppendRequest {
        stream_id: stream.into(),
        stream_type: "test".into(),
        expected,
        events: events.try_into().expect("at least one event"),
        request_key: None,
        metadata: EventMetadata {
            // Whole microseconds: PostgreSQL keeps no finer time.
            occurred_at: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            correlation_id: Uuid::new_v4(),
            causation_id: Uuid::new_v4(),
            // Who sent it travels with every event.
            actor: Some("alice@example.test".into()),
            // And the trace that recorded it.
            trace: Some(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                    .parse()
                    .unwrap(),
            ),
        },
    }
}

/// The request under an idempotency key: the same `content` stands for the
/// same request (a retry), another for a different one.
fn with_key(mut request: AppendRequest, request_id: RequestId, content: &str) -> AppendRequest {
    request.request_key = Some(RequestKey {
        id: request_id,
        fingerprint: Fingerprint::of("test.Append", content.as_bytes()),
    });
    request
}

fn with_request_id(request: AppendRequest, request_id: RequestId) -> AppendRequest {
    with_key(request, request_id, "the request")
}

/// What a store should have recorded for an append under [`with_request_id`].
fn recorded(result: AppendResult) -> RecordedRequest {
    RecordedRequest {
        result,
        fingerprint: Some(Fingerprint::of("test.Append", b"the request")),
    }
}

fn event_ids(request: &AppendRequest) -> Vec<Uuid> {
    request
        .events
        .as_slice()
        .iter()
        .map(|e| e.event_id)
        .collect()
}

/// Sends `requests` at once, each from its own task, all released together;
/// their outcomes, in order.
async fn all_at_once(
    store: &Arc<dyn EventStore>,
    requests: Vec<AppendRequest>,
) -> Vec<Result<AppendOutcome, StoreError>> {
    let start = Arc::new(Barrier::new(requests.len()));
    let senders: Vec<_> = requests
        .into_iter()
        .map(|request| {
            let (store, start) = (Arc::clone(store), Arc::clone(&start));
            tokio::spawn(async move {
                start.wait().await;
                store.append(request).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for sender in senders {
        outcomes.push(sender.await.expect("sender task"));
    }
    outcomes
}

async fn appended(store: &dyn EventStore, request: AppendRequest) -> AppendResult {
    match store.append(request).await {
        Ok(AppendOutcome::Appended(result)) => result,
        other => panic!("expected the append to write, got {other:?}"),
    }
}

async fn assert_wrong_version(
    store: &dyn EventStore,
    request: AppendRequest,
    expected: ExpectedVersion,
    actual: u64,
) {
    let stream = request.stream_id.clone();
    match store.append(request).await {
        Err(StoreError::WrongExpectedVersion {
            stream: s,
            expected: e,
            actual: a,
        }) => assert_eq!((s, e, a), (stream, expected, actual)),
        other => panic!("expected WrongExpectedVersion, got {other:?}"),
    }
}

async fn read(store: &dyn EventStore, stream: &str) -> Vec<RecordedEvent> {
    store
        .read_stream(stream, 0, usize::MAX)
        .await
        .expect("read_stream")
}

fn versions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.version).collect()
}

fn assert_records(recorded: &[RecordedEvent], request: &AppendRequest, first_version: u64) {
    assert_eq!(recorded.len(), request.events.as_slice().len());
    for ((event, sent), version) in recorded
        .iter()
        .zip(request.events.as_slice())
        .zip(first_version..)
    {
        assert_eq!(event.stream_id, request.stream_id);
        assert_eq!(event.stream_type, request.stream_type);
        assert_eq!(event.version, version);
        assert_eq!(event.event_id, sent.event_id);
        assert_eq!(event.event_type, sent.event_type);
        assert_eq!(event.payload, sent.payload);
        assert_eq!(event.metadata, request.metadata);
        assert_eq!(event.request_id, request.request_key.map(|key| key.id));
    }
}

// ---------------------------------------------------------------- cases

async fn expected_any(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_eq!(appended(store, append("s", Any, 1)).await.version, 1);
    assert_eq!(appended(store, append("s", Any, 2)).await.version, 3);
    assert_eq!(versions(&read(store, "s").await), [1, 2, 3]);
}

async fn expected_no_stream(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_eq!(appended(store, append("s", NoStream, 2)).await.version, 2);
    assert_wrong_version(store, append("s", NoStream, 1), NoStream, 2).await;
    assert_eq!(versions(&read(store, "s").await), [1, 2]);
}

async fn expected_stream_exists(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_wrong_version(store, append("s", StreamExists, 1), StreamExists, 0).await;
    assert!(read(store, "s").await.is_empty());
    appended(store, append("s", Any, 1)).await;
    assert_eq!(
        appended(store, append("s", StreamExists, 1)).await.version,
        2
    );
}

async fn expected_exact(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_wrong_version(store, append("s", Exact(1), 1), Exact(1), 0).await;
    assert_eq!(appended(store, append("s", Exact(0), 2)).await.version, 2);
    assert_eq!(appended(store, append("s", Exact(2), 1)).await.version, 3);
    assert_wrong_version(store, append("s", Exact(2), 1), Exact(2), 3).await;
    assert_wrong_version(store, append("s", Exact(4), 1), Exact(4), 3).await;
    assert_eq!(versions(&read(store, "s").await), [1, 2, 3]);
}

async fn failed_append_leaves_nothing_behind(store: Arc<dyn EventStore>) {
    let store = &*store;
    appended(store, append("s", NoStream, 2)).await;
    let stream = read(store, "s").await;
    let outbox = store.read_outbox(0, 100).await.unwrap();
    let request_id = RequestId(Uuid::new_v4());

    let rejected = with_request_id(append("s", Exact(1), 3), request_id);
    assert_wrong_version(store, rejected, Exact(1), 2).await;
    assert_eq!(read(store, "s").await, stream);
    assert_eq!(store.read_outbox(0, 100).await.unwrap(), outbox);
    assert_eq!(store.find_request(request_id).await.unwrap(), None);

    // The next append continues where the stream was, and the request id is free.
    let next = with_request_id(append("s", Exact(2), 1), request_id);
    assert_eq!(appended(store, next).await.version, 3);
    assert_eq!(versions(&read(store, "s").await), [1, 2, 3]);
}

async fn multi_event_append_is_contiguous(store: Arc<dyn EventStore>) {
    let store = &*store;
    let first = append("s", NoStream, 5);
    let result = appended(store, first.clone()).await;
    assert_eq!(result.version, 5);
    assert_eq!(result.event_ids, event_ids(&first));

    let second = with_request_id(append("s", Exact(5), 3), RequestId(Uuid::new_v4()));
    assert_eq!(appended(store, second.clone()).await.version, 8);

    let events = read(store, "s").await;
    assert_records(&events[..5], &first, 1);
    assert_records(&events[5..], &second, 6);
    assert!(events.windows(2).all(|w| w[0].position < w[1].position));
}

async fn concurrent_any_appends_leave_no_gap(store: Arc<dyn EventStore>) {
    const WRITERS: usize = 16;
    const APPENDS: usize = 200;
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut results = Vec::with_capacity(APPENDS);
                for _ in 0..APPENDS {
                    results.push(appended(&*store, append("hot", Any, 1)).await);
                }
                results
            })
        })
        .collect();
    let mut answered = Vec::new();
    for writer in writers {
        answered.extend(writer.await.expect("writer task"));
    }
    let total = (WRITERS * APPENDS) as u64;

    let events = read(&*store, "hot").await;
    assert_eq!(versions(&events), (1..=total).collect::<Vec<_>>());
    let mut answered_versions: Vec<u64> = answered.iter().map(|r| r.version).collect();
    answered_versions.sort_unstable();
    assert_eq!(answered_versions, (1..=total).collect::<Vec<_>>());
    // Each answer names the event stored at its version.
    for result in &answered {
        assert_eq!(
            result.event_ids,
            [events[result.version as usize - 1].event_id]
        );
    }
}

async fn exact_race_has_one_winner(store: Arc<dyn EventStore>) {
    const WRITERS: usize = 16;
    appended(&*store, append("s", NoStream, 1)).await;
    let racers = (0..WRITERS).map(|_| append("s", Exact(1), 1)).collect();
    let mut winners = 0;
    for outcome in all_at_once(&store, racers).await {
        match outcome {
            Ok(AppendOutcome::Appended(result)) => {
                assert_eq!(result.version, 2);
                winners += 1;
            }
            Err(StoreError::WrongExpectedVersion {
                expected, actual, ..
            }) => assert_eq!((expected, actual), (Exact(1), 2)),
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(versions(&read(&*store, "s").await), [1, 2]);
}

async fn request_id_replays(store: Arc<dyn EventStore>) {
    let store = &*store;
    let request_id = RequestId(Uuid::new_v4());
    let first = appended(store, with_request_id(append("s", NoStream, 2), request_id)).await;
    assert_eq!(
        store.find_request(request_id).await.unwrap(),
        Some(recorded(first.clone()))
    );

    // A retry (fresh event ids, an expectation that no longer holds) writes nothing.
    let retry = with_request_id(append("s", NoStream, 2), request_id);
    assert_eq!(
        store.append(retry).await.unwrap(),
        AppendOutcome::Replayed(first.clone())
    );
    assert_eq!(versions(&read(store, "s").await), [1, 2]);
    assert_eq!(store.read_outbox(0, 100).await.unwrap().len(), 2);
    assert_eq!(
        store.find_request(RequestId(Uuid::new_v4())).await.unwrap(),
        None
    );
}

async fn concurrent_duplicates_append_once(store: Arc<dyn EventStore>) {
    const DUPLICATES: usize = 8;
    let request_id = RequestId(Uuid::new_v4());
    let duplicates = (0..DUPLICATES)
        .map(|_| with_request_id(append("s", Any, 1), request_id))
        .collect();
    let outcomes: Vec<_> = all_at_once(&store, duplicates)
        .await
        .into_iter()
        .map(|outcome| outcome.expect("append"))
        .collect();
    let written: Vec<_> = outcomes
        .iter()
        .filter(|o| matches!(o, AppendOutcome::Appended(_)))
        .collect();
    assert_eq!(written.len(), 1, "{outcomes:?}");
    let result = written[0].result();
    assert!(outcomes.iter().all(|o| o.result() == result));

    let events = read(&*store, "s").await;
    assert_eq!(versions(&events), [1]);
    assert_eq!(result.event_ids, [events[0].event_id]);
    assert_eq!(
        store.find_request(request_id).await.unwrap(),
        Some(recorded(result.clone()))
    );
}

async fn request_id_reused_on_another_stream(store: Arc<dyn EventStore>) {
    let store = &*store;
    let request_id = RequestId(Uuid::new_v4());
    let first = appended(store, with_request_id(append("a", Any, 1), request_id)).await;
    match store
        .append(with_request_id(append("b", Any, 1), request_id))
        .await
    {
        Err(StoreError::RequestIdReused {
            request_id: id,
            first_stream,
        }) => assert_eq!((id, first_stream.as_str()), (request_id, "a")),
        other => panic!("expected RequestIdReused, got {other:?}"),
    }
    assert!(read(store, "b").await.is_empty());
    assert_eq!(store.read_outbox(0, 100).await.unwrap().len(), 1);
    assert_eq!(
        store.find_request(request_id).await.unwrap(),
        Some(recorded(first))
    );
}

/// One id sent at once on many streams: one append is written, the others
/// are refused as a reuse, and write nothing (also where the streams commit
/// in different transactions: `postgres_one_request_id_across_writers_appends_once`).
async fn one_request_id_on_many_streams_at_once_appends_once(store: Arc<dyn EventStore>) {
    const STREAMS: usize = 8;
    let request_id = RequestId(Uuid::new_v4());
    let requests = (0..STREAMS)
        .map(|i| with_request_id(append(&format!("s{i}"), Any, 1), request_id))
        .collect();
    let mut written = Vec::new();
    for (i, outcome) in all_at_once(&store, requests).await.into_iter().enumerate() {
        match outcome {
            Ok(AppendOutcome::Appended(result)) => written.push((i, result)),
            Err(StoreError::RequestIdReused { request_id: id, .. }) => {
                assert_eq!(id, request_id);
            }
            other => panic!("expected one append and reuses, got {other:?}"),
        }
    }
    let [(first, result)] = written.as_slice() else {
        panic!("expected exactly one append, got {written:?}");
    };
    for i in 0..STREAMS {
        let events = read(&*store, &format!("s{i}")).await;
        assert_eq!(events.len(), usize::from(i == *first), "stream s{i}");
    }
    assert_eq!(store.read_outbox(0, 100).await.unwrap().len(), 1);
    assert_eq!(
        store.find_request(request_id).await.unwrap(),
        Some(recorded(result.clone()))
    );
}

async fn request_id_reused_for_a_different_request(store: Arc<dyn EventStore>) {
    let store = &*store;
    let request_id = RequestId(Uuid::new_v4());
    let first = appended(store, with_key(append("a", Any, 1), request_id, "create")).await;
    // The same stream, but another request: in a later batch, and in the same one.
    let later = store
        .append(with_key(append("a", Any, 1), request_id, "rename"))
        .await;
    let id = Uuid::new_v4();
    let (together, reused) = tokio::join!(
        store.append(with_key(append("b", Any, 1), RequestId(id), "create")),
        store.append(with_key(append("b", Any, 1), RequestId(id), "rename")),
    );
    for outcome in [later, reused] {
        assert!(
            matches!(outcome, Err(StoreError::RequestIdReused { .. })),
            "expected RequestIdReused, got {outcome:?}"
        );
    }
    together.expect("the first use of an id appends");
    assert_eq!(versions(&read(store, "a").await), [1]);
    assert_eq!(versions(&read(store, "b").await), [1]);
    assert_eq!(
        store.find_request(request_id).await.unwrap(),
        Some(RecordedRequest {
            result: first,
            fingerprint: Some(Fingerprint::of("test.Append", b"create")),
        })
    );
}

async fn outbox_matches_events(store: Arc<dyn EventStore>) {
    let store = &*store;
    let requests = [
        append("a", NoStream, 2),
        append("b", NoStream, 1),
        append("a", Exact(2), 3),
        append("c", Any, 1),
    ];
    for request in &requests {
        appended(store, request.clone()).await;
    }
    let outbox = store.read_outbox(0, 100).await.unwrap();
    // One row per event, in the order they were appended.
    let sent: Vec<Uuid> = requests.iter().flat_map(event_ids).collect();
    let listed: Vec<Uuid> = outbox.iter().map(|e| e.event_id).collect();
    assert_eq!(listed, sent);
    assert!(outbox.windows(2).all(|w| w[0].position < w[1].position));
    // Each row is the event as read_stream has it, position included.
    let mut stored: Vec<RecordedEvent> = Vec::new();
    for stream in ["a", "b", "c"] {
        stored.extend(read(store, stream).await);
    }
    stored.sort_by_key(|e| e.position);
    assert_eq!(outbox, stored);
    assert_eq!(store.read_outbox(0, 3).await.unwrap(), outbox[..3]);
    // Past a position: what a relay reads while earlier rows await confirms.
    let after = outbox[2].position;
    assert_eq!(store.read_outbox(after, 2).await.unwrap(), outbox[3..5]);
    let last = outbox.last().unwrap().position;
    assert!(store.read_outbox(last, 100).await.unwrap().is_empty());
    assert!(store.read_outbox(u64::MAX, 100).await.unwrap().is_empty());
}

async fn read_stream_from_a_version(store: Arc<dyn EventStore>) {
    let store = &*store;
    let request = append("s", NoStream, 5);
    appended(store, request.clone()).await;
    appended(store, append("s2", NoStream, 2)).await;
    appended(store, append("r", NoStream, 2)).await;

    let tail = store.read_stream("s", 3, usize::MAX).await.unwrap();
    assert_eq!(versions(&tail), [3, 4, 5]);
    assert_eq!(tail[0].event_id, event_ids(&request)[2]);
    assert_eq!(
        versions(&store.read_stream("s", 0, usize::MAX).await.unwrap()),
        [1, 2, 3, 4, 5]
    );
    assert!(
        store
            .read_stream("s", 6, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .read_stream("s", u64::MAX, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .read_stream("missing", 0, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    store.ping().await.expect("ping");
}

async fn read_stream_takes_a_limit(store: Arc<dyn EventStore>) {
    let store = &*store;
    appended(store, append("s", NoStream, 5)).await;
    let page = store.read_stream("s", 2, 2).await.unwrap();
    assert_eq!(versions(&page), [2, 3]);
    assert!(store.read_stream("s", 1, 0).await.unwrap().is_empty());
}

/// The whole log as one reader pages through it.
async fn read_everything(
    store: &dyn EventStore,
    filter: &LogFilter,
    limit: usize,
) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    let mut from = 0;
    loop {
        let page = store.read_all(from, limit, filter).await.expect("read_all");
        assert!(page.events.len() <= limit);
        assert!(page.next_position >= from);
        let caught_up = page.next_position > page.head;
        events.extend(page.events);
        from = page.next_position;
        if caught_up {
            return events;
        }
    }
}

fn positions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.position).collect()
}

async fn read_all_in_position_order(store: Arc<dyn EventStore>) {
    let store = &*store;
    let empty = store.read_all(0, 10, &LogFilter::all()).await.unwrap();
    assert_eq!(
        empty,
        LogPage {
            events: vec![],
            next_position: 1,
            head: 0
        }
    );

    let first = append("a", NoStream, 3);
    appended(store, first.clone()).await;
    appended(store, append("b", NoStream, 2)).await;
    appended(store, append("a", Exact(3), 1)).await;

    let all = read_everything(store, &LogFilter::all(), 2).await;
    assert_eq!(
        positions(&all),
        [1, 2, 3, 4, 5, 6],
        "dense, from 1, in commit order"
    );
    assert_records(&all[..3], &first, 1);
    let streams: Vec<_> = all
        .iter()
        .map(|e| (e.stream_id.as_str(), e.version))
        .collect();
    assert_eq!(
        streams,
        [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("a", 4)]
    );
    for stream in ["a", "b"] {
        let from_log: Vec<_> = all
            .iter()
            .filter(|e| e.stream_id == stream)
            .cloned()
            .collect();
        assert_eq!(
            read(store, stream).await,
            from_log,
            "the log holds what the stream holds"
        );
    }

    let page = store.read_all(3, 2, &LogFilter::all()).await.unwrap();
    assert_eq!(
        (positions(&page.events), page.next_position, page.head),
        (vec![3, 4], 5, 6)
    );
    let past = store.read_all(7, 10, &LogFilter::all()).await.unwrap();
    assert_eq!(
        past,
        LogPage {
            events: vec![],
            next_position: 7,
            head: 6
        },
        "past the end: empty, wait there"
    );
    let far = store.read_all(1_000, 10, &LogFilter::all()).await.unwrap();
    assert_eq!((far.events.len(), far.next_position), (0, 1_000));
    let none = store.read_all(1, 0, &LogFilter::all()).await.unwrap();
    assert_eq!((none.events.len(), none.next_position), (0, 1));
}

async fn read_all_filters_by_stream_and_event_type(store: Arc<dyn EventStore>) {
    let store = &*store;
    let mut other = append("o", NoStream, 2);
    other.stream_type = "other".into();
    appended(store, append("a", NoStream, 2)).await;
    appended(store, other).await;
    let mut renamed = append("a", Exact(2), 1);
    let mut events = renamed.events.as_slice().to_vec();
    events[0].event_type = "test.Renamed".into();
    renamed.events = events.try_into().unwrap();
    appended(store, renamed).await;

    let by_stream = LogFilter {
        stream_types: vec!["other".into()],
        ..LogFilter::all()
    };
    let page = store.read_all(0, 10, &by_stream).await.unwrap();
    assert_eq!(
        (positions(&page.events), page.next_position),
        (vec![3, 4], 6)
    );
    assert!(page.events.iter().all(|e| e.stream_type == "other"));

    let by_type = LogFilter {
        event_types: vec!["test.Renamed".into()],
        ..LogFilter::all()
    };
    assert_eq!(positions(&read_everything(store, &by_type, 1).await), [5]);
    let both = LogFilter {
        stream_types: vec!["test".into()],
        event_types: vec!["test.Happened".into(), "test.Renamed".into()],
    };
    assert_eq!(
        positions(&read_everything(store, &both, 10).await),
        [1, 2, 5]
    );
    let nothing = LogFilter {
        stream_types: vec!["nope".into()],
        ..LogFilter::all()
    };
    let page = store.read_all(0, 10, &nothing).await.unwrap();
    assert_eq!(
        (page.events.len(), page.next_position),
        (0, 6),
        "an empty page still moves on"
    );
}

/// Writers race on many streams while a reader follows the log with only its
/// next position: it must see every event exactly once, in position order,
/// each stream's versions in order, and never a position it later finds
/// below one it has already passed.
async fn racing_writers_never_make_a_reader_skip(store: Arc<dyn EventStore>) {
    race_and_follow(std::slice::from_ref(&store), store.clone()).await;
}

/// [`racing_writers_never_make_a_reader_skip`] with the writers spread over
/// `writing` stores (processes sharing one database) and the reader on `reading`.
async fn race_and_follow(writing: &[Arc<dyn EventStore>], reading: Arc<dyn EventStore>) {
    const WRITERS: usize = 16;
    const APPENDS: usize = 60;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, stop) = (reading, Arc::clone(&stop));
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut from = 0;
            loop {
                let done = stop.load(std::sync::atomic::Ordering::SeqCst);
                let page = store
                    .read_all(from, 7, &LogFilter::all())
                    .await
                    .expect("read_all");
                seen.extend(page.events);
                from = page.next_position;
                if done && from > page.head {
                    return seen;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = Arc::clone(&writing[w % writing.len()]);
            tokio::spawn(async move {
                for n in 0..APPENDS {
                    // Spread over streams shared between writers, one to three events each.
                    let stream = format!("s{}", (w + n) % 10);
                    store
                        .append(append(&stream, Any, 1 + n % 3))
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = reader.await.expect("reader");
    let total: usize = (0..APPENDS).map(|n| 1 + n % 3).sum::<usize>() * WRITERS;
    assert_eq!(
        positions(&seen),
        (1..=total as u64).collect::<Vec<_>>(),
        "every position once, in order"
    );
    let mut last = std::collections::HashMap::new();
    for event in &seen {
        let previous = last
            .insert(event.stream_id.clone(), event.version)
            .unwrap_or(0);
        assert_eq!(
            event.version,
            previous + 1,
            "{} in version order",
            event.stream_id
        );
    }
}

// ---------------------------------------------------------------- backends

async fn on_redb<F, Fut>(case: F)
where
    F: FnOnce(Arc<dyn EventStore>) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("temp dir");
    let store = RedbStore::open(dir.path().join("events.redb")).expect("open redb");
    case(Arc::new(store)).await;
}

fn postgres_url() -> String {
    std::env::var("SCALEOUT_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://scaleout:scaleout@127.0.0.1:5432/scaleout".into())
}

/// Runs `case` with the name of a fresh schema, which is dropped afterwards
/// whether the case passed or not.
async fn in_postgres_schema<F, Fut>(case: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let url = postgres_url();
    let schema = format!("conf_{}", Uuid::new_v4().simple());
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL must be running for these tests (see SCALEOUT_TEST_POSTGRES_URL)");
    tokio::spawn(connection);

    let outcome = tokio::spawn(case(schema.clone())).await;
    admin
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .expect("dropping the test schema");
    if let Err(error) = outcome {
        match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(error) => panic!("test case did not finish: {error}"),
        }
    }
}

async fn on_postgres<F, Fut>(case: F)
where
    F: FnOnce(Arc<dyn EventStore>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    in_postgres_schema(|schema| async move {
        let config = PostgresConfig::new(&postgres_url()).with_schema(schema);
        let store = PostgresStore::connect(config).await.expect("connect");
        case(Arc::new(store)).await;
    })
    .await;
}

macro_rules! conformance {
    ($($case:ident),+ $(,)?) => {
        mod redb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::on_redb(super::$case).await;
                }
            )+
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::on_postgres(super::$case).await;
                }
            )+
        }
    };
}

async fn a_stream_keeps_its_latest_snapshot(store: Arc<dyn EventStore>) {
    let snapshot = |version: u64, state: &[u8]| Snapshot {
        stream_id: "s".into(),
        version,
        shape: 3,
        state: state.to_vec(),
    };
    assert_eq!(store.load_snapshot("s").await.unwrap(), None);
    store.save_snapshot(snapshot(10, b"ten")).await.unwrap();
    assert_eq!(
        store.load_snapshot("s").await.unwrap(),
        Some(snapshot(10, b"ten"))
    );
    // An older one, saved late, does not replace a newer one.
    store.save_snapshot(snapshot(5, b"five")).await.unwrap();
    assert_eq!(
        store.load_snapshot("s").await.unwrap(),
        Some(snapshot(10, b"ten"))
    );
    store.save_snapshot(snapshot(20, b"twenty")).await.unwrap();
    assert_eq!(
        store.load_snapshot("s").await.unwrap(),
        Some(snapshot(20, b"twenty"))
    );
    assert_eq!(store.load_snapshot("other").await.unwrap(), None);
}

conformance!(
    a_stream_keeps_its_latest_snapshot,
    expected_any,
    expected_no_stream,
    expected_stream_exists,
    expected_exact,
    failed_append_leaves_nothing_behind,
    multi_event_append_is_contiguous,
    concurrent_any_appends_leave_no_gap,
    exact_race_has_one_winner,
    request_id_replays,
    concurrent_duplicates_append_once,
    request_id_reused_on_another_stream,
    one_request_id_on_many_streams_at_once_appends_once,
    request_id_reused_for_a_different_request,
    outbox_matches_events,
    read_stream_from_a_version,
    read_stream_takes_a_limit,
    read_all_in_position_order,
    read_all_filters_by_stream_and_event_type,
    racing_writers_never_make_a_reader_skip,
);

// ---------------------------------------------------------------- backend specifics

/// With several writers, the streams' appends commit in transactions of
/// their own, which may insert the one request id at the same moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_one_request_id_across_writers_appends_once() {
    in_postgres_schema(|schema| async move {
        let config = PostgresConfig::new(&postgres_url())
            .with_schema(schema)
            .with_writers(4);
        let store = PostgresStore::connect(config).await.expect("connect");
        one_request_id_on_many_streams_at_once_appends_once(Arc::new(store)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redb_reopened_store_has_everything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("events.redb");
    let request_id = RequestId(Uuid::new_v4());
    let (stream, outbox, result) = {
        let store = RedbStore::open(&path).expect("open redb");
        appended(&store, append("a", NoStream, 2)).await;
        let result = appended(&store, with_request_id(append("b", Any, 1), request_id)).await;
        (
            read(&store, "a").await,
            store.read_outbox(0, 100).await.unwrap(),
            result,
        )
    };

    let store = RedbStore::open(&path).expect("reopen redb");
    assert_eq!(read(&store, "a").await, stream);
    assert_eq!(store.read_outbox(0, 100).await.unwrap(), outbox);
    assert_eq!(
        store.find_request(request_id).await.unwrap(),
        Some(recorded(result.clone()))
    );
    let retry = with_request_id(append("b", Any, 1), request_id);
    assert_eq!(
        store.append(retry).await.unwrap(),
        AppendOutcome::Replayed(result)
    );
    // Versions and positions continue where they were.
    assert_eq!(appended(&store, append("a", Exact(2), 1)).await.version, 3);
    let last = store.read_outbox(0, 100).await.unwrap().pop().unwrap();
    assert!(last.position > outbox.iter().map(|e| e.position).max().unwrap());
}

/// Several processes on one database: they migrate at once, and their
/// writers race on new streams and on request ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_instances_share_one_schema() {
    in_postgres_schema(|schema| async move {
        let config = PostgresConfig::new(&postgres_url()).with_schema(schema);
        let connecting: Vec<_> = (0..3)
            .map(|_| tokio::spawn(PostgresStore::connect(config.clone().with_writers(2))))
            .collect();
        let mut stores: Vec<Arc<dyn EventStore>> = Vec::new();
        for store in connecting {
            stores.push(Arc::new(store.await.expect("task").expect("connect")));
        }

        let request_id = RequestId(Uuid::new_v4());
        let mut tasks = Vec::new();
        for round in 0..20 {
            for store in &stores {
                let store = Arc::clone(store);
                let stream = format!("new-{round}");
                tasks.push(tokio::spawn(async move {
                    let plain = store.append(append(&stream, Any, 2)).await.map(|_| ());
                    let dup = with_request_id(append("dup", Any, 1), request_id);
                    (plain, store.append(dup).await)
                }));
            }
        }
        let mut written = 0;
        for task in tasks {
            let (plain, dup) = task.await.expect("task");
            plain.expect("append");
            written += matches!(dup.expect("append"), AppendOutcome::Appended(_)) as usize;
        }
        assert_eq!(written, 1);
        assert_eq!(versions(&read(&*stores[0], "dup").await), [1]);
        for round in 0..20 {
            let events = read(&*stores[1], &format!("new-{round}")).await;
            assert_eq!(versions(&events), [1, 2, 3, 4, 5, 6]);
        }
        let outbox = stores[2].read_outbox(0, 1000).await.unwrap();
        assert_eq!(outbox.len(), 20 * 6 + 1);
        let ids: HashSet<Uuid> = outbox.iter().map(|e| e.event_id).collect();
        assert_eq!(ids.len(), outbox.len());
    })
    .await;
}

/// A schema whose requests were recorded before fingerprints were kept: the
/// column is added on connect, and such a request replays on its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_requests_recorded_before_fingerprints_still_replay() {
    in_postgres_schema(|schema| async move {
        let config = PostgresConfig::new(&postgres_url()).with_schema(schema.clone());
        let request_id = RequestId(Uuid::new_v4());
        let first = {
            let store = PostgresStore::connect(config.clone())
                .await
                .expect("connect");
            appended(&store, with_request_id(append("a", Any, 1), request_id)).await
        };
        let (admin, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        admin
            .batch_execute(&format!(
                "ALTER TABLE {schema}.requests DROP COLUMN fingerprint"
            ))
            .await
            .expect("back to the first layout");

        let store = PostgresStore::connect(config).await.expect("reconnect");
        assert_eq!(
            store.find_request(request_id).await.unwrap(),
            Some(RecordedRequest {
                result: first.clone(),
                fingerprint: None,
            })
        );
        let any_request = with_key(append("a", Any, 1), request_id, "whatever it was");
        assert_eq!(
            store.append(any_request).await.unwrap(),
            AppendOutcome::Replayed(first)
        );
        let elsewhere = with_request_id(append("b", Any, 1), request_id);
        assert!(matches!(
            store.append(elsewhere).await,
            Err(StoreError::RequestIdReused { .. })
        ));
    })
    .await;
}

/// Three processes' stores, each with its own group-commit writers, append
/// at once while a fourth follows the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_writers_of_several_processes_never_make_a_reader_skip() {
    in_postgres_schema(|schema| async move {
        let config = PostgresConfig::new(&postgres_url()).with_schema(schema);
        let mut stores: Vec<Arc<dyn EventStore>> = Vec::new();
        for _ in 0..4 {
            let store = PostgresStore::connect(config.clone())
                .await
                .expect("connect");
            stores.push(Arc::new(store));
        }
        let reading = stores.pop().unwrap();
        race_and_follow(&stores, reading).await;
    })
    .await;
}

/// Connections killed under the store: appends fail as `Unavailable` (never
/// hang, never `Backend`) until the writers have reconnected, reads reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_reconnects_after_losing_its_connections() {
    in_postgres_schema(|schema| async move {
        let name = format!("conf_{}", Uuid::new_v4().simple());
        let url = postgres_url();
        let separator = if url.contains('?') { '&' } else { '?' };
        let tagged = format!("{url}{separator}application_name={name}");
        let config = PostgresConfig::new(&tagged)
            .with_schema(schema)
            .with_writers(4);
        let store = PostgresStore::connect(config).await.expect("connect");
        appended(&store, append("s", NoStream, 1)).await;

        let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("admin connection");
        tokio::spawn(connection);
        let killed = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            )
            .await
            .expect("terminating the store's connections");
        assert_eq!(killed.len(), 5, "4 writers and the reader");

        let request_id = RequestId(Uuid::new_v4());
        let mut unavailable = 0;
        let result = loop {
            let retry = with_request_id(append("s", Exact(1), 1), request_id);
            match store.append(retry).await {
                Ok(outcome) => break outcome.into_result(),
                Err(StoreError::Unavailable { .. }) if unavailable < 20 => unavailable += 1,
                other => panic!("expected the append to recover, got {other:?}"),
            }
        };
        assert_eq!(result.version, 2);
        assert_eq!(versions(&read(&store, "s").await), [1, 2]);
        store.ping().await.expect("ping after reconnecting");
    })
    .await;
}

#[tokio::test]
async fn postgres_unreachable_is_unavailable() {
    let config = PostgresConfig::new("postgres://scaleout:secret@127.0.0.1:1/scaleout");
    assert!(!format!("{config:?}").contains("secret"));
    match PostgresStore::connect(config).await {
        Err(error @ StoreError::Unavailable { .. }) => {
            assert!(error.is_transient());
            let cause = std::error::Error::source(&error).expect("the driver's error is kept");
            assert!(cause.is::<tokio_postgres::Error>(), "{cause:?}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn postgres_rejects_an_unsafe_schema_name() {
    let config = PostgresConfig::new(&postgres_url()).with_schema("x; DROP TABLE y".into());
    match PostgresStore::connect(config).await {
        Err(StoreError::Backend { .. }) => {}
        other => panic!("expected Backend, got {other:?}"),
    }
}
