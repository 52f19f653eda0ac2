//! Projectors in process: read models equal the fold of the event log under
//! competing workers, injected duplicates and reordering, lost deliveries,
//! a rolled-back document and a document store outage; poison is parked;
//! and a naive GET/SET writer is caught losing updates.

mod support;

use std::sync::Arc;
use std::time::Duration;

use reference::domain::values::{Amount, Author, CommentText, FileName, Id};
use reference::domain::{Counter, CounterCommand, File, FileCommand};
use scaleout::bus::memory::MemoryBus;
use scaleout::bus::{BusMessage, EventBus, Subscription};
use scaleout::command::{Command, CommandHandler, RetryPolicy};
use scaleout::documents::DocumentStore;
use scaleout::documents::redb::RedbDocuments;
use scaleout::log::StoreLog;
use scaleout::projection::metrics::ProjectorMetrics;
use scaleout::projection::runtime::{Projector, ProjectorConfig};
use scaleout::store::EventStore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(60);

fn subscription() -> Subscription {
    Subscription {
        service_type: "projector".into(),
        bindings: vec!["#".into()],
        prefetch: 50,
        max_attempts: 5,
    }
}

/// `workers` competing projector workers on an in-process bus.
struct Projectors {
    documents: Arc<dyn DocumentStore>,
    metrics: Arc<ProjectorMetrics>,
    stopping: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Projectors {
    /// Workers that fill gaps from `store`'s log.
    async fn start(bus: &Arc<dyn EventBus>, store: &Arc<dyn EventStore>, workers: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let documents: Arc<dyn DocumentStore> =
            Arc::new(RedbDocuments::open(dir.path().join("views.redb")).unwrap());
        Self::start_on(bus, store, documents, workers, dir).await
    }

    async fn start_on(
        bus: &Arc<dyn EventBus>,
        store: &Arc<dyn EventStore>,
        documents: Arc<dyn DocumentStore>,
        workers: usize,
        dir: tempfile::TempDir,
    ) -> Self {
        let metrics = Arc::new(ProjectorMetrics::default());
        let config = ProjectorConfig {
            batch: 50,
            ..ProjectorConfig::default()
        };
        let projector = Projector::new(
            Arc::clone(&documents),
            Arc::new(StoreLog(Arc::clone(store))),
            scaleout::app::Application::known_types(&reference::Reference),
            reference::views::all(),
            Arc::clone(&metrics),
            config,
        );
        let stopping = CancellationToken::new();
        for _ in 0..workers {
            let subscriber = bus.subscribe(&subscription()).await.unwrap();
            let (projector, stopping) = (projector.clone(), stopping.clone());
            tokio::spawn(async move { projector.run(subscriber, stopping).await });
        }
        Self {
            documents,
            metrics,
            stopping,
            _dir: dir,
        }
    }
}

impl Drop for Projectors {
    fn drop(&mut self) {
        self.stopping.cancel();
    }
}

fn command<C>(id: &str, command: C) -> Command<C> {
    Command {
        aggregate_id: Id::parse(id).unwrap(),
        command,
        expected: None,
        request_key: None,
        origin: Default::default(),
    }
}

/// A workload over every read model; returns the streams it wrote.
async fn workload(handler: &Arc<CommandHandler>) -> Vec<String> {
    let mut streams = Vec::new();
    let name = |s: &str| FileName::parse(s).unwrap();
    let folder = |s: &str| Id::parse(s).unwrap();
    for i in 0..12 {
        let id = format!("f{i}");
        let create = FileCommand::Create {
            name: name(&format!("file {i}.txt")),
            folder_id: folder(["docs", "images", "archive"][i % 3]),
        };
        handler.execute::<File>(command(&id, create)).await.unwrap();
        streams.push(format!("file-{id}"));
    }
    let mut tasks = JoinSet::new();
    for i in 0..12 {
        let handler = Arc::clone(handler);
        tasks.spawn(async move {
            let id = format!("f{i}");
            for c in 0..5 {
                let comment = FileCommand::AddComment {
                    author: Author::parse("ann").unwrap(),
                    text: CommentText::parse(&format!("comment {c} on {id}")).unwrap(),
                };
                handler
                    .execute::<File>(command(&id, comment))
                    .await
                    .unwrap();
            }
            if i % 2 == 0 {
                let rename = FileCommand::Rename {
                    new_name: FileName::parse(&format!("renamed {i}.txt")).unwrap(),
                };
                handler.execute::<File>(command(&id, rename)).await.unwrap();
            }
            if i % 3 == 1 {
                let to = Id::parse(if i % 2 == 0 { "docs" } else { "archive" }).unwrap();
                let moved = FileCommand::Move { to_folder_id: to };
                handler.execute::<File>(command(&id, moved)).await.unwrap();
            }
            if i % 4 == 3 {
                handler
                    .execute::<File>(command(&id, FileCommand::Delete))
                    .await
                    .unwrap();
            }
        });
    }
    for t in 0..8 {
        let handler = Arc::clone(handler);
        tasks.spawn(async move {
            for _ in 0..50 {
                let increment = CounterCommand::Increment {
                    amount: Amount::parse(1 + t).unwrap(),
                };
                handler
                    .execute::<Counter>(command("hot", increment))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(task) = tasks.join_next().await {
        task.unwrap();
    }
    streams.push("counter-hot".into());
    streams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_models_equal_the_fold_of_the_log_with_competing_workers() {
    let (store, _dir) = support::redb_store();
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    let projectors = Projectors::start(&bus, &store, 3).await;
    let stopping = CancellationToken::new();
    let relay =
        scaleout::relay::Relay::new(Arc::clone(&store), Arc::clone(&bus), Default::default());
    tokio::spawn(relay.run(stopping.clone()));
    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));

    let streams = workload(&handler).await;
    let log = support::projection::read_log(store.as_ref(), &streams).await;
    let expected = support::projection::fold_log(&log);
    let hot = &expected["counter::hot"];
    assert_eq!(
        hot["count"],
        50 * (1..=8).sum::<u64>(),
        "the fold itself counts right"
    );
    support::projection::wait_for_fold(projectors.documents.as_ref(), &expected, PATIENCE).await;
    stopping.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_and_reordered_deliveries_change_nothing() {
    let (store, _dir) = support::redb_store();
    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));
    let streams = workload(&handler).await;
    let log = support::projection::read_log(store.as_ref(), &streams).await;
    let expected = support::projection::fold_log(&log);

    // No relay: the test publishes the log itself, shuffled, every event
    // twice or three times.
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    let projectors = Projectors::start(&bus, &store, 3).await;
    let mut messages: Vec<BusMessage> = log.iter().map(BusMessage::from_event).collect();
    let copies: Vec<BusMessage> = messages.iter().step_by(2).cloned().collect();
    messages.extend(copies.iter().cloned());
    messages.extend(copies);
    fastrand::seed(7);
    fastrand::shuffle(&mut messages);
    for result in bus.publish(&messages).await {
        result.unwrap();
    }
    support::projection::wait_for_fold(projectors.documents.as_ref(), &expected, PATIENCE).await;
    let duplicates = projectors
        .metrics
        .duplicates
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        duplicates > 0,
        "the injected copies were seen as duplicates"
    );
    assert!(
        bus.dead_letters("projector", 0, 10)
            .await
            .unwrap()
            .dead_letters
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_parked_with_its_reason_and_nothing_else_moves() {
    let (store, _dir) = support::redb_store();
    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));
    let increment = CounterCommand::Increment {
        amount: Amount::parse(1).unwrap(),
    };
    handler
        .execute::<Counter>(command("c", increment))
        .await
        .unwrap();
    let log = support::projection::read_log(store.as_ref(), &["counter-c".into()]).await;
    let good = BusMessage::from_event(&log[0]);
    let undecodable = BusMessage {
        message_id: "undecodable".into(),
        body: b"\x08\xff\xff garbage".to_vec(),
        ..good.clone()
    };
    let mut unknown_event = log[0].clone();
    unknown_event.event_type = "scaleout.v1.SomethingNew".into();
    unknown_event.event_id = uuid::Uuid::now_v7();
    let unknown = BusMessage::from_event(&unknown_event);

    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    let projectors = Projectors::start(&bus, &store, 1).await;
    for result in bus.publish(&[undecodable, unknown.clone(), good]).await {
        result.unwrap();
    }
    let expected = support::projection::fold_log(&log);
    support::projection::wait_for_fold(projectors.documents.as_ref(), &expected, PATIENCE).await;
    let started = std::time::Instant::now();
    let parked = loop {
        let parked = bus
            .dead_letters("projector", 0, 10)
            .await
            .unwrap()
            .dead_letters;
        if parked.len() == 2 || started.elapsed() > PATIENCE {
            break parked;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let reasons: Vec<_> = parked
        .iter()
        .map(|d| (d.message.message_id.as_str(), d.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].0 == "undecodable" && reasons[0].1.contains("undecodable body"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].0 == unknown.message_id && reasons[1].1.contains("SomethingNew"),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_naive_get_set_writer_loses_updates_and_the_harness_says_so() {
    let (store, _dir) = support::redb_store();
    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));
    let mut tasks = JoinSet::new();
    for _ in 0..4 {
        let handler = Arc::clone(&handler);
        tasks.spawn(async move {
            for _ in 0..250 {
                let increment = CounterCommand::Increment {
                    amount: Amount::parse(1).unwrap(),
                };
                handler
                    .execute::<Counter>(command("hot", increment))
                    .await
                    .unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let log = support::projection::read_log(store.as_ref(), &["counter-hot".into()]).await;
    let messages: Vec<BusMessage> = log.iter().map(BusMessage::from_event).collect();

    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    let dir = tempfile::tempdir().unwrap();
    let documents: Arc<dyn DocumentStore> =
        Arc::new(RedbDocuments::open(dir.path().join("views.redb")).unwrap());
    let subscription = Subscription {
        service_type: "projector".into(),
        bindings: vec!["#".into()],
        prefetch: 50,
        max_attempts: 5,
    };
    let naive =
        support::naive::NaiveWorkers::start(&bus, &subscription, Arc::clone(&documents), 3).await;
    for result in bus.publish(&messages).await {
        result.unwrap();
    }
    // Wait until every delivery was handled, then read the count.
    let started = std::time::Instant::now();
    while naive.settled.load(std::sync::atomic::Ordering::SeqCst) < 1000 {
        assert!(started.elapsed() < PATIENCE, "naive projector stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let document = documents.get("counter::hot").await.unwrap().unwrap();
    let count = serde_json::from_slice::<serde_json::Value>(&document.body).unwrap()["count"]
        .as_u64()
        .unwrap();
    assert!(
        count < 1000,
        "GET/SET from 3 workers should have lost updates, got {count} of 1000"
    );
    println!(
        "naive GET/SET writer: counter at {count} of 1000 ({} lost)",
        1000 - count
    );
}

/// Deliveries that never arrive (every seventh event is not published):
/// the events after them fill the gaps from the log, and the views equal
/// the fold anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_deliveries_are_read_from_the_log() {
    let (store, _dir) = support::redb_store();
    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));
    let streams = workload(&handler).await;
    let log = support::projection::read_log(store.as_ref(), &streams).await;
    let expected = support::projection::fold_log(&log);
    // The last event of each stream is always delivered, so every stream
    // has a delivery after each of its lost ones.
    let last: std::collections::HashMap<&str, u64> = log
        .iter()
        .map(|e| (e.stream_id.as_str(), e.version))
        .collect();
    let delivered: Vec<BusMessage> = log
        .iter()
        .enumerate()
        .filter(|(n, e)| n % 7 != 3 || last[e.stream_id.as_str()] == e.version)
        .map(|(_, e)| BusMessage::from_event(e))
        .collect();
    assert!(delivered.len() < log.len());

    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    let projectors = Projectors::start(&bus, &store, 2).await;
    for result in bus.publish(&delivered).await {
        result.unwrap();
    }
    support::projection::wait_for_fold(projectors.documents.as_ref(), &expected, PATIENCE).await;
    let filled = projectors
        .metrics
        .gap_fills
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(filled > 0, "gaps were filled from the log");
    assert!(
        bus.dead_letters("projector", 0, 10)
            .await
            .unwrap()
            .dead_letters
            .is_empty()
    );
}

/// A document written back to an older body (a failover without
/// durability, an operator's mistake): the next event of its stream
/// brings it back from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_document_heals_on_the_next_event() {
    let (store, _dir) = support::redb_store();
    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    let projectors = Projectors::start(&bus, &store, 1).await;
    let increment = |n: u64| CounterCommand::Increment {
        amount: Amount::parse(n).unwrap(),
    };
    let publish_all = async |from: usize| {
        let log = support::projection::read_log(store.as_ref(), &["counter-c".into()]).await;
        let messages: Vec<BusMessage> = log[from..].iter().map(BusMessage::from_event).collect();
        for result in bus.publish(&messages).await {
            result.unwrap();
        }
        log
    };
    for n in 1..=3 {
        handler
            .execute::<Counter>(command("c", increment(n)))
            .await
            .unwrap();
    }
    let log = publish_all(0).await;
    support::projection::wait_for_fold(
        projectors.documents.as_ref(),
        &support::projection::fold_log(&log),
        PATIENCE,
    )
    .await;

    // Roll the document back to what it was after version 1, through the
    // store's own API, then append one more event.
    let old = serde_json::to_vec(&support::projection::fold_log(&log[..1])["counter::c"]).unwrap();
    let now = projectors
        .documents
        .get("counter::c")
        .await
        .unwrap()
        .unwrap();
    projectors
        .documents
        .replace("counter::c", &old, now.cas)
        .await
        .unwrap();
    handler
        .execute::<Counter>(command("c", increment(10)))
        .await
        .unwrap();
    let log = publish_all(3).await;
    let expected = support::projection::fold_log(&log);
    assert_eq!(expected["counter::c"]["count"], 16);
    support::projection::wait_for_fold(projectors.documents.as_ref(), &expected, PATIENCE).await;
}

/// The document store stops answering under load: workers pause (no
/// delivery attempt spent, nothing parked, the pause visible in metrics)
/// and finish once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_store_outage_is_waited_out_not_parked() {
    let (store, _dir) = support::redb_store();
    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));
    let streams = workload(&handler).await;
    let log = support::projection::read_log(store.as_ref(), &streams).await;
    let expected = support::projection::fold_log(&log);

    let dir = tempfile::tempdir().unwrap();
    let redb: Arc<dyn DocumentStore> =
        Arc::new(RedbDocuments::open(dir.path().join("views.redb")).unwrap());
    let outage = Arc::new(support::documents::Outage::new(redb));
    outage.begin();
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    let documents: Arc<dyn DocumentStore> = outage.clone();
    let projectors = Projectors::start_on(&bus, &store, documents, 2, dir).await;
    let messages: Vec<BusMessage> = log.iter().map(BusMessage::from_event).collect();
    for result in bus.publish(&messages).await {
        result.unwrap();
    }
    let started = std::time::Instant::now();
    while !projectors.metrics.is_paused() {
        assert!(started.elapsed() < PATIENCE, "the workers never paused");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Well past what max_attempts hand-backs would take to park everything.
    let refused_before = outage.refused();
    while outage.refused() < refused_before + 20 {
        assert!(started.elapsed() < PATIENCE, "the workers stopped trying");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    outage.end();
    support::projection::wait_for_fold(projectors.documents.as_ref(), &expected, PATIENCE).await;
    let metrics = &projectors.metrics;
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        metrics.retries.load(relaxed),
        0,
        "no delivery attempt spent"
    );
    assert_eq!(metrics.parked.load(relaxed), 0, "nothing parked");
    assert!(
        bus.dead_letters("projector", 0, 10)
            .await
            .unwrap()
            .dead_letters
            .is_empty()
    );
    assert!(!metrics.is_paused());
}

/// Forged increments whose total would overflow: the one that would is
/// parked with the reason, the document skips it, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_would_overflow_a_total_is_parked_and_skipped() {
    use scaleout::domain::DomainEvent;
    let (store, _dir) = support::redb_store();
    for amount in [1u64 << 63, 1 << 63, 5] {
        let event =
            reference::domain::CounterEvent::Incremented(reference::pb::CounterIncremented {
                counter_id: "big".into(),
                amount,
            });
        let append = scaleout::store::AppendRequest {
            stream_id: "counter-big".into(),
            stream_type: "counter".into(),
            expected: scaleout::store::ExpectedVersion::Any,
            events: vec![scaleout::store::NewEvent {
                event_id: uuid::Uuid::now_v7(),
                event_type: event.event_type(),
                payload: event.encode(),
            }]
            .try_into()
            .unwrap(),
            request_key: None,
            metadata: scaleout::store::EventMetadata {
                occurred_at: std::time::SystemTime::now(),
                correlation_id: uuid::Uuid::now_v7(),
                causation_id: uuid::Uuid::now_v7(),
                actor: None,
                trace: None,
            },
        };
        store.append(append).await.unwrap();
    }
    let log = support::projection::read_log(store.as_ref(), &["counter-big".into()]).await;
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    let projectors = Projectors::start(&bus, &store, 1).await;
    let messages: Vec<BusMessage> = log.iter().map(BusMessage::from_event).collect();
    for result in bus.publish(&messages).await {
        result.unwrap();
    }
    let started = std::time::Instant::now();
    let parked = loop {
        let parked = bus
            .dead_letters("projector", 0, 10)
            .await
            .unwrap()
            .dead_letters;
        if !parked.is_empty() {
            break parked;
        }
        assert!(started.elapsed() < PATIENCE, "nothing was parked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].message.message_id, log[1].event_id.to_string());
    assert!(
        parked[0].reason.contains("overflows"),
        "{}",
        parked[0].reason
    );
    let expected = support::projection::fold_log(&log);
    assert_eq!(expected["counter::big"]["count"], (1u64 << 63) + 5);
    support::projection::wait_for_fold(projectors.documents.as_ref(), &expected, PATIENCE).await;
}

/// A projection that panics on some events (a bug in application code):
/// those deliveries are parked after their attempts with the panic as the
/// reason, and the worker goes on projecting everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_that_panics_fails_its_documents_not_the_worker() {
    struct Fragile;
    impl scaleout::projection::Projection for Fragile {
        type Source = Counter;
        type View = serde_json::Value;
        const NAME: &'static str = "fragile";
        fn routes(
            &self,
            event: &scaleout::projection::SourceEvent<Self>,
        ) -> Vec<scaleout::projection::Route> {
            vec![scaleout::projection::Route::sequence(format!(
                "fragile::{}",
                event.stream_id
            ))]
        }
        fn apply(
            &self,
            _key: &str,
            view: &mut serde_json::Value,
            event: &scaleout::projection::SourceEvent<Self>,
        ) -> Result<(), scaleout::projection::Refused> {
            assert!(event.stream_id != "counter-bad", "a bug in this projection");
            *view = serde_json::json!({ "version": event.version });
            Ok(())
        }
    }
    let (store, _dir) = support::redb_store();
    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));
    for id in ["bad", "good"] {
        let increment = CounterCommand::Increment {
            amount: Amount::parse(1).unwrap(),
        };
        handler
            .execute::<Counter>(command(id, increment))
            .await
            .unwrap();
    }
    let log = support::projection::read_log(
        store.as_ref(),
        &["counter-bad".into(), "counter-good".into()],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let documents: Arc<dyn DocumentStore> =
        Arc::new(RedbDocuments::open(dir.path().join("views.redb")).unwrap());
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    let projector = Projector::new(
        Arc::clone(&documents),
        Arc::new(StoreLog(Arc::clone(&store))),
        scaleout::app::Application::known_types(&reference::Reference),
        vec![Box::new(Fragile)],
        Arc::new(ProjectorMetrics::default()),
        ProjectorConfig::default(),
    );
    let subscriber = bus.subscribe(&subscription()).await.unwrap();
    let stopping = CancellationToken::new();
    let worker = tokio::spawn({
        let stopping = stopping.clone();
        async move { projector.run(subscriber, stopping).await }
    });
    let messages: Vec<BusMessage> = log.iter().map(BusMessage::from_event).collect();
    for result in bus.publish(&messages).await {
        result.unwrap();
    }
    let started = std::time::Instant::now();
    let parked = loop {
        let parked = bus
            .dead_letters("projector", 0, 10)
            .await
            .unwrap()
            .dead_letters;
        if !parked.is_empty() {
            break parked;
        }
        assert!(started.elapsed() < PATIENCE, "nothing was parked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        parked[0].reason.contains("panicked"),
        "{}",
        parked[0].reason
    );
    assert!(
        documents
            .get("fragile::counter-good")
            .await
            .unwrap()
            .is_some()
    );
    assert!(!worker.is_finished(), "the worker is still running");
    stopping.cancel();
    worker.await.unwrap();
}
