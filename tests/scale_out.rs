//! The scale-out experiment: three projector processes compete on one queue
//! of real RabbitMQ and write one hot Couchbase document (the real SDK,
//! against the KV test server). 10 and then 5,000 increments must come out
//! exact; the same harness with three deliberately naive GET/SET writers
//! (in the test, see `support::naive`) must miscount (updates lost, or
//! counted twice), which shows that the harness can fail. The contention
//! report answers where the writers contend: it names the hot counter, its
//! stream (two command handlers race on it) and its document.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reference::domain::values::{Amount, Id};
use reference::domain::{Counter, CounterCommand};
use reference::pb::{GetContentionRequest, admin_service_client::AdminServiceClient};
use scaleout::bus::rabbitmq::RabbitBus;
use scaleout::bus::{EventBus, Subscription};
use scaleout::command::{Command, CommandHandler, RetryPolicy};
use scaleout::documents::DocumentStore;
use scaleout::domain::Aggregate;
use scaleout::relay::Relay;
use support::Process;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(180);

fn settled(metrics: &str) -> u64 {
    [
        "scaleout_projector_handled_total ",
        "scaleout_projector_duplicates_total ",
    ]
    .iter()
    .filter_map(|name| metrics.lines().find_map(|line| line.strip_prefix(name)))
    .filter_map(|n| n.trim().parse::<u64>().ok())
    .sum()
}

/// What an experiment saw: (increments made, count in the hot document)
/// after each round, and the contention reports at the end.
struct Outcome {
    rounds: Vec<(u64, u64)>,
    /// The streams of both command handlers, hottest first.
    hot_streams: Vec<Vec<(String, u64)>>,
    /// Each projector process's GetContention documents, hottest first.
    hot_documents: Vec<Vec<(String, u64)>>,
}

