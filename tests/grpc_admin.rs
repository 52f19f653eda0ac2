//! Dead letters over gRPC: what the admin service lists is what the bus
//! parked, and a replay hands it back to its service type.

mod support;

use std::sync::Arc;
use std::time::Duration;

use scaleout::bus::memory::MemoryBus;
use scaleout::bus::{EventBus, Subscription};
use scaleout::pb::{self, admin_service_client::AdminServiceClient};
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
        store,
        bus: Some(Arc::clone(&bus)),
        server: Default::default(),
        retry: Default::default(),
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
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
}
