//! Projection throughput on the real RabbitMQ: one hot document and spread
//! documents, 1 and 3 projector instances, beside plain consume-and-ack of
//! the same messages on the same broker in the same run.
//!
//! `cargo bench --bench projector` (needs RabbitMQ; `scripts/test.sh` starts it).

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use reference::domain::CounterEvent;
use reference::pb;
use scaleout::bus::rabbitmq::{RabbitBus, RabbitConfig};
use scaleout::bus::{BusMessage, EventBus, Subscription};
use scaleout::documents::DocumentStore;
use scaleout::documents::redb::RedbDocuments;
use scaleout::domain::DomainEvent;
use scaleout::log::StoreLog;
use scaleout::projection::metrics::ProjectorMetrics;
use scaleout::projection::runtime::{Projector, ProjectorConfig};
use scaleout::store::redb::RedbStore;
use scaleout::store::{
    AppendRequest, EventMetadata, EventStore, ExpectedVersion, LogFilter, NewEvent,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const EVENTS: u64 = 5_000;
const PREFETCH: u16 = 100;

fn subscription() -> Subscription {
    Subscription {
        service_type: "bench".into(),
        bindings: vec!["#".into()],
        prefetch: PREFETCH,
        max_attempts: 5,
    }
}

/// EVENTS increments, on one counter or spread over 100, appended to a
/// fresh redb log (where projectors fill gaps from) and returned as the
/// relay would publish them.
async fn increments(hot: bool, dir: &std::path::Path) -> (Arc<dyn EventStore>, Vec<BusMessage>) {
    let path = dir.join(format!("events-{}.redb", Uuid::now_v7().simple()));
    let store: Arc<dyn EventStore> = Arc::new(RedbStore::open(path).unwrap());
    let streams = if hot { 1 } else { 100 };
    for round in 0..EVENTS / streams / 50 {
        for s in 0..streams {
            let counter = if hot {
                "hot".to_owned()
            } else {
                format!("c{s}")
            };
            let event = CounterEvent::Incremented(pb::CounterIncremented {
                counter_id: counter.clone(),
                amount: 1,
            });
            let events: Vec<NewEvent> = (0..50)
                .map(|_| NewEvent {
                    event_id: Uuid::now_v7(),
                    event_type: event.event_type(),
                    payload: event.encode(),
                })
                .collect();
            let append = AppendRequest {
                stream_id: format!("counter-{counter}"),
                stream_type: "counter".into(),
                expected: if round == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Any
                },
                events: events.try_into().unwrap(),
                request_key: None,
                metadata: EventMetadata {
                    occurred_at: SystemTime::now(),
                    correlation_id: Uuid::now_v7(),
                    causation_id: Uuid::now_v7(),
                },
            };
            store.append(append).await.unwrap();
        }
    }
    let page = store
        .read_all(0, EVENTS as usize, &LogFilter::all())
        .await
        .unwrap();
    assert_eq!(page.events.len() as u64, EVENTS);
    let messages = page.events.iter().map(BusMessage::from_event).collect();
    (store, messages)
}

async fn fill(config: &RabbitConfig, messages: &[BusMessage]) {
    let bus = RabbitBus::new(config.clone());
    drop(bus.subscribe(&subscription()).await.unwrap());
    for chunk in messages.chunks(500) {
        for result in bus.publish(chunk).await {
            result.unwrap();
        }
    }
}

/// Plain consume-and-ack of the queue by `instances` consumers.
async fn raw_consume(config: &RabbitConfig, instances: usize) -> Duration {
    let started = Instant::now();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut consumers = JoinSet::new();
    for _ in 0..instances {
        let bus = RabbitBus::new(config.clone());
        let mut subscriber = bus.subscribe(&subscription()).await.unwrap();
        let done = done_tx.clone();
        consumers.spawn(async move {
            let _bus = bus;
            while let Some(delivery) = subscriber.next().await {
                delivery.ack().await.unwrap();
                let _ = done.send(());
            }
        });
    }
    for _ in 0..EVENTS {
        done_rx.recv().await.unwrap();
    }
    consumers.abort_all();
    started.elapsed()
}

