//! The read API over gRPC on a real command-svc: one stream, the whole log
//! in pages, subscriptions that catch up and follow, and bad input.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use reference::pb::read_service_client::ReadServiceClient;
use reference::pb::{self, subscribe_response::Kind};
use scaleout::domain::KnownTypes;
use scaleout::grpc::{ReadApi, ReadConfig};
use scaleout::store::{AppendRequest, EventMetadata, ExpectedVersion, NewEvent};
use support::{CommandService, redb_store};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;
use uuid::Uuid;

/// Appends `count` counter increments to `stream` in one atomic append.
fn increments(stream: &str, count: usize) -> AppendRequest {
    padded_increments(stream, count, 0)
}

/// [`increments`] whose payloads take `padding` bytes each.
fn padded_increments(stream: &str, count: usize, padding: usize) -> AppendRequest {
    let events: Vec<NewEvent> = (0..count)
        .map(|_| NewEvent {
            event_id: Uuid::now_v7(),
            event_type: "scaleout.v1.CounterIncremented".into(),
            payload: vec![0; padding],
        })
        .collect();
    AppendRequest {
        stream_id: stream.into(),
        stream_type: "counter".into(),
        expected: ExpectedVersion::Any,
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

async fn reader(service: &CommandService) -> ReadServiceClient<Channel> {
    ReadServiceClient::new(service.channel().await)
}

fn positions(events: &[pb::LoggedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.position).collect()
}

#[tokio::test]
async fn read_a_stream_and_the_log_in_pages() {
    let (store, _dir) = redb_store();
    store.append(increments("counter-a", 3)).await.unwrap();
    store.append(increments("counter-b", 2)).await.unwrap();
    let service = CommandService::start(Arc::clone(&store)).await;
    let mut client = reader(&service).await;

    let page = client
        .read_stream(pb::ReadStreamRequest {
            stream_id: "counter-a".into(),
            from_version: 2,
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let event = page.events[0].event.as_ref().unwrap();
    assert_eq!((event.stream_id.as_str(), event.version), ("counter-a", 2));
    assert_eq!((page.next_version, page.end_of_stream), (3, false));
    let rest = client
        .read_stream(pb::ReadStreamRequest {
            stream_id: "counter-a".into(),
            from_version: 3,
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            positions(&rest.events),
            rest.next_version,
            rest.end_of_stream
        ),
        (vec![3], 4, true)
    );

    let first = client
        .read_all(pb::ReadAllRequest {
            from_position: 0,
            limit: 4,
            filter: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            positions(&first.events),
            first.next_position,
            first.head_position
        ),
        (vec![1, 2, 3, 4], 5, 5)
    );
    let filtered = client
        .read_all(pb::ReadAllRequest {
            from_position: 0,
            limit: 10,
            filter: Some(pb::LogFilter {
                stream_types: vec!["counter".into()],
                event_types: vec!["scaleout.v1.CounterIncremented".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(positions(&filtered.events), [1, 2, 3, 4, 5]);
    let past = client
        .read_all(pb::ReadAllRequest {
            from_position: 9,
            limit: 10,
            filter: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (past.events.len(), past.next_position, past.head_position),
        (0, 9, 5)
    );
}

#[tokio::test]
async fn bad_reads_are_invalid_arguments_that_name_the_field() {
    let (store, _dir) = redb_store();
    let service = CommandService::start(store).await;
    let mut client = reader(&service).await;

    let too_big = client
        .read_all(pb::ReadAllRequest {
            from_position: 0,
            limit: 1001,
            filter: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(too_big.code(), Code::InvalidArgument);
    let violation = &too_big.get_details_bad_request().unwrap().field_violations[0];
    assert_eq!(violation.field, "limit");
    assert!(
        violation.description.contains("1000"),
        "names the cap: {violation:?}"
    );

    let unknown = client
        .read_all(pb::ReadAllRequest {
            from_position: 0,
            limit: 0,
            filter: Some(pb::LogFilter {
                stream_types: vec!["fiel".into()],
                event_types: vec![],
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert!(unknown.message().contains("fiel"), "{}", unknown.message());

    let mut subscribe = client
        .subscribe(pb::SubscribeRequest {
            from_position: 0,
            filter: Some(pb::LogFilter {
                stream_types: vec![],
                event_types: vec!["scaleout.v1.Nope".into()],
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(
        subscribe.as_mut().unwrap_err().code(),
        Code::InvalidArgument
    );

    let no_stream = client
        .read_stream(pb::ReadStreamRequest {
            stream_id: String::new(),
            from_version: 0,
            limit: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let fields: Vec<_> = no_stream
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["stream_id", "limit"]);
}

/// 100,000 events over 1,000 streams, then live appends: each arrives once,
/// in position order, with the switch to live marked by a checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_catches_up_over_100_000_events_then_follows_live() {
    let (store, _dir) = redb_store();
    let appends: Vec<_> = (0..1_000)
        .map(|n| {
            let store = Arc::clone(&store);
            tokio::spawn(
                async move { store.append(increments(&format!("counter-{n}"), 100)).await },
            )
        })
        .collect();
    for append in appends {
        append.await.unwrap().unwrap();
    }
    let service = CommandService::start(Arc::clone(&store)).await;
    let mut client = reader(&service).await;
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            from_position: 0,
            filter: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let mut expected = 1;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let message = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("caught up in time")
            .expect("the stream goes on")
            .expect("no error");
        match message.kind.unwrap() {
            Kind::Event(event) => {
                assert_eq!(
                    event.position, expected,
                    "in order, none skipped or repeated"
                );
                expected += 1;
            }
            Kind::Checkpoint(checkpoint) => {
                assert!(checkpoint.caught_up);
                assert_eq!(checkpoint.next_position, 100_001);
                break;
            }
        }
    }
    assert_eq!(expected, 100_001);

    // Live: appends from several writers arrive with no gap.
    let live: Vec<_> = (0..20)
        .map(|n| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .append(increments(&format!("counter-{}", n % 3), 2))
                    .await
            })
        })
        .collect();
    for append in live {
        append.await.unwrap().unwrap();
    }
    while expected <= 100_040 {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("live events arrive")
            .unwrap()
            .unwrap();
        if let Some(Kind::Event(event)) = message.kind {
            assert_eq!(event.position, expected);
            expected += 1;
        }
    }
}

/// Resuming from the last position received + 1 continues exactly there.
#[tokio::test]
async fn a_subscription_resumes_from_a_position() {
    let (store, _dir) = redb_store();
    store.append(increments("counter-a", 5)).await.unwrap();
    let service = CommandService::start(Arc::clone(&store)).await;
    let mut client = reader(&service).await;
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            from_position: 4,
            filter: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(message) = stream.next().await {
        match message.unwrap().kind.unwrap() {
            Kind::Event(event) => got.push(event.position),
            Kind::Checkpoint(_) => break,
        }
    }
    assert_eq!(got, [4, 5]);
}

/// A client that stops reading: its buffer fills, its subscription ends with
/// RESOURCE_EXHAUSTED, and another subscriber on the same server is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_ended_and_slows_nobody() {
    let (store, _dir) = redb_store();
    // 10 MB: more than the client's HTTP/2 windows take unread.
    for n in 0..50 {
        let append = padded_increments(&format!("counter-{n}"), 200, 1000);
        store.append(append).await.unwrap();
    }
    let config = ReadConfig {
        buffer: 16,
        slow_subscriber: Duration::from_millis(300),
        max_subscriptions: 4,
        poll: Duration::from_millis(50),
    };
    let known = KnownTypes {
        stream_types: vec!["counter".into()],
        ..Default::default()
    };
    let api = ReadApi::new(Arc::clone(&store), known, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(api.into_service(1 << 20))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let connect = || async move {
        ReadServiceClient::new(
            Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        )
    };

    let mut stalled = connect()
        .await
        .subscribe(pb::SubscribeRequest {
            from_position: 0,
            filter: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Another subscriber reads everything meanwhile.
    let mut reading = connect()
        .await
        .subscribe(pb::SubscribeRequest {
            from_position: 0,
            filter: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut read = 0;
    while read < 10_000 {
        let message = tokio::time::timeout(Duration::from_secs(20), reading.next())
            .await
            .expect("the reading subscriber is not held up")
            .unwrap()
            .unwrap();
        read += matches!(message.kind, Some(Kind::Event(_))) as usize;
    }
    // Past the slow-subscriber limit, the stalled one finds its end after
    // what was buffered.
    tokio::time::sleep(config.slow_subscriber * 3).await;
    let mut received = 0;
    let status = loop {
        let next = tokio::time::timeout(Duration::from_secs(20), stalled.next()).await;
        match next.unwrap_or_else(|_| panic!("no end after {received} messages")) {
            Some(Ok(_)) => received += 1,
            Some(Err(status)) => break status,
            None => panic!("ended without a status after {received} messages"),
        }
    };
    assert!(received < 10_000, "it did not get everything: {received}");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.get_details_error_info().unwrap().reason,
        "SUBSCRIBER_TOO_SLOW"
    );
}

/// Pages of large events end before 1 MiB, however many events `limit`
/// allows, and paging on from `next_position` / `next_version` misses none.
#[tokio::test]
async fn pages_of_large_events_stay_inside_one_mebibyte() {
    let (store, _dir) = redb_store();
    // 40 events of 100 KiB: 4 MiB, which a default client could not take at once.
    store
        .append(padded_increments("counter-big", 40, 100 << 10))
        .await
        .unwrap();
    let service = CommandService::start(Arc::clone(&store)).await;
    let mut client = reader(&service).await;

    let mut from_position = 1;
    let mut seen = Vec::new();
    loop {
        let page = client
            .read_all(pb::ReadAllRequest {
                from_position,
                limit: 1000,
                filter: None,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let bytes: usize = page
            .events
            .iter()
            .map(|e| e.event.as_ref().unwrap().payload.len())
            .sum();
        assert!(bytes <= 1 << 20, "a page of {bytes} bytes");
        seen.extend(positions(&page.events));
        from_position = page.next_position;
        if from_position > page.head_position {
            break;
        }
    }
    assert_eq!(seen, (1..=40).collect::<Vec<_>>());

    let mut from_version = 1;
    let mut versions = Vec::new();
    loop {
        let page = client
            .read_stream(pb::ReadStreamRequest {
                stream_id: "counter-big".into(),
                from_version,
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.events.len() < 40);
        versions.extend(
            page.events
                .iter()
                .map(|e| e.event.as_ref().unwrap().version),
        );
        from_version = page.next_version;
        if page.end_of_stream {
            break;
        }
    }
    assert_eq!(versions, (1..=40).collect::<Vec<_>>());
}
