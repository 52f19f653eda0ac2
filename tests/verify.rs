//! Verifying read models against the event log: a clean store has no
//! drift, a hand-corrupted document is found and named, repair writes the
//! fold back, and a store with nothing in it is rebuilt by repair.

mod support;

use std::sync::Arc;

use reference::domain::values::{Amount, Author, CommentText, FileName, Id};
use reference::domain::{Counter, CounterCommand, File, FileCommand};
use scaleout::app::Application;
use scaleout::command::{Command, CommandHandler, RetryPolicy};
use scaleout::documents::DocumentStore;
use scaleout::documents::redb::RedbDocuments;
use scaleout::log::StoreLog;
use scaleout::projection::verify::verify;

fn command<C>(id: &str, command: C) -> Command<C> {
    Command {
        aggregate_id: Id::parse(id).unwrap(),
        command,
        expected: None,
        request_key: None,
        correlation_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_found_named_and_repaired() {
    let (store, _dir) = support::redb_store();
    let handler = CommandHandler::new(Arc::clone(&store), RetryPolicy::default());
    for n in 0..5 {
        let id = format!("f{n}");
        let create = FileCommand::Create {
            name: FileName::parse(&format!("{id}.txt")).unwrap(),
            folder_id: Id::parse("docs").unwrap(),
        };
        handler.execute::<File>(command(&id, create)).await.unwrap();
        let comment = FileCommand::AddComment {
            author: Author::parse("ada").unwrap(),
            text: CommentText::parse("looks good").unwrap(),
        };
        handler
            .execute::<File>(command(&id, comment))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        let increment = CounterCommand::Increment {
            amount: Amount::parse(2).unwrap(),
        };
        handler
            .execute::<Counter>(command("c", increment))
            .await
            .unwrap();
    }
    let views = tempfile::tempdir().unwrap();
    let documents = RedbDocuments::open(views.path().join("views.redb")).unwrap();
    let log = StoreLog(Arc::clone(&store));
    let app = reference::Reference;
    let (known, projections) = (app.known_types(), app.projections());
    let check = async |repair| {
        verify(&log, &documents, &known, &projections, repair)
            .await
            .unwrap()
    };

    // Nothing stored: every document drifts; repair builds them all.
    let empty = check(true).await;
    assert_eq!(empty.events, 13);
    // 5 files × (view, comments) + 1 folder + 1 counter.
    assert_eq!(empty.documents, 12);
    assert_eq!((empty.drifted, empty.repaired), (12, 12));
    assert!(empty.examples.iter().all(|drift| drift.actual.is_none()));
    let clean = check(false).await;
    assert_eq!((clean.documents, clean.drifted), (12, 0), "{clean:?}");

    // A hand-corrupted document is found, named, and shown.
    let stored = documents.get("counter::c").await.unwrap().unwrap();
    let mut corrupt: serde_json::Value = serde_json::from_slice(&stored.body).unwrap();
    corrupt["count"] = 999.into();
    documents
        .replace(
            "counter::c",
            &serde_json::to_vec(&corrupt).unwrap(),
            stored.cas,
        )
        .await
        .unwrap();
    let found = check(false).await;
    assert_eq!(found.drifted, 1);
    assert_eq!(found.examples[0].key, "counter::c");
    assert_eq!(found.examples[0].expected["count"], 6);
    assert_eq!(found.examples[0].actual.as_ref().unwrap()["count"], 999);

    let repaired = check(true).await;
    assert_eq!((repaired.drifted, repaired.repaired), (1, 1));
    assert_eq!(check(false).await.drifted, 0);
}

/// `projector verify` as an operator runs it against command-svc's read API:
/// exit 1 while drift is left, 0 once repaired, the drifted key printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verify_command_exits_by_what_it_found() {
    let (store, _dir) = support::redb_store();
    let handler = CommandHandler::new(Arc::clone(&store), RetryPolicy::default());
    let increment = CounterCommand::Increment {
        amount: Amount::parse(4).unwrap(),
    };
    handler
        .execute::<Counter>(command("c", increment))
        .await
        .unwrap();
    let log = support::CommandService::start(Arc::clone(&store)).await;
    let views = tempfile::tempdir().unwrap();
    let path = views.path().join("views.redb");
    let url = log.url();
    let run = move |repair: bool| {
        let mut command = std::process::Command::new(support::workspace_binary("projector"));
        command
            .args(["--event-log", &url])
            .args(["--document-store", &format!("redb:{}", path.display())])
            .arg("verify");
        if repair {
            command.arg("--repair");
        }
        command.output().unwrap()
    };
    // Each run holds the redb file; one after another, off the runtime.
    let (missing, repaired, clean) =
        tokio::task::spawn_blocking(move || (run(false), run(true), run(false)))
            .await
            .unwrap();
    let printed = String::from_utf8_lossy(&missing.stdout).into_owned();
    assert_eq!(missing.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains("counter::c") && printed.contains("missing"),
        "{printed}"
    );
    assert_eq!(repaired.status.code(), Some(0));
    let printed = String::from_utf8_lossy(&clean.stdout).into_owned();
    assert_eq!(clean.status.code(), Some(0), "{printed}");
    assert!(printed.contains("0 drifted"), "{printed}");
}
