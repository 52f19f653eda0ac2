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
        origin: Default::default(),
    }
}

fn rename(to: &str) -> FileCommand {
    FileCommand::Rename {
        new_name: FileName::parse(to).unwrap(),
    }
}

/// Never decides a command again after a lost race: a stale decision then
/// surfaces as a version conflict.
fn no_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 0,
        ..RetryPolicy::default()
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
    let [a, b] = instances(&store, no_retry());
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

/// A real store that records where each stream read started, and can let
/// another instance get in first: before each of the next chains of several
/// appends, `cut_in` renames the file through its own handler on the
/// inner store.
#[derive(Debug, Default)]
struct Recording {
    inner: Option<Arc<dyn EventStore>>,
    reads_from: std::sync::Mutex<Vec<u64>>,
    cut_in: Option<CommandHandler>,
    cut_ins_left: std::sync::atomic::AtomicU32,
}

impl Recording {
    fn over(inner: &Arc<dyn EventStore>) -> Self {
        Self {
            inner: Some(Arc::clone(inner)),
            ..Self::default()
        }
    }

    fn inner(&self) -> &Arc<dyn EventStore> {
        self.inner.as_ref().expect("a store to record")
    }
}

#[async_trait::async_trait]
impl EventStore for Recording {
    async fn append_chain(
        &self,
        chain: Vec<scaleout::store::AppendRequest>,
    ) -> Vec<Result<scaleout::store::AppendOutcome, StoreError>> {
        use std::sync::atomic::Ordering::SeqCst;
        if let Some(other) = &self.cut_in
            && chain.len() > 1
            && self
                .cut_ins_left
                .fetch_update(SeqCst, SeqCst, |left| left.checked_sub(1))
                .is_ok()
        {
            let name = format!("cut{}", uuid::Uuid::now_v7().simple());
            other
                .execute::<File>(command("f", rename(&name), None))
                .await
                .unwrap();
        }
        self.inner().append_chain(chain).await
    }
    async fn read_stream(
        &self,
        stream_id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<scaleout::store::RecordedEvent>, StoreError> {
        self.reads_from.lock().unwrap().push(from_version);
        self.inner()
            .read_stream(stream_id, from_version, limit)
            .await
    }
    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &scaleout::store::LogFilter,
    ) -> Result<scaleout::store::LogPage, StoreError> {
        self.inner().read_all(from_position, limit, filter).await
    }
    async fn find_request(
        &self,
        request_id: scaleout::store::RequestId,
    ) -> Result<Option<scaleout::store::RecordedRequest>, StoreError> {
        self.inner().find_request(request_id).await
    }
    async fn read_outbox(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<scaleout::store::RecordedEvent>, StoreError> {
        self.inner().read_outbox(after, limit).await
    }
    async fn lease_outbox(&self) -> Result<bool, StoreError> {
        self.inner().lease_outbox().await
    }
    async fn delete_outbox(&self, positions: &[u64]) -> Result<(), StoreError> {
        self.inner().delete_outbox(positions).await
    }
    fn appended(&self) -> &tokio::sync::Notify {
        self.inner().appended()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner().ping().await
    }
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        self.inner().save_snapshot(snapshot).await
    }
    async fn load_snapshot(&self, stream_id: &str) -> Result<Option<Snapshot>, StoreError> {
        self.inner().load_snapshot(stream_id).await
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
    let recording = Arc::new(Recording::over(&store));
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
    let recording = Arc::new(Recording::over(&store));
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

/// The name each rename of file `f` wrote, by stream version; and each was
/// decided on the state before it: its old name is the previous new one.
async fn names_by_version(store: &Arc<dyn EventStore>) -> std::collections::BTreeMap<u64, String> {
    use prost::Message;
    let mut current = "v0".to_owned();
    let mut names = std::collections::BTreeMap::new();
    for event in store.read_stream("file-f", 2, usize::MAX).await.unwrap() {
        if event.event_type != "scaleout.v1.FileRenamed" {
            continue;
        }
        let renamed = reference::pb::FileRenamed::decode(&*event.payload).unwrap();
        assert_eq!(renamed.old_name, current, "version {}", event.version);
        current.clone_from(&renamed.new_name);
        names.insert(event.version, renamed.new_name);
    }
    names
}

async fn created(handler: &CommandHandler) {
    let create = FileCommand::Create {
        name: FileName::parse("v0").unwrap(),
        folder_id: Id::parse("docs").unwrap(),
    };
    handler
        .execute::<File>(command("f", create, None))
        .await
        .unwrap();
}

/// Commands queued on one stream are decided one after another on the state
/// the ones before them leave, though they commit together: a rename
/// queued behind the delete is refused, and every acknowledged version
/// holds exactly the event its command decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_queued_on_one_stream_decide_on_what_the_earlier_ones_leave() {
    let (store, _dir) = support::redb_store();
    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));
    created(&handler).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..60 {
        let handler = Arc::clone(&handler);
        calls.spawn(async move {
            let (name, asked) = match i {
                30 => (None, FileCommand::Delete),
                i => (Some(format!("n{i}")), rename(&format!("n{i}"))),
            };
            let outcome = handler.execute::<File>(command("f", asked, None)).await;
            (name, outcome)
        });
    }
    let (mut acknowledged, mut deleted_at, mut refused) = (Vec::new(), None, 0);
    while let Some(joined) = calls.join_next().await {
        match joined.unwrap() {
            (None, outcome) => deleted_at = Some(outcome.unwrap().result().version),
            (Some(name), Ok(outcome)) => acknowledged.push((outcome.result().version, name)),
            (Some(_), Err(error)) => {
                assert!(
                    matches!(
                        error,
                        CommandError::Domain(DomainError::Precondition {
                            rule: "FILE_DELETED",
                            ..
                        })
                    ),
                    "{error:?}"
                );
                refused += 1;
            }
        }
    }
    let deleted_at = deleted_at.unwrap();
    acknowledged.sort();
    let versions: Vec<u64> = acknowledged.iter().map(|(v, _)| *v).collect();
    assert_eq!(
        versions,
        (2..deleted_at).collect::<Vec<_>>(),
        "no gap, no rename after the delete"
    );
    assert_eq!(acknowledged.len() + refused, 59);
    let stored = names_by_version(&store).await;
    assert_eq!(stored, acknowledged.into_iter().collect());
}

