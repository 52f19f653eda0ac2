//! Reading the whole log: `read_all` pages and a gRPC subscription from 0,
//! beside a raw sequential scan of the same store in the same run.
//!
//! 100,000 events over 1,000 streams, on redb and on PostgreSQL. The raw
//! scan is the least any reader must do: walk the rows in position order and
//! decode each envelope (redb: the `log` table straight from redb;
//! PostgreSQL: one streamed `SELECT … ORDER BY position`).
//!
//! `cargo bench --bench log` (needs PostgreSQL; `scripts/test.sh` starts it).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::report::{Report, Sample};
use futures_util::StreamExt;
use prost::Message;
use reference::pb::read_service_client::ReadServiceClient;
use reference::pb::{self, subscribe_response::Kind};
use scaleout::domain::KnownTypes;
use scaleout::grpc::{ReadApi, ReadConfig};
use scaleout::store::postgres::{PostgresConfig, PostgresStore};
use scaleout::store::{AppendRequest, EventStore, ExpectedVersion, LogFilter, NewEvent};
use uuid::Uuid;

const STREAMS: usize = 1_000;
const PER_STREAM: usize = 100;
const EVENTS: usize = STREAMS * PER_STREAM;

/// Every stream's events, appended 100 at a time by 16 writers at once.
async fn fill(store: &Arc<dyn EventStore>) {
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..16 {
        let store = Arc::clone(store);
        writers.spawn(async move {
            for stream in (writer..STREAMS).step_by(16) {
                let events: Vec<NewEvent> = (0..PER_STREAM)
                    .map(|n| NewEvent {
                        event_id: Uuid::now_v7(),
                        event_type: "scaleout.v1.CounterIncremented".into(),
                        payload: format!("counter {stream} #{n}").into_bytes(),
                    })
                    .collect();
                let append = AppendRequest {
                    stream_id: format!("counter-{stream}"),
                    stream_type: "counter".into(),
                    expected: ExpectedVersion::NoStream,
                    events: events.try_into().unwrap(),
                    request_key: None,
                    metadata: common::metadata(),
                };
                store.append(append).await.unwrap();
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
}

/// `read_all` in pages of 1,000 from position 0 to the head.
async fn read_all(store: &dyn EventStore) -> Sample {
    let started = Instant::now();
    let (mut from, mut read) = (0, 0);
    loop {
        let page = store
            .read_all(from, 1_000, &LogFilter::all())
            .await
            .unwrap();
        read += page.events.len();
        from = page.next_position;
        if from > page.head {
            break;
        }
    }
    assert_eq!(read, EVENTS);
    Sample::throughput(read, started.elapsed())
}

/// A gRPC subscription from 0 until it has caught up.
async fn subscribe(store: Arc<dyn EventStore>) -> Sample {
    let api = ReadApi::new(store, KnownTypes::default(), ReadConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(api.into_service(1 << 20))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = ReadServiceClient::connect(url).await.unwrap();
    let started = Instant::now();
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            from_position: 0,
            filter: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut read = 0;
    while let Some(message) = stream.next().await {
        match message.unwrap().kind.unwrap() {
            Kind::Event(_) => read += 1,
            Kind::Checkpoint(checkpoint) if checkpoint.caught_up => break,
            Kind::Checkpoint(_) => {}
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(read, EVENTS);
    server.abort();
    Sample::throughput(read, elapsed)
}

async fn open_redb(path: &std::path::Path) -> Arc<dyn EventStore> {
    common::open_redb(path.to_owned()).await
}

async fn redb(report: &mut Report) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.redb");
    fill(&open_redb(&path).await).await;
    let raw = async || {
        // A blocking scan that waits for the file: on a blocking thread.
        let scanned = path.clone();
        tokio::task::spawn_blocking(move || redb_raw_scan(&scanned))
            .await
            .unwrap()
    };
    let baseline = "raw scan of redb's log table";
    report
        .compare(
            "redb: read_all, pages of 1,000",
            baseline,
            raw,
            async || read_all(open_redb(&path).await.as_ref()).await,
        )
        .await;
    report
        .compare("redb: gRPC Subscribe from 0", baseline, raw, async || {
            subscribe(open_redb(&path).await).await
        })
        .await;
}

/// redb's own iterator over the log table, each envelope decoded.
fn redb_raw_scan(path: &std::path::Path) -> Sample {
    use redb::{ReadableDatabase, ReadableTable};
    const LOG: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");
    // The last round's store closes once its server's tasks have wound down.
    let db = loop {
        match redb::Database::open(path) {
            Ok(db) => break db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => panic!("opening {}: {error}", path.display()),
        }
    };
    let started = Instant::now();
    let txn = db.begin_read().unwrap();
    let log = txn.open_table(LOG).unwrap();
    let mut read = 0;
    for entry in log.iter().unwrap() {
        let (_, bytes) = entry.unwrap();
        std::hint::black_box(pb::EventEnvelope::decode(bytes.value()).unwrap());
        read += 1;
    }
    assert_eq!(read, EVENTS);
    Sample::throughput(read, started.elapsed())
}

async fn postgres(report: &mut Report) {
    let schema = format!("bench_log_{}", Uuid::now_v7().simple());
    let config = PostgresConfig::new(&common::postgres_url()).with_schema(schema.clone());
    let store: Arc<dyn EventStore> = Arc::new(PostgresStore::connect(config).await.unwrap());
    fill(&store).await;

    let raw = async || postgres_raw_scan(&schema).await;
    let baseline = "one streamed SELECT … ORDER BY position";
    report
        .compare(
            "PostgreSQL: read_all, pages of 1,000",
            baseline,
            raw,
            async || read_all(store.as_ref()).await,
        )
        .await;
    report
        .compare(
            "PostgreSQL: gRPC Subscribe from 0",
            baseline,
            raw,
            async || subscribe(Arc::clone(&store)).await,
        )
        .await;
    drop(store);
    common::drop_schema(&schema).await;
}

/// One streamed query in position order, each row's columns read.
async fn postgres_raw_scan(schema: &str) -> Sample {
    let (client, connection) =
        tokio_postgres::connect(&common::postgres_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let started = Instant::now();
    let rows = client
        .query_raw(
            &format!(
                "SELECT position, stream_id, version, stream_type, event_id, event_type, \
                 payload, occurred_at, correlation_id, causation_id, request_id \
                 FROM {schema}.events ORDER BY position"
            ),
            std::iter::empty::<i64>(),
        )
        .await
        .unwrap();
    futures_util::pin_mut!(rows);
    let mut read = 0;
    while let Some(row) = rows.next().await {
        let row = row.unwrap();
        std::hint::black_box((
            row.get::<_, i64>(0),
            row.get::<_, &str>(1),
            row.get::<_, i64>(2),
            row.get::<_, &[u8]>(6),
            row.get::<_, Uuid>(4),
            row.get::<_, SystemTime>(7),
        ));
        read += 1;
    }
    assert_eq!(read, EVENTS);
    Sample::throughput(read, started.elapsed())
}

#[tokio::main]
async fn main() {
    let mut report = Report::start(
        "log",
        &format!(
            "reading {EVENTS} events over {STREAMS} streams from position 0, beside a raw scan"
        ),
    );
    redb(&mut report).await;
    postgres(&mut report).await;
    report.finish();
}
