//! Projection throughput on the real RabbitMQ: one hot document and spread
//! documents, three projector instances competing on one queue, beside
//! plain consume-and-ack of the same messages on the same broker.
//!
//! `cargo bench --bench projector` (needs RabbitMQ; `scripts/test.sh` starts it).

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::report::{self, Report, Sample};
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
use scaleout::store::{AppendRequest, EventStore, ExpectedVersion, LogFilter, NewEvent};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PREFETCH: u16 = 100;
/// Projectors (and raw consumers) competing on the queue.
const INSTANCES: usize = 3;

fn subscription() -> Subscription {
    Subscription {
        service_type: "bench".into(),
        bindings: vec!["#".into()],
        prefetch: PREFETCH,
        max_attempts: 5,
    }
}

/// [`report::events`] increments, on one counter or spread over 100, appended to a
/// fresh redb log (where projectors fill gaps from) and returned as the
/// relay would publish them.
async fn increments(hot: bool, dir: &std::path::Path) -> (Arc<dyn EventStore>, Vec<BusMessage>) {
    let path = dir.join(format!("events-{}.redb", Uuid::now_v7().simple()));
    let store: Arc<dyn EventStore> = Arc::new(RedbStore::open(path).unwrap());
    let streams = if hot { 1 } else { 100 };
    let events = report::events() as u64;
    for round in 0..events / streams / 50 {
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
                metadata: common::metadata(),
            };
            store.append(append).await.unwrap();
        }
    }
    let (mut messages, mut from) = (Vec::new(), 0);
    loop {
        let page = store
            .read_all(from, 10_000, &LogFilter::all())
            .await
            .unwrap();
        messages.extend(page.events.iter().map(BusMessage::from_event));
        from = page.next_position;
        if from > page.head {
            break;
        }
    }
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

/// Plain consume-and-ack of the queue's `events` by INSTANCES consumers.
async fn raw_consume(config: &RabbitConfig, events: usize) -> Sample {
    let started = Instant::now();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut consumers = JoinSet::new();
    for _ in 0..INSTANCES {
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
    for _ in 0..events {
        done_rx.recv().await.unwrap();
    }
    let sample = Sample::throughput(events, started.elapsed());
    consumers.abort_all();
    sample
}

/// INSTANCES projectors, each with its own broker connection, until all
/// `events` are settled; what they had to do besides goes to stderr.
async fn project(
    config: &RabbitConfig,
    documents: Arc<dyn DocumentStore>,
    log: Arc<dyn EventStore>,
    events: usize,
) -> Sample {
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
    for _ in 0..INSTANCES {
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
    while settled(&metrics) < events as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let sample = Sample::throughput(events, started.elapsed());
    stopping.cancel();
    while workers.join_next().await.is_some() {}
    let per_k = |n: &std::sync::atomic::AtomicU64| {
        n.load(Ordering::Relaxed) as f64 * 1000.0 / events as f64
    };
    eprintln!(
        "    CAS conflicts {:.1}/1k, retries {:.1}/1k, gap fills {:.1}/1k",
        per_k(&metrics.cas_conflicts),
        per_k(&metrics.retries),
        per_k(&metrics.gap_fills),
    );
    sample
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
                ca: None,
            };
            Arc::new(
                scaleout::documents::couchbase::CouchbaseDocuments::connect(config)
                    .await
                    .unwrap(),
            )
        }
    }
}

/// A fresh topology with its queue declared and `messages` in it.
async fn queue_of(messages: &[BusMessage]) -> RabbitConfig {
    let config = RabbitConfig::new(&common::rabbitmq_url())
        .with_prefix(format!("bench-{}", Uuid::now_v7().simple()));
    fill(&config, messages).await;
    config
}

#[tokio::main]
async fn main() {
    let mut report = Report::start(
        "projector",
        &format!(
            "{INSTANCES} projector instances on one queue, prefetch {PREFETCH}, beside raw consume-and-ack"
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    for hot in [true, false] {
        let shape = if hot {
            "one hot document"
        } else {
            "100 documents"
        };
        let (log, messages) = increments(hot, dir.path()).await;
        for store in ["redb", "Couchbase (KV test server)"] {
            report
                .compare(
                    &format!("{store}, {shape}"),
                    &format!("raw consume-and-ack, {INSTANCES} consumers"),
                    async || {
                        let config = queue_of(&messages).await;
                        let sample = raw_consume(&config, messages.len()).await;
                        common::delete_topology(&config, "bench").await;
                        sample
                    },
                    async || {
                        // Fresh documents each time: every run starts from empty views.
                        let couchbase = couchbase_kv_server::TestServer::start(Default::default())
                            .await
                            .unwrap();
                        let config = queue_of(&messages).await;
                        let documents = documents(store, dir.path(), &couchbase).await;
                        let sample =
                            project(&config, documents, Arc::clone(&log), messages.len()).await;
                        common::delete_topology(&config, "bench").await;
                        sample
                    },
                )
                .await;
        }
    }
    report.finish();
}