/// Another instance gets in just before each of several chains commits, so
/// each is refused from its first append on: the rest would otherwise
/// match the versions the other's event moved to, though decided on a state
/// that never was. Each is decided again; nothing is lost or doubled, and
/// each acknowledged version holds its own command's event, decided on the
/// state before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_another_instance_got_ahead_of_is_decided_again() {
    let (store, _dir) = support::redb_store();
    let recording = Arc::new(Recording {
        cut_in: Some(CommandHandler::new(
            Arc::clone(&store),
            RetryPolicy::default(),
        )),
        cut_ins_left: 5.into(),
        ..Recording::over(&store)
    });
    let handler = Arc::new(CommandHandler::new(
        recording.clone(),
        RetryPolicy::default(),
    ));
    created(&handler).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..200 {
        let handler = Arc::clone(&handler);
        calls.spawn(async move {
            let name = format!("n{i}");
            let outcome = handler
                .execute::<File>(command("f", rename(&name), None))
                .await;
            (
                outcome
                    .expect("a lost race is decided again")
                    .result()
                    .version,
                name,
            )
        });
    }
    let mut acknowledged = std::collections::BTreeMap::new();
    while let Some(joined) = calls.join_next().await {
        let (version, name) = joined.unwrap();
        assert!(
            acknowledged.insert(version, name).is_none(),
            "version {version} twice"
        );
    }
    let cut_in = recording
        .cut_ins_left
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(cut_in, 0, "every cut-in happened");
    let mut stored = names_by_version(&store).await;
    stored.retain(|_, name| !name.starts_with("cut"));
    assert_eq!(stored.len(), 200);
    assert_eq!(stored, acknowledged);
}

