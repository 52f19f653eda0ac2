//! Command handling across instances: two handlers on one store behave like
//! two command-svc processes (separate turns, separate caches).

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use reference::domain::values::{Amount, FileName, Id};
use reference::domain::{Counter, CounterCommand, File, FileCommand};
use scaleout::command::{Command, CommandError, CommandHandler, RetryPolicy};
use scaleout::domain::DomainError;
use scaleout::store::{EventStore, ExpectedVersion, StoreError};

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