/// `instances` projectors, each with its own broker connection, until every
/// message is settled.
async fn project(
    config: &RabbitConfig,
    documents: Arc<dyn DocumentStore>,
    log: Arc<dyn EventStore>,
    instances: usize,
) -> (Duration, Arc<ProjectorMetrics>) {
    let metrics = Arc::new(ProjectorMetrics::default());
    let projector = Projector::new(
        documents,
        Arc::new(StoreLog(log)),
        scaleout::app::Application::known_types(&reference::Reference),
        reference::views::all(),
        Arc::clone(&metrics),
        ProjectorConfig {
            batch: usize::from(PREFETCH),
            ..Default::default()
        },
    );
    let stopping = CancellationToken::new();
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..instances {
        let bus = RabbitBus::new(config.clone());
        let subscriber = bus.subscribe(&subscription()).await.unwrap();
        let (projector, stopping) = (projector.clone(), stopping.clone());
        workers.spawn(async move {
            let _bus = bus;
            projector.run(subscriber, stopping).await;
        });
    }
    let settled = |m: &ProjectorMetrics| {
        m.handled.load(Ordering::Relaxed) + m.duplicates.load(Ordering::Relaxed)
    };
    while settled(&metrics) < EVENTS {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    stopping.cancel();
    while workers.join_next().await.is_some() {}
    (elapsed, metrics)
}

fn per_second(elapsed: Duration) -> f64 {
    EVENTS as f64 / elapsed.as_secs_f64()
}

/// A fresh document store of the named kind.
async fn documents(
    kind: &str,
    dir: &std::path::Path,
    couchbase: &couchbase_kv_server::TestServer,
) -> Arc<dyn DocumentStore> {
    match kind {
        "redb" => Arc::new(
            RedbDocuments::open(dir.join(format!("{}.redb", Uuid::now_v7().simple()))).unwrap(),
        ),
        _ => {
            let config = scaleout::documents::couchbase::CouchbaseConfig {
                connection_string: couchbase.connection_string(),
                username: "Administrator".into(),
                password: "password".into(),
                bucket: "scaleout".into(),
                scope: "_default".into(),
                collection: "_default".into(),
                timeout: Duration::from_secs(5),
            };
            Arc::new(
                scaleout::documents::couchbase::CouchbaseDocuments::connect(config)
                    .await
                    .unwrap(),
            )
        }
    }
}

#[tokio::main]
async fn main() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "scaleout projector benchmark: {cores} cores, {EVENTS} counter increments per run, prefetch {PREFETCH}\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let run = Uuid::now_v7().simple().to_string();
    for store in ["redb", "Couchbase (KV test server)"] {
        for hot in [true, false] {
            let shape = if hot {
                "one hot document"
            } else {
                "100 documents"
            };
            for instances in [1, 3] {
                // A fresh server per run, so every run starts from empty documents.
                let couchbase = couchbase_kv_server::TestServer::start(Default::default())
                    .await
                    .unwrap();
                let label = format!("{store}, {shape}, {instances} instance(s)");
                let config = RabbitConfig::new(&common::rabbitmq_url())
                    .with_prefix(format!("bench-{run}-{hot}-{instances}-{}", store.len()));
                let (log, messages) = increments(hot, dir.path()).await;
                fill(&config, &messages).await;
                let raw = raw_consume(&config, instances).await;
                fill(&config, &messages).await;
                let (elapsed, metrics) = project(
                    &config,
                    documents(store, dir.path(), &couchbase).await,
                    log,
                    instances,
                )
                .await;
                let per_k = |n: &std::sync::atomic::AtomicU64| {
                    n.load(Ordering::Relaxed) as f64 * 1000.0 / EVENTS as f64
                };
                println!(
                    "{label:<58} projected {:>7.0}/s   raw consume-and-ack {:>7.0}/s ({:.0}%)   CAS conflicts {:.1}/1k, retries {:.1}/1k, gap fills {:.1}/1k",
                    per_second(elapsed),
                    per_second(raw),
                    100.0 * raw.as_secs_f64() / elapsed.as_secs_f64(),
                    per_k(&metrics.cas_conflicts),
                    per_k(&metrics.retries),
                    per_k(&metrics.gap_fills),
                );
                common::delete_topology(&config, "bench").await;
            }
        }
    }
}
