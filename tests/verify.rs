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
        origin: Default::default(),
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
    // 5 files × (view, comments, history) + 1 folder + 1 counter.
    assert_eq!(empty.documents, 17);
    assert_eq!((empty.drifted, empty.repaired), (17, 17));
    assert!(empty.examples.iter().all(|drift| drift.actual.is_none()));
    let clean = check(false).await;
    assert_eq!((clean.documents, clean.drifted), (17, 0), "{clean:?}");

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

/// The Verify RPC as a projector serves it: drift named with both sides,
/// repaired, then clean; an unknown projection is INVALID_ARGUMENT naming
/// the known ones; while one verification runs, another is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verify_rpc_reports_repairs_and_runs_one_at_a_time() {
    use reference::pb::{self, read_model_service_client::ReadModelServiceClient};
    use tonic::Code;

    let (store, _dir) = support::redb_store();
    let handler = CommandHandler::new(Arc::clone(&store), RetryPolicy::default());
    for _ in 0..2 {
        let increment = CounterCommand::Increment {
            amount: Amount::parse(3).unwrap(),
        };
        handler
            .execute::<Counter>(command("c", increment))
            .await
            .unwrap();
    }
    // The projector reads the log through a proxy the test can freeze.
    let views = tempfile::tempdir().unwrap();
    let documents: Arc<dyn DocumentStore> =
        Arc::new(RedbDocuments::open(views.path().join("views.redb")).unwrap());
    let stopping = tokio_util::sync::CancellationToken::new();
    let projector = support::ProxiedProjector::start(
        Arc::clone(&store),
        Arc::clone(&documents),
        stopping.clone(),
    )
    .await;
    let proxy = &projector.proxy;
    let channel = tonic::transport::Endpoint::from_shared(projector.url.clone())
        .unwrap()
        .connect_lazy();
    let mut client = ReadModelServiceClient::new(channel);
    let counters = |repair| pb::VerifyRequest {
        projections: vec!["counter".into()],
        repair,
    };

    let missing = client.verify(counters(false)).await.unwrap().into_inner();
    assert_eq!(
        (missing.events, missing.documents, missing.drifted),
        (2, 1, 1)
    );
    assert_eq!(missing.drifts[0].key, "counter::c");
    assert!(missing.drifts[0].missing && missing.drifts[0].stored_json.is_empty());
    let repaired = client.verify(counters(true)).await.unwrap().into_inner();
    assert_eq!(repaired.repaired, 1);

    let stored = documents.get("counter::c").await.unwrap().unwrap();
    let mut corrupt: serde_json::Value = serde_json::from_slice(&stored.body).unwrap();
    assert_eq!(corrupt["count"], 6, "repair wrote the fold");
    corrupt["count"] = 999.into();
    documents
        .replace(
            "counter::c",
            &serde_json::to_vec(&corrupt).unwrap(),
            stored.cas,
        )
        .await
        .unwrap();
    let found = client.verify(counters(false)).await.unwrap().into_inner();
    assert_eq!(found.drifted, 1);
    let drift = &found.drifts[0];
    let (expected, stored): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&drift.expected_json).unwrap(),
        serde_json::from_str(&drift.stored_json).unwrap(),
    );
    assert_eq!(
        (expected["count"].as_u64(), stored["count"].as_u64()),
        (Some(6), Some(999))
    );
    client.verify(counters(true)).await.unwrap();
    let clean = client.verify(counters(false)).await.unwrap().into_inner();
    assert_eq!((clean.documents, clean.drifted), (1, 0));

    let unknown = client
        .verify(pb::VerifyRequest {
            projections: vec!["nope".into()],
            repair: false,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert!(unknown.message().contains("counter"), "{unknown:?}");

    // Two at once on a frozen log: one holds the turn, the other is refused.
    proxy.freeze();
    let verifying = || {
        let mut client = client.clone();
        tokio::spawn(async move { client.verify(counters(false)).await })
    };
    let (mut one, mut other) = (verifying(), verifying());
    let (refused, waiting) = tokio::select! {
        done = &mut one => (done, other),
        done = &mut other => (done, one),
    };
    let refused = refused.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    proxy.thaw();
    let verified = waiting.await.unwrap().unwrap().into_inner();
    assert_eq!(verified.drifted, 0);

    stopping.cancel();
}
