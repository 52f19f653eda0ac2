//! Dead letters over gRPC: what the admin service lists is what the bus
//! parked, and a replay hands it back to its service type.

mod support;

use std::sync::Arc;
use std::time::Duration;

use reference::pb::{self, admin_service_client::AdminServiceClient};
use scaleout::bus::memory::MemoryBus;
use scaleout::bus::{BusMessage, EventBus, Subscription};
use support::CommandService;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_event_is_listed_with_its_reason_and_replayed() {
    let (store, _dir) = support::redb_store();
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    let mut projector = bus
        .subscribe(&Subscription {
            service_type: "projector".into(),
            bindings: vec!["#".into()],
            prefetch: 10,
            max_attempts: 3,
        })
        .await
        .unwrap();
    let service = CommandService::start_full(scaleout::app::CommandService {
        app: std::sync::Arc::new(reference::Reference),
        store,
        bus: Some(Arc::clone(&bus)),
        server: Default::default(),
        retry: Default::default(),
        snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
        relay: Default::default(),
    })
    .await;
    let created = service
        .client()
        .await
        .create_file(pb::CreateFileRequest {
            file_id: "f1".into(),
            name: "a.txt".into(),
            folder_id: "docs".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();

    let patience = Duration::from_secs(10);
    let delivery = tokio::time::timeout(patience, projector.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivery.message.message_id, created.event_ids[0]);
    delivery
        .dead_letter("projection failed: disk full")
        .await
        .unwrap();

    let mut admin = AdminServiceClient::new(service.channel().await);
    let listed = admin
        .list_dead_letters(pb::ListDeadLettersRequest {
            service_type: "projector".into(),
            limit: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].message_id, created.event_ids[0]);
    assert_eq!(listed[0].event_type, "scaleout.v1.FileCreated");
    assert_eq!(listed[0].reason, "projection failed: disk full");
    assert_eq!(listed[0].attempts, 1);

    let replayed = admin
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            service_type: "projector".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .replayed;
    assert_eq!(replayed, 1);
    let again = tokio::time::timeout(patience, projector.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.message.message_id, created.event_ids[0]);
    again.ack().await.unwrap();

    let invalid = admin
        .list_dead_letters(pb::ListDeadLettersRequest {
            service_type: "no spaces".into(),
            limit: 5000,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
}

/// Dead letters page like every other list: each page inside 1 MiB of
/// bodies, a body over 1 MiB cut with its size given, every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_page_within_a_byte_bound() {
    let (store, _dir) = support::redb_store();
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    let mut projector = bus
        .subscribe(&Subscription {
            service_type: "projector".into(),
            bindings: vec!["#".into()],
            prefetch: 100,
            max_attempts: 3,
        })
        .await
        .unwrap();
    let body_of = |n: usize| vec![n as u8; if n == 7 { 3 << 20 } else { 300 << 10 }];
    let messages: Vec<BusMessage> = (0..12)
        .map(|n| BusMessage {
            message_id: format!("m{n}"),
            event_type: "scaleout.v1.FileCreated".into(),
            routing_key: "file.scaleout.v1.FileCreated".into(),
            correlation_id: String::new(),
            traceparent: String::new(),
            body: body_of(n),
        })
        .collect();
    for published in bus.publish(&messages).await {
        published.unwrap();
    }
    for _ in 0..messages.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(10), projector.next())
            .await
            .unwrap()
            .unwrap();
        delivery.dead_letter("poison").await.unwrap();
    }
    let service = CommandService::start_full(scaleout::app::CommandService {
        app: std::sync::Arc::new(reference::Reference),
        store,
        bus: Some(Arc::clone(&bus)),
        server: Default::default(),
        retry: Default::default(),
        snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
        relay: Default::default(),
    })
    .await;
    let mut admin = AdminServiceClient::new(service.channel().await);

    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .list_dead_letters(pb::ListDeadLettersRequest {
                service_type: "projector".into(),
                limit: 1000,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert_eq!(page.parked, 12);
        let bodies: usize = page.dead_letters.iter().map(|d| d.body.len()).sum();
        assert!(bodies <= 1 << 20, "a page of {bodies} bytes of bodies");
        for dead in page.dead_letters {
            let n: usize = dead.message_id[1..].parse().unwrap();
            assert_eq!(dead.body_bytes, body_of(n).len() as u64);
            let cut = body_of(n).len().min(1 << 20);
            assert_eq!(dead.body, body_of(n)[..cut]);
            seen.push(n);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, (0..12).collect::<Vec<_>>());
    assert!(
        pages >= 4,
        "12 bodies of 300 KiB fit in no fewer pages: {pages}"
    );

    let forged = admin
        .list_dead_letters(pb::ListDeadLettersRequest {
            service_type: "projector".into(),
            limit: 10,
            page_token: "bm90IGEgbnVtYmVy".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::InvalidArgument);
}

/// The contention report over gRPC: a command refused because another
/// client moved its stream first is a lost race on that stream, and
/// nothing else is listed; without a bus, dead letters are refused with the
/// reason, not answered as an empty queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_race_is_reported_by_stream() {
    let (store, _dir) = support::redb_store();
    let service = CommandService::start(store).await;
    let mut commands = service.client().await;
    let increment = |counter: &str, exact: Option<u64>| pb::IncrementCounterRequest {
        counter_id: counter.into(),
        expected_version: exact.map(|version| pb::ExpectedVersion {
            kind: Some(pb::expected_version::Kind::Exact(version)),
        }),
        ..Default::default()
    };
    for counter in ["hot", "hot", "calm"] {
        commands
            .increment_counter(increment(counter, None))
            .await
            .unwrap();
    }
    // Two clients read `hot` at version 2; the second to send loses.
    commands
        .increment_counter(increment("hot", Some(2)))
        .await
        .unwrap();
    let lost = commands
        .increment_counter(increment("hot", Some(2)))
        .await
        .unwrap_err();
    assert_eq!(lost.code(), Code::Aborted, "{lost:?}");

    let mut admin = AdminServiceClient::new(service.channel().await);
    let report = admin
        .get_contention(pb::GetContentionRequest { limit: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.window_seconds, 60);
    let streams: Vec<(String, u64)> = report
        .streams
        .into_iter()
        .map(|hot| (hot.key, hot.lost_races))
        .collect();
    assert_eq!(streams, [("counter-hot".to_owned(), 1)]);
    assert!(report.documents.is_empty());
    let metrics = support::http_get(&service.addr.to_string(), "/metrics").await;
    assert!(
        metrics.contains(
            "scaleout_contention_stream_lost_races{rank=\"1\",stream=\"counter-hot\"} 1\n"
        ),
        "{metrics}"
    );

    let too_many = admin
        .get_contention(pb::GetContentionRequest { limit: 101 })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    let no_bus = admin
        .list_dead_letters(pb::ListDeadLettersRequest {
            service_type: "projector".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(no_bus.code(), Code::FailedPrecondition, "{no_bus:?}");
}
