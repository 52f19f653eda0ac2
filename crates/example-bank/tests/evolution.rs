//! Events the bank's first release stored (an opening that took a deposit
//! in one event, a withdrawal whose fields were renamed and renumbered) read
//! as today's on every path: loading an account for a command, the balance
//! view, a rebuild, verify and the read API; and one its upcaster cannot
//! read is reported where it sits on each of them, never skipped silently.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bank::history::{AccountOpenedWithDeposit, Withdrawal};
use bank::pb::{
    self as bank_pb, GetBalanceRequest, bank_query_service_client::BankQueryServiceClient,
    bank_service_client::BankServiceClient,
};
use prost::{Message, Name};
use scaleout::pb::{
    self, read_model_service_client::ReadModelServiceClient, read_service_client::ReadServiceClient,
};
use scaleout::store::redb::{Outbox, RedbStore};
use scaleout::store::{AppendRequest, EventMetadata, EventStore, ExpectedVersion, NewEvent};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

/// Appends one event, as stored, to `account-<id>`.
async fn store_event(
    store: &RedbStore,
    id: &str,
    version: u64,
    event_type: &str,
    payload: Vec<u8>,
) {
    store
        .append(AppendRequest {
            stream_id: format!("account-{id}"),
            stream_type: "account".into(),
            expected: ExpectedVersion::Exact(version - 1),
            events: vec![NewEvent {
                event_id: Uuid::now_v7(),
                event_type: event_type.into(),
                payload,
            }]
            .try_into()
            .unwrap(),
            request_key: None,
            metadata: EventMetadata {
                occurred_at: SystemTime::now(),
                correlation_id: Uuid::now_v7(),
                causation_id: Uuid::now_v7(),
                actor: None,
                trace: None,
            },
        })
        .await
        .unwrap();
}

fn opened_with(id: &str, owner: &str, initial_deposit: u64) -> Vec<u8> {
    AccountOpenedWithDeposit {
        account_id: id.into(),
        owner: owner.into(),
        initial_deposit,
    }
    .encode_to_vec()
}

/// The log the first release left (positions 1–6); account `c`'s
/// withdrawal at position 6 is damaged: field 1 says 5 bytes follow, none do.
async fn first_release(data: &std::path::Path) {
    let store = RedbStore::open_with(data.join("events.redb"), Outbox::Off).unwrap();
    let withdrawal = Withdrawal {
        cents: 30,
        account: "a".into(),
    };
    let deposited = bank_pb::MoneyDeposited {
        account_id: "b".into(),
        amount: 5,
    };
    let (opened, withdrawn) = (
        AccountOpenedWithDeposit::full_name(),
        Withdrawal::full_name(),
    );
    store_event(&store, "a", 1, &opened, opened_with("a", "Ada", 100)).await;
    store_event(&store, "a", 2, &withdrawn, withdrawal.encode_to_vec()).await;
    store_event(&store, "b", 1, &opened, opened_with("b", "Bob", 0)).await;
    let current = bank_pb::MoneyDeposited::full_name();
    store_event(&store, "b", 2, &current, deposited.encode_to_vec()).await;
    store_event(&store, "c", 1, &opened, opened_with("c", "Cy", 50)).await;
    store_event(&store, "c", 2, &withdrawn, vec![0x0a, 0x05]).await;
}

async fn platform(data: &std::path::Path) -> (Channel, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stopping = CancellationToken::new();
    let platform = scaleout::app::Platform {
        app: Arc::new(bank::Bank),
        data_dir: data.to_owned(),
        server: Default::default(),
        retry: Default::default(),
        snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
        max_wait: Duration::from_secs(10),
    };
    tokio::spawn(scaleout::app::run_platform(
        listener,
        platform,
        stopping.clone(),
    ));
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect_lazy();
    (channel, stopping)
}

async fn balance(channel: &Channel, id: &str, min_version: u64) -> bank_pb::GetBalanceResponse {
    BankQueryServiceClient::new(channel.clone())
        .get_balance(GetBalanceRequest {
            account_id: id.into(),
            min_version,
        })
        .await
        .unwrap()
        .into_inner()
}

fn unreadable_at(status: &Status, position: &str) {
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "EVENT_UNREADABLE");
    assert_eq!(info.metadata["stream"], "account-c");
    assert_eq!(info.metadata["version"], "2");
    assert_eq!(info.metadata["position"], position);
    assert_eq!(info.metadata["event_type"], "bank.v0.Withdrawal");
    assert!(status.message().contains("upcaster"), "{status:?}");
}

