//! The scale-out experiment: three projector processes compete on one queue
//! of real RabbitMQ and write one hot Couchbase document (the real SDK,
//! against the KV test server). 10 and then 5,000 increments must come out
//! exact; the same harness with three deliberately naive GET/SET writers
//! (in the test, see `support::naive`) must miscount (updates lost, or
//! counted twice), which shows that the harness can fail.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reference::domain::values::{Amount, Id};
use reference::domain::{Counter, CounterCommand};
use scaleout::bus::rabbitmq::RabbitBus;
use scaleout::bus::{EventBus, Subscription};
use scaleout::command::{Command, CommandHandler, RetryPolicy};
use scaleout::documents::DocumentStore;
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

/// Runs the rounds; returns (increments made, count in the hot document) after each.
async fn experiment(rounds: &[u64], naive: bool) -> Vec<(u64, u64)> {
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

    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));
    let mut total = 0;
    let mut results = Vec::new();
    for &increments in rounds {
        let mut writers = tokio::task::JoinSet::new();
        for writer in 0..8 {
            let handler = Arc::clone(&handler);
            writers.spawn(async move {
                for _ in (writer..increments).step_by(8) {
                    let command = Command {
                        aggregate_id: Id::parse("hot").unwrap(),
                        command: CounterCommand::Increment {
                            amount: Amount::parse(1).unwrap(),
                        },
                        expected: None,
                        request_key: None,
                        correlation_id: None,
                    };
                    handler.execute::<Counter>(command).await.unwrap();
                }
            });
        }
        while writers.join_next().await.is_some() {}
        total += increments;

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
        results.push((total, view["count"].as_u64().unwrap()));
    }
    stopping.cancel();
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_projector_processes_count_exactly_into_one_hot_document() {
    let results = experiment(&[10, 5_000], false).await;
    println!("CAS projectors: {results:?}");
    for (made, counted) in results {
        assert_eq!(counted, made, "the hot counter must equal the increments");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_harness_catches_a_naive_get_set_writer_miscounting() {
    let results = experiment(&[10, 5_000], true).await;
    println!("naive GET/SET projectors: {results:?}");
    let (made, counted) = results[results.len() - 1];
    // Without version checks an update is lost when two writers race, and
    // counted twice when a delivery or the log sweep brings it again.
    assert_ne!(
        counted, made,
        "3 naive writers on one document should miscount: {counted} of {made}"
    );
}
