//! Command handling across instances: two handlers on one store behave like
//! two command-svc processes (separate turns, separate caches).

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use reference::domain::values::{Amount, FileName, Id};
use reference::domain::{Counter, CounterCommand, File, FileCommand};
use scaleout::command::{Command, CommandError, CommandHandler, RetryPolicy};
use scaleout::domain::DomainError;
use scaleout::store::{EventStore, ExpectedVersion, Snapshot, StoreError};

fn command<C>(id: &str, command: C, expected: Option<ExpectedVersion>) -> Command<C> {
    Command {
        aggregate_id: Id::parse(id).unwrap(),
        command,
        expected,
        request_key: None,
        correlation_id: None,
    }
}

fn rename(to: &str) -> FileCommand {
    FileCommand::Rename {
        new_name: FileName::parse(to).unwrap(),
    }
}

fn instances(store: &Arc<dyn EventStore>, retry: RetryPolicy) -> [Arc<CommandHandler>; 2] {
    [0, 1].map(|_| Arc::new(CommandHandler::new(Arc::clone(store), retry)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_racing_without_expected_version_both_always_succeed() {
    let (store, _dir) = support::redb_store();
    let handlers = instances(&store, RetryPolicy::default());
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..80 {
        let handler = Arc::clone(&handlers[i % 2]);
        calls.spawn(async move {
            let increment = CounterCommand::Increment {
                amount: Amount::parse(1).unwrap(),
            };
            handler
                .execute::<Counter>(command("hot", increment, None))
                .await
        });
    }
    let mut versions = BTreeSet::new();
    while let Some(joined) = calls.join_next().await {
        let outcome = joined.unwrap().expect("a lost race is decided again");
        versions.insert(outcome.result().version);
    }
    assert_eq!(versions, (1..=80).collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_expected_version_is_never_retried_across_instances() {
    let (store, _dir) = support::redb_store();
    let [a, b] = instances(&store, RetryPolicy::default());
    let create = FileCommand::Create {
        name: FileName::parse("v0.txt").unwrap(),
        folder_id: Id::parse("docs").unwrap(),
    };
    a.execute::<File>(command("f", create, None)).await.unwrap();
    for version in 1..=10u64 {
        let expected = Some(ExpectedVersion::Exact(version));
        let (left, right) = tokio::join!(
            a.execute::<File>(command("f", rename(&format!("a{version}")), expected)),
            b.execute::<File>(command("f", rename(&format!("b{version}")), expected)),
        );
        let lost = match (left, right) {
            (Ok(_), Err(lost)) | (Err(lost), Ok(_)) => lost,
            other => panic!("round {version}: expected one winner, got {other:?}"),
        };
        assert!(
            matches!(
                lost,
                CommandError::Store(StoreError::WrongExpectedVersion {
                    expected: ExpectedVersion::Exact(v),
                    actual,
                    ..
                }) if v == version && actual == version + 1
            ),
            "round {version}: {lost:?}"
        );
    }
}

#[tokio::test]
async fn a_cached_state_catches_up_with_what_another_instance_wrote() {
    let (store, _dir) = support::redb_store();
    // No retries: a stale decision would surface as a version conflict.
    let no_retry = RetryPolicy {
        max_retries: 0,
        ..RetryPolicy::default()
    };
    let [a, b] = instances(&store, no_retry);
    let create = FileCommand::Create {
        name: FileName::parse("a.txt").unwrap(),
        folder_id: Id::parse("docs").unwrap(),
    };
    a.execute::<File>(command("f", create, None)).await.unwrap();
    a.execute::<File>(command("f", rename("b.txt"), None))
        .await
        .unwrap();
    b.execute::<File>(command("f", FileCommand::Delete, None))
        .await
        .unwrap();

    let refused = a
        .execute::<File>(command("f", rename("c.txt"), None))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            CommandError::Domain(DomainError::Precondition {
                rule: "FILE_DELETED",
                ..
            })
        ),
        "{refused:?}"
    );
}

/// A real store that records where each stream read started.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn EventStore>,
    reads_from: std::sync::Mutex<Vec<u64>>,
}

#[async_trait::async_trait]
impl EventStore for Recording {
    async fn append(
        &self,
        request: scaleout::store::AppendRequest,
    ) -> Result<scaleout::store::AppendOutcome, StoreError> {
        self.inner.append(request).await
    }
    async fn read_stream(
        &self,
        stream_id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<scaleout::store::RecordedEvent>, StoreError> {
        self.reads_from.lock().unwrap().push(from_version);
        self.inner.read_stream(stream_id, from_version, limit).await
    }
    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &scaleout::store::LogFilter,
    ) -> Result<scaleout::store::LogPage, StoreError> {
        self.inner.read_all(from_position, limit, filter).await
    }
    async fn find_request(
        &self,
        request_id: scaleout::store::RequestId,
    ) -> Result<Option<scaleout::store::RecordedRequest>, StoreError> {
        self.inner.find_request(request_id).await
    }
    async fn read_outbox(
        &self,
        limit: usize,
    ) -> Result<Vec<scaleout::store::RecordedEvent>, StoreError> {
        self.inner.read_outbox(limit).await
    }
    async fn lease_outbox(&self) -> Result<bool, StoreError> {
        self.inner.lease_outbox().await
    }
    async fn delete_outbox(&self, positions: &[u64]) -> Result<(), StoreError> {
        self.inner.delete_outbox(positions).await
    }
    fn appended(&self) -> &tokio::sync::Notify {
        self.inner.appended()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        self.inner.save_snapshot(snapshot).await
    }
    async fn load_snapshot(&self, stream_id: &str) -> Result<Option<Snapshot>, StoreError> {
        self.inner.load_snapshot(stream_id).await
    }
}

async fn snapshot_taken_by_one_instance_is_used_by_another(store: Arc<dyn EventStore>) {
    let writer =
        CommandHandler::new(Arc::clone(&store), RetryPolicy::default()).with_snapshots_every(10);
    let create = FileCommand::Create {
        name: FileName::parse("v0").unwrap(),
        folder_id: Id::parse("docs").unwrap(),
    };
    writer
        .execute::<File>(command("f", create, None))
        .await
        .unwrap();
    for n in 1..=25 {
        writer
            .execute::<File>(command("f", rename(&format!("v{n}")), None))
            .await
            .unwrap();
    }
    // Saved in the background once the stream passed 10 and 20 events.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store
        .load_snapshot("file-f")
        .await
        .unwrap()
        .is_none_or(|s| s.version < 20)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot at version 20"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // Another instance, nothing cached: it starts from the snapshot.
    let recording = Arc::new(Recording {
        inner: Arc::clone(&store),
        reads_from: Default::default(),
    });
    let other =
        CommandHandler::new(recording.clone(), RetryPolicy::default()).with_snapshots_every(10);
    let unchanged = other
        .execute::<File>(command("f", rename("v25"), None))
        .await
        .unwrap_err();
    assert!(
        matches!(
            unchanged,
            CommandError::Domain(DomainError::Precondition {
                rule: "NAME_UNCHANGED",
                ..
            })
        ),
        "decided on the state after all 26 events: {unchanged:?}"
    );
    assert_eq!(*recording.reads_from.lock().unwrap(), [21]);

    // A snapshot of an old shape is discarded, never decoded.
    store
        .save_snapshot(Snapshot {
            stream_id: "file-f".into(),
            version: 26,
            shape: 999,
            state: b"not what File encodes".to_vec(),
        })
        .await
        .unwrap();
    let recording = Arc::new(Recording {
        inner: Arc::clone(&store),
        reads_from: Default::default(),
    });
    let fresh =
        CommandHandler::new(recording.clone(), RetryPolicy::default()).with_snapshots_every(10);
    let renamed = fresh
        .execute::<File>(command("f", rename("v26"), None))
        .await
        .unwrap();
    assert_eq!(renamed.result().version, 27);
    assert_eq!(*recording.reads_from.lock().unwrap(), [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_snapshot_taken_by_one_instance_is_used_by_another() {
    let (store, _dir) = support::redb_store();
    snapshot_taken_by_one_instance_is_used_by_another(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_snapshot_taken_by_one_instance_is_used_by_another() {
    let schema = support::unique_schema("snap");
    let config = scaleout::store::postgres::PostgresConfig::new(&support::postgres_url())
        .with_schema(schema.clone());
    let store = scaleout::store::postgres::PostgresStore::connect(config)
        .await
        .unwrap();
    snapshot_taken_by_one_instance_is_used_by_another(Arc::new(store)).await;
    support::drop_schema(&schema).await;
}