/// Within one round, commands that name the same exact version: the first
/// is written, the rest see the version it moved to, as one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_commands_with_one_exact_version_let_one_through() {
    let (store, _dir) = support::redb_store();
    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));
    created(&handler).await;
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let expected = Some(ExpectedVersion::Exact(1));
                handler
                    .execute::<File>(command("f", rename(&format!("n{i}")), expected))
                    .await
            })
        })
        .collect();
    let mut written = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(outcome) => {
                assert_eq!(outcome.result().version, 2);
                written += 1;
            }
            Err(lost) => assert!(
                matches!(
                    lost,
                    CommandError::Store(StoreError::WrongExpectedVersion {
                        expected: ExpectedVersion::Exact(1),
                        actual: 2,
                        ..
                    })
                ),
                "{lost:?}"
            ),
        }
    }
    assert_eq!(written, 1);
}

/// The same request sent twice at once: in one round the store replays the
/// second, and the round goes on with the commands behind it; in the next
/// it is decided on what the first wrote (here: refused, the name being
/// taken) and then found recorded. Either way it is answered with the
/// first's result and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_repeated_within_a_round_is_replayed() {
    use scaleout::store::{Fingerprint, RequestId, RequestKey};
    let (store, _dir) = support::redb_store();
    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));
    created(&handler).await;
    let key = RequestKey {
        id: RequestId(uuid::Uuid::new_v4()),
        fingerprint: Fingerprint::of("test.Rename", b"twice"),
    };
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let mut sent = command("f", rename(&format!("n{i}")), None);
                if i < 2 {
                    sent.command = rename("twice");
                    sent.request_key = Some(key);
                }
                handler.execute::<File>(sent).await.unwrap()
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.unwrap());
    }
    let (first, second) = (&outcomes[0], &outcomes[1]);
    assert_eq!(first.result(), second.result());
    let replayed = outcomes[..2]
        .iter()
        .filter(|o| matches!(o, scaleout::store::AppendOutcome::Replayed(_)))
        .count();
    assert_eq!(replayed, 1, "{outcomes:?}");
    let stored = names_by_version(&store).await;
    assert_eq!(stored.len(), 9, "the repeat wrote nothing: {stored:?}");
    assert_eq!(stored[&first.result().version], "twice");
}

/// Clients that each send one command after another on one stream: its
/// queue runs empty and fills again all the time, so leaders end while the
/// next command arrives. Every command is answered, each version once. (A
/// leader ending as the next starts is pinned exactly by `command::queue`'s
/// unit test; here it is met at whatever moments the scheduler gives.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_that_end_as_the_next_command_arrives_lose_nothing() {
    let (store, _dir) = support::redb_store();
    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let handler = Arc::clone(&handler);
        clients.spawn(async move {
            let mut versions = Vec::new();
            for _ in 0..150 {
                let increment = CounterCommand::Increment {
                    amount: Amount::parse(1).unwrap(),
                };
                let outcome = handler
                    .execute::<Counter>(command("busy", increment, None))
                    .await
                    .expect("answered");
                versions.push(outcome.result().version);
            }
            versions
        });
    }
    let mut versions = BTreeSet::new();
    while let Some(joined) = clients.join_next().await {
        for version in joined.unwrap() {
            assert!(versions.insert(version), "version {version} twice");
        }
    }
    assert_eq!(versions, (1..=1200).collect());
}

