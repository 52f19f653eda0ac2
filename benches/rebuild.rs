//! Rebuilding a read model from the log: the counter read model built into a
//! new generation from position 1, 100,000 events over 1,000 streams and
//! over one hot stream, into redb and into Couchbase (through the KV test
//! server), beside a raw `read_all` of the same log in pages of the same
//! size, in the same run.
//!
//! `cargo bench --bench rebuild`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::report::{Report, Sample};
use reference::domain::CounterEvent;
use reference::pb;
use scaleout::app::Application;
use scaleout::documents::DocumentStore;
use scaleout::documents::couchbase::{CouchbaseConfig, CouchbaseDocuments};
use scaleout::documents::redb::RedbDocuments;
use scaleout::domain::DomainEvent;
use scaleout::log::{EventLog, StoreLog};
use scaleout::projection::rebuild::{self, Rebuilder};
use scaleout::store::{AppendRequest, EventStore, ExpectedVersion, LogFilter, NewEvent};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const EVENTS: usize = 100_000;
/// What a rebuild reads at a time (its page).
const PAGE: usize = 5000;

/// A log of EVENTS counter increments over `streams` streams.
async fn log(dir: &std::path::Path, streams: usize) -> Arc<dyn EventLog> {
    let path = dir.join(format!("events-{streams}.redb"));
    let store: Arc<dyn EventStore> = common::open_redb(path).await;
    let per_append = (EVENTS / streams).min(1000);
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..16 {
        let store = Arc::clone(&store);
        writers.spawn(async move {
            for append in (writer..EVENTS / per_append).step_by(16) {
                let counter_id = format!("c{}", append % streams);
                let event = CounterEvent::Incremented(pb::CounterIncremented {
                    counter_id: counter_id.clone(),
                    amount: 1,
                });
                let events: Vec<NewEvent> = (0..per_append)
                    .map(|_| NewEvent {
                        event_id: Uuid::now_v7(),
                        event_type: event.event_type(),
                        payload: event.encode(),
                    })
                    .collect();
                store
                    .append(AppendRequest {
                        stream_id: format!("counter-{counter_id}"),
                        stream_type: "counter".into(),
                        expected: ExpectedVersion::Any,
                        events: events.try_into().unwrap(),
                        request_key: None,
                        metadata: common::metadata(),
                    })
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    Arc::new(StoreLog(store))
}

/// Every event read in pages of PAGE, decoded into envelopes by the store.
async fn read_all(log: &dyn EventLog) -> Sample {
    let started = Instant::now();
    let (mut from, mut read) = (1, 0);
    loop {
        let page = log.read_all(from, PAGE, &LogFilter::all()).await.unwrap();
        read += page.events.len();
        from = page.next_position;
        if from > page.head {
            break;
        }
    }
    assert_eq!(read, EVENTS);
    Sample::throughput(read, started.elapsed())
}

/// The counter read model rebuilt into a new generation of `documents`,
/// timed until the build's checkpoint passes the head.
async fn rebuild(log: &Arc<dyn EventLog>, documents: Arc<dyn DocumentStore>) -> Sample {
    let generation = rebuild::start(documents.as_ref(), "counter", false)
        .await
        .unwrap();
    let rebuilder = Rebuilder::new(
        Arc::new(reference::Reference),
        Arc::clone(&documents),
        Arc::clone(log),
        Arc::default(),
    );
    let stopping = CancellationToken::new();
    let started = Instant::now();
    let running = tokio::spawn({
        let stopping = stopping.clone();
        async move { rebuilder.run("counter", &stopping).await }
    });
    let checkpoint = format!("_checkpoint::rebuild-counter-g{generation}");
    loop {
        let next = documents
            .get(&checkpoint)
            .await
            .unwrap()
            .and_then(|document| {
                serde_json::from_slice::<serde_json::Value>(&document.body)
                    .ok()?
                    .get("next_position")?
                    .as_u64()
            })
            .unwrap_or(1);
        if next > EVENTS as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sample = Sample::throughput(EVENTS, started.elapsed());
    stopping.cancel();
    running.await.unwrap().unwrap();
    sample
}

async fn redb_documents(dir: &std::path::Path) -> Arc<dyn DocumentStore> {
    let path = dir.join(format!("views-{}.redb", Uuid::now_v7().simple()));
    Arc::new(
        tokio::task::spawn_blocking(move || RedbDocuments::open(path).unwrap())
            .await
            .unwrap(),
    )
}

async fn couchbase_documents(server: &couchbase_kv_server::TestServer) -> Arc<dyn DocumentStore> {
    let config = CouchbaseConfig {
        connection_string: server.connection_string(),
        username: "Administrator".into(),
        password: "password".into(),
        bucket: "scaleout".into(),
        scope: "_default".into(),
        collection: "_default".into(),
        timeout: Duration::from_secs(5),
        ca: None,
    };
    Arc::new(CouchbaseDocuments::connect(config).await.unwrap())
}

#[tokio::main]
async fn main() {
    let mut report = Report::start(
        "rebuild",
        &format!(
            "the counter read model rebuilt from {EVENTS} events, beside a raw read_all of the same log"
        ),
    );
    // One known application, so its projection names resolve.
    assert!(
        reference::Reference
            .projections()
            .iter()
            .any(|p| p.name() == "counter")
    );
    let dir = tempfile::tempdir().unwrap();
    for streams in [1_000, 1] {
        let shape = if streams == 1 {
            "one hot stream".to_owned()
        } else {
            format!("{streams} streams")
        };
        let log = log(dir.path(), streams).await;
        let baseline = format!("read_all in pages of {PAGE}");
        report
            .compare(
                &format!("rebuild into redb, {shape}"),
                &baseline,
                async || read_all(log.as_ref()).await,
                async || rebuild(&log, redb_documents(dir.path()).await).await,
            )
            .await;
        report
            .compare(
                &format!("rebuild into Couchbase (KV test server), {shape}"),
                &baseline,
                async || read_all(log.as_ref()).await,
                async || {
                    let server = couchbase_kv_server::TestServer::start(Default::default())
                        .await
                        .unwrap();
                    rebuild(&log, couchbase_documents(&server).await).await
                },
            )
            .await;
    }
    report.finish();
}