fn types(events: &[pb::LoggedEvent]) -> Vec<(u64, u64, &str)> {
    events
        .iter()
        .map(|logged| {
            let event = logged.event.as_ref().unwrap();
            (logged.position, event.version, event.event_type.as_str())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_the_first_release_read_as_today_on_every_path() {
    let data = tempfile::tempdir().unwrap();
    first_release(data.path()).await;
    let (channel, stopping) = platform(data.path()).await;

    // The balance view, folded by the platform's projector from the log.
    let a = balance(&channel, "a", 2).await;
    assert_eq!((a.owner.as_str(), a.balance, a.version), ("Ada", 70, 2));
    let b = balance(&channel, "b", 2).await;
    assert_eq!((b.owner.as_str(), b.balance, b.version), ("Bob", 5, 2));

    // Commands decide on the state folded from the old events.
    let mut bank = BankServiceClient::new(channel.clone());
    let withdraw = |id: &str, amount| bank_pb::WithdrawRequest {
        account_id: id.into(),
        amount,
        ..Default::default()
    };
    let short = bank.withdraw(withdraw("a", 80)).await.unwrap_err();
    assert_eq!(short.code(), Code::FailedPrecondition);
    assert!(
        short.message().contains("the balance is 70 cents"),
        "{short:?}"
    );
    let done = bank.withdraw(withdraw("a", 20)).await.unwrap().into_inner();
    assert_eq!(done.result.unwrap().version, 3);
    assert_eq!(balance(&channel, "a", 3).await.balance, 50);
    let damaged = bank.withdraw(withdraw("c", 1)).await.unwrap_err();
    unreadable_at(&damaged, "6");

    // The read API gives today's events; `as_stored` what was stored.
    let mut log = ReadServiceClient::new(channel.clone());
    let read = |as_stored| pb::ReadStreamRequest {
        stream_id: "account-a".into(),
        as_stored,
        ..Default::default()
    };
    let now = log.read_stream(read(false)).await.unwrap().into_inner();
    assert_eq!(
        types(&now.events),
        [
            (1, 1, "bank.v1.AccountOpened"),
            (1, 1, "bank.v1.MoneyDeposited"),
            (2, 2, "bank.v1.MoneyWithdrawn"),
            (7, 3, "bank.v1.MoneyWithdrawn"),
        ]
    );
    let envelope = |i: usize| now.events[i].event.as_ref().unwrap();
    let renamed = bank_pb::MoneyWithdrawn::decode(&*envelope(2).payload).unwrap();
    assert_eq!((renamed.account_id.as_str(), renamed.amount), ("a", 30));
    let split = bank_pb::MoneyDeposited::decode(&*envelope(1).payload).unwrap();
    assert_eq!(split.amount, 100);
    let stored = log.read_stream(read(true)).await.unwrap().into_inner();
    assert_eq!(
        types(&stored.events),
        [
            (1, 1, "bank.v0.AccountOpenedWithDeposit"),
            (2, 2, "bank.v0.Withdrawal"),
            (7, 3, "bank.v1.MoneyWithdrawn"),
        ]
    );
    let stored_id = &stored.events[0].event.as_ref().unwrap().event_id;
    assert_eq!(
        &envelope(0).event_id,
        stored_id,
        "the first part keeps the id"
    );
    assert_ne!(envelope(1).event_id, envelope(0).event_id);

    let read_all = |event_types: &[&str], as_stored| pb::ReadAllRequest {
        filter: Some(pb::LogFilter {
            event_types: event_types.iter().map(|t| (*t).to_owned()).collect(),
            ..Default::default()
        }),
        as_stored,
        ..Default::default()
    };
    // Deposits, from an old opening and a current deposit; a filter on a
    // current type reads the old types that may read as it, so the damaged
    // withdrawal (position 6) could be one: past it, the read fails.
    let first_five = pb::ReadAllRequest {
        limit: 5,
        ..read_all(&["bank.v1.MoneyDeposited"], false)
    };
    let deposits = log.read_all(first_five).await.unwrap().into_inner();
    assert_eq!(
        types(&deposits.events),
        [
            (1, 1, "bank.v1.MoneyDeposited"),
            (4, 2, "bank.v1.MoneyDeposited"),
            (5, 1, "bank.v1.MoneyDeposited"),
        ]
    );
    let deposits = log
        .read_all(read_all(&["bank.v1.MoneyDeposited"], false))
        .await
        .unwrap_err();
    unreadable_at(&deposits, "6");
    let old_name = log
        .read_all(read_all(&["bank.v0.Withdrawal"], false))
        .await
        .unwrap_err();
    assert_eq!(old_name.code(), Code::InvalidArgument, "{old_name:?}");
    let old = log
        .read_all(read_all(&["bank.v0.Withdrawal"], true))
        .await
        .unwrap()
        .into_inner();
    let positions: Vec<u64> = old.events.iter().map(|e| e.position).collect();
    assert_eq!(positions, [2, 6]);
    let everything = log.read_all(read_all(&[], false)).await.unwrap_err();
    unreadable_at(&everything, "6");
    let all_stored = log
        .read_all(read_all(&[], true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all_stored.events.len(), 7);

    // Verify folds the log as the projector does, and names what it cannot read.
    let mut models = ReadModelServiceClient::new(channel.clone());
    let verified = models
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((verified.events, verified.drifted), (7, 0), "{verified:?}");
    assert_eq!(verified.unreadable, 1);
    let reason = &verified.unreadable_reasons[0];
    assert!(
        reason.contains("stream account-c version 2 (log position 6)")
            && reason.contains("bank.v0.Withdrawal"),
        "{reason}"
    );

    // A rebuild reads the old events the same way.
    let started = models
        .rebuild(pb::RebuildRequest {
            projection: "balance".into(),
            switch_when_ready: true,
        })
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = models
            .list_read_models(pb::ListReadModelsRequest {})
            .await
            .unwrap()
            .into_inner();
        let serving = listed
            .read_models
            .iter()
            .find(|m| m.projection == "balance");
        if serving.is_some_and(|m| m.serving == started.generation) {
            break;
        }
        assert!(Instant::now() < deadline, "{listed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = balance(&channel, "a", 3).await;
    assert_eq!((a.owner.as_str(), a.balance, a.version), ("Ada", 50, 3));
    let b = balance(&channel, "b", 2).await;
    assert_eq!((b.balance, b.version), (5, 2));
    stopping.cancel();
}