/// Runs the rounds: 8 writers split over two command handlers (two
/// command-svc instances on one store) increment the hot counter, and each
/// of 10 quiet counters once per round.
async fn experiment(rounds: &[u64], naive: bool) -> Outcome {
    let config = support::bus::rabbit_config();
    let _cleanup = support::Cleanup {
        schema: None,
        rabbit: Some(config.clone()),
    };
    let couchbase = couchbase_kv_server::TestServer::start(Default::default())
        .await
        .unwrap();
    let documents: Arc<dyn DocumentStore> =
        Arc::new(support::documents::couchbase_store(&couchbase).await);
    let (store, _dir) = support::redb_store();
    let bus: Arc<dyn EventBus> = Arc::new(RabbitBus::new(config.clone()));
    let subscription = Subscription {
        service_type: "projector".into(),
        bindings: vec!["#".into()],
        prefetch: 100,
        max_attempts: 5,
    };
    drop(bus.subscribe(&subscription).await.unwrap());
    let stopping = CancellationToken::new();
    tokio::spawn(
        Relay::new(Arc::clone(&store), Arc::clone(&bus), Default::default()).run(stopping.clone()),
    );

    // The log the projectors fill gaps from: command-svc's read API.
    let log = support::CommandService::start(Arc::clone(&store)).await;
    let args: Vec<String> = [
        "--event-log",
        &log.url(),
        "--listen",
        "127.0.0.1:0",
        "--event-bus",
        &support::bus::rabbitmq_url(),
        "--event-bus-prefix",
        config.prefix(),
        "--document-store",
        &couchbase.connection_string(),
        "--prefetch",
        "100",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let (projectors, naive_workers) = if naive {
        let workers =
            support::naive::NaiveWorkers::start(&bus, &subscription, Arc::clone(&documents), 3)
                .await;
        (Vec::new(), Some(workers))
    } else {
        let processes: Vec<Process> = (0..3).map(|_| Process::start("projector", &args)).collect();
        (processes, None)
    };

    let handlers: Vec<Arc<CommandHandler>> = (0..2)
        .map(|_| {
            Arc::new(CommandHandler::new(
                Arc::clone(&store),
                RetryPolicy {
                    max_retries: 1_000,
                    ..RetryPolicy::default()
                },
            ))
        })
        .collect();
    let increment = |handler: Arc<CommandHandler>, counter: String| async move {
        let command = Command {
            aggregate_id: Id::parse(&counter).unwrap(),
            command: CounterCommand::Increment {
                amount: Amount::parse(1).unwrap(),
            },
            expected: None,
            request_key: None,
            origin: Default::default(),
        };
        handler.execute::<Counter>(command).await.unwrap();
    };
    // Deliveries made, and increments of the hot counter.
    let (mut total, mut hot) = (0, 0);
    let mut results = Vec::new();
    for &increments in rounds {
        let mut writers = tokio::task::JoinSet::new();
        for writer in 0..8 {
            let handler = Arc::clone(&handlers[writer as usize % 2]);
            writers.spawn(async move {
                for _ in (writer..increments).step_by(8) {
                    increment(Arc::clone(&handler), "hot".into()).await;
                }
            });
        }
        for quiet in 0..10 {
            increment(Arc::clone(&handlers[0]), format!("quiet-{quiet}")).await;
        }
        while writers.join_next().await.is_some() {}
        total += increments + 10;
        hot += increments;

        // Every delivery settled across the three processes.
        let started = Instant::now();
        loop {
            let mut sum = naive_workers.as_ref().map_or(0, |naive| {
                naive.settled.load(std::sync::atomic::Ordering::SeqCst)
            });
            for projector in &projectors {
                sum += settled(&projector.http_get("/metrics").await);
            }
            if sum >= total {
                break;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "only {sum} of {total} deliveries settled"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let document = documents
            .get("counter::hot")
            .await
            .unwrap()
            .expect("the hot document");
        let view: serde_json::Value = serde_json::from_slice(&document.body).unwrap();
        results.push((hot, view["count"].as_u64().unwrap()));
    }
    let hot_streams = handlers
        .iter()
        .map(|handler| {
            let streams = handler.contention().hot_streams(3);
            streams.into_iter().map(|h| (h.key, h.lost)).collect()
        })
        .collect();
    let mut hot_documents = Vec::new();
    for projector in &projectors {
        let mut admin = AdminServiceClient::connect(format!("http://{}", projector.addr))
            .await
            .unwrap();
        let report = admin
            .get_contention(GetContentionRequest { limit: 3 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(report.window_seconds, 60);
        hot_documents.push(
            report
                .documents
                .into_iter()
                .map(|key| (key.key, key.lost_races))
                .collect(),
        );
    }
    stopping.cancel();
    Outcome {
        rounds: results,
        hot_streams,
        hot_documents,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_projector_processes_count_exactly_into_one_hot_document() {
    let outcome = experiment(&[10, 5_000], false).await;
    println!("CAS projectors: {:?}", outcome.rounds);
    for (made, counted) in outcome.rounds {
        assert_eq!(counted, made, "the hot counter must equal the increments");
    }
    // Where they contend: the hot counter's stream in both command handlers
    // (each lost races to the other), its document in the projectors.
    println!(
        "hot streams {:?}, hot documents {:?}",
        outcome.hot_streams, outcome.hot_documents
    );
    let hot_stream = Counter::stream_id("hot");
    for streams in &outcome.hot_streams {
        assert_eq!(
            streams.first().map(|(key, _)| key),
            Some(&hot_stream),
            "{streams:?}"
        );
    }
    let conflicted: Vec<_> = outcome
        .hot_documents
        .iter()
        .filter(|d| !d.is_empty())
        .collect();
    assert!(
        !conflicted.is_empty(),
        "three projectors never lost a CAS race"
    );
    for documents in conflicted {
        assert_eq!(documents[0].0, "counter::hot", "{documents:?}");
        assert!(
            documents[1..]
                .iter()
                .all(|(_, lost)| *lost < documents[0].1),
            "{documents:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_harness_catches_a_naive_get_set_writer_miscounting() {
    let results = experiment(&[10, 5_000], true).await.rounds;
    println!("naive GET/SET projectors: {results:?}");
    let (made, counted) = results[results.len() - 1];
    // Without version checks an update is lost when two writers race, and
    // counted twice when a delivery or the log sweep brings it again.
    assert_ne!(
        counted, made,
        "3 naive writers on one document should miscount: {counted} of {made}"
    );
}