/// A stream only this instance writes, new when first loaded, is read once
/// then: every later command is decided on the cached state, which the
/// expected version of its append proves current.
#[tokio::test]
async fn a_stream_only_this_instance_writes_is_read_once() {
    let (store, _dir) = support::redb_store();
    let recording = Arc::new(Recording::over(&store));
    let handler = CommandHandler::new(recording.clone(), RetryPolicy::default());
    for expected_version in 1..=10 {
        let increment = CounterCommand::Increment {
            amount: Amount::parse(1).unwrap(),
        };
        let outcome = handler
            .execute::<Counter>(command("alone", increment, None))
            .await
            .unwrap();
        assert_eq!(outcome.result().version, expected_version);
    }
    assert_eq!(*recording.reads_from.lock().unwrap(), [1]);
}

/// Another instance moved the stream past the state this one cached: what
/// the cached state alone would answer (a refusal, a version conflict) is
/// not answered before the stream is read, and a decision on it is refused
/// by the store and decided again, even with no retries allowed.
#[tokio::test]
async fn a_cached_state_another_instance_moved_past_decides_nothing_alone() {
    let (store, _dir) = support::redb_store();
    let [a, b] = instances(&store, no_retry());
    let rename_on = async |handler: &CommandHandler, to: &str, expected: Option<u64>| {
        let expected = expected.map(ExpectedVersion::Exact);
        handler
            .execute::<File>(command("f", rename(to), expected))
            .await
    };
    created(&a).await;
    rename_on(&a, "b", None).await.unwrap();
    rename_on(&b, "c", None).await.unwrap();
    // Cached, `a` sees "b" at version 2: renaming to "b" would change nothing.
    let renamed = rename_on(&a, "b", None)
        .await
        .expect("decided on the stream");
    assert_eq!(renamed.result().version, 4);

    // Each time, `a` first reads nothing new, so it trusts its cache again.
    rename_on(&a, "x", None).await.unwrap();
    rename_on(&b, "d", None).await.unwrap();
    // The version the client saw is the stream's, not the cached one.
    let renamed = rename_on(&a, "e", Some(6))
        .await
        .expect("the stream is at the version the client expects");
    assert_eq!(renamed.result().version, 7);

    rename_on(&a, "y", None).await.unwrap();
    rename_on(&b, "f", None).await.unwrap();
    // Matching the cached version, not the stream's: refused with the stream's.
    let stale = rename_on(&a, "g", Some(8)).await.unwrap_err();
    assert!(
        matches!(
            stale,
            CommandError::Store(StoreError::WrongExpectedVersion {
                expected: ExpectedVersion::Exact(8),
                actual: 9,
                ..
            })
        ),
        "{stale:?}"
    );
    let names = names_by_version(&store).await;
    assert_eq!(
        names.into_values().collect::<Vec<_>>(),
        ["b", "c", "b", "x", "d", "e", "y", "f"]
    );
}

/// Two commands queued together on a cached state another instance moved
/// past: the first is refused on that state and the second's append is
/// refused by the store. The refusal is not answered (nothing proves the
/// state it was decided on), and both are decided again on the stream.
#[tokio::test]
async fn commands_queued_together_on_a_stale_cached_state_are_decided_again() {
    let (store, _dir) = support::redb_store();
    let [a, b] = instances(&store, no_retry());
    created(&a).await;
    a.execute::<File>(command("f", rename("b"), None))
        .await
        .unwrap();
    b.execute::<File>(command("f", rename("c"), None))
        .await
        .unwrap();
    // On this single-threaded runtime both queue before the round starts.
    let (back, on) = tokio::join!(
        a.execute::<File>(command("f", rename("b"), None)),
        a.execute::<File>(command("f", rename("x"), None)),
    );
    assert_eq!(
        back.expect("\"c\" renamed back to \"b\"").result().version,
        4
    );
    assert_eq!(on.unwrap().result().version, 5);
    let names = names_by_version(&store).await;
    assert_eq!(
        names.into_values().collect::<Vec<_>>(),
        ["b", "c", "b", "x"]
    );
}
