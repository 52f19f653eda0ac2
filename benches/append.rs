//! Append and command throughput and latency, beside raw baselines run in the
//! same process on the same disk and server.
//!
//! `cargo bench --bench append` (needs PostgreSQL; `scripts/test.sh` starts
//! it). Every append measured here is durable when it returns: redb commits
//! with `Durability::Immediate` (fsync), PostgreSQL with
//! `synchronous_commit = on`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reference::pb::{self, command_service_client::CommandServiceClient};
use scaleout::command::RetryPolicy;
use scaleout::config::ServerArgs;
use scaleout::store::postgres::{PostgresConfig, PostgresStore};
use scaleout::store::redb::RedbStore;
use scaleout::store::{
    AppendRequest, EventMetadata, EventStore, ExpectedVersion, NewEvent, NewEvents,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use uuid::Uuid;

const RUN: Duration = Duration::from_secs(3);
const WRITERS: [usize; 2] = [1, 16];

/// Latencies of one scenario, summarised.
struct Stats {
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Stats {
    fn from(mut latencies: Vec<Duration>, elapsed: Duration) -> Self {
        latencies.sort_unstable();
        Self {
            ops: latencies.len(),
            elapsed,
            latencies,
        }
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank =
            ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1]
    }

    fn print(&self, label: &str) {
        println!(
            "{label:<58} {:>9.0}/s   p50 {:>7.2} ms   p99 {:>7.2} ms   (n={})",
            self.ops as f64 / self.elapsed.as_secs_f64(),
            self.percentile(0.50).as_secs_f64() * 1e3,
            self.percentile(0.99).as_secs_f64() * 1e3,
            self.ops,
        );
    }
}

/// Runs `writers` closed-loop tasks for [`RUN`]; each calls `op(writer)`.
async fn closed_loop<F, Fut>(writers: usize, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for writer in 0..writers {
        let op = Arc::clone(&op);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            while start.elapsed() < RUN {
                let began = Instant::now();
                op(writer).await;
                latencies.push(began.elapsed());
            }
            latencies
        });
    }
    let mut all = Vec::new();
    while let Some(latencies) = tasks.join_next().await {
        all.extend(latencies.unwrap());
    }
    Stats::from(all, start.elapsed())
}

fn one_event(stream_id: String) -> AppendRequest {
    let event = NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "scaleout.v1.CounterIncremented".into(),
        payload: vec![8; 24],
    };
    AppendRequest {
        stream_id,
        stream_type: "bench".into(),
        expected: ExpectedVersion::Any,
        events: NewEvents::try_from(vec![event]).unwrap(),
        request_key: None,
        metadata: EventMetadata {
            occurred_at: SystemTime::now(),
            correlation_id: Uuid::now_v7(),
            causation_id: Uuid::now_v7(),
        },
    }
}

async fn store_appends(name: &str, store: Arc<dyn EventStore>) {
    let run = Uuid::now_v7().simple().to_string();
    for writers in WRITERS {
        for shared in [false, true] {
            let (store, run) = (Arc::clone(&store), run.clone());
            let stats = closed_loop(writers, move |writer| {
                let stream = if shared {
                    format!("{run}-shared-{writers}")
                } else {
                    format!("{run}-{writers}-{writer}")
                };
                let store = Arc::clone(&store);
                async move {
                    store.append(one_event(stream)).await.expect("append");
                }
            })
            .await;
            let streams = if shared {
                "one shared stream"
            } else {
                "a stream each"
            };
            stats.print(&format!("{name}: {writers:>2} writers, {streams}"));
        }
    }
}

/// Baseline: redb with one durable transaction per append, no group commit.
fn redb_baseline(path: &std::path::Path) -> Stats {
    const TABLE: redb::TableDefinition<(&str, u64), &[u8]> = redb::TableDefinition::new("raw");
    let db = redb::Database::create(path).unwrap();
    let start = Instant::now();
    let mut latencies = Vec::new();
    let mut version = 0u64;
    while start.elapsed() < RUN {
        let began = Instant::now();
        let txn = db.begin_write().unwrap();
        txn.open_table(TABLE)
            .unwrap()
            .insert(("raw", version), [8u8; 24].as_slice())
            .unwrap();
        txn.commit().unwrap();
        version += 1;
        latencies.push(began.elapsed());
    }
    Stats::from(latencies, start.elapsed())
}

/// Baseline: 16 PostgreSQL connections, one autocommit INSERT each at a time.
async fn postgres_baseline(url: &str, schema: &str, writers: usize) -> Stats {
    let mut clients = Vec::new();
    for _ in 0..writers {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        clients.push(Arc::new(client));
    }
    clients[0]
        .batch_execute(&format!(
            "CREATE TABLE {schema}.raw (id bigserial primary key, stream text, payload bytea)"
        ))
        .await
        .unwrap();
    let insert = format!("INSERT INTO {schema}.raw (stream, payload) VALUES ($1, $2)");
    let clients = Arc::new(clients);
    closed_loop(writers, move |writer| {
        let (clients, insert) = (Arc::clone(&clients), insert.clone());
        async move {
            let stream = format!("raw-{writer}");
            clients[writer]
                .execute(&insert, &[&stream, &vec![8u8; 24]])
                .await
                .unwrap();
        }
    })
    .await
}

async fn grpc_commands(name: &str, store: Arc<dyn EventStore>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stopping = CancellationToken::new();
    let service = scaleout::app::CommandService {
        app: std::sync::Arc::new(reference::Reference),
        store,
        bus: None,
        server: ServerArgs::default(),
        retry: RetryPolicy::default(),
        snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
        relay: Default::default(),
    };
    let served = tokio::spawn(scaleout::app::run_command_service(
        listener,
        service,
        stopping.clone(),
    ));
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let run = Uuid::now_v7().simple().to_string();
    let increment = move |client: CommandServiceClient<Channel>, counter: String| async move {
        let mut client = client;
        client
            .increment_counter(pb::IncrementCounterRequest {
                counter_id: counter,
                ..Default::default()
            })
            .await
            .expect("increment");
    };
    for writers in WRITERS {
        for shared in [false, true] {
            let (channel, run) = (channel.clone(), run.clone());
            let stats = closed_loop(writers, move |writer| {
                let counter = if shared {
                    format!("{run}-shared-{writers}")
                } else {
                    format!("{run}-{writers}-{writer}")
                };
                increment(CommandServiceClient::new(channel.clone()), counter)
            })
            .await;
            let counters = if shared {
                "one shared counter"
            } else {
                "a counter each"
            };
            stats.print(&format!("{name} gRPC: {writers:>2} clients, {counters}"));
        }
    }

    // Open loop: 1,000 commands/s spread over 100 counters, latency measured
    // from the moment each command was due, so queueing counts.
    let rate = 1000u32;
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut tasks = JoinSet::new();
    for i in 0..(rate as usize * RUN.as_secs() as usize) {
        let due = ticker.tick().await;
        let client = CommandServiceClient::new(channel.clone());
        let counter = format!("{run}-open-{}", i % 100);
        tasks.spawn(async move {
            increment(client, counter).await;
            due.elapsed()
        });
    }
    let mut latencies = Vec::new();
    while let Some(latency) = tasks.join_next().await {
        latencies.push(latency.unwrap());
    }
    Stats::from(latencies, start.elapsed()).print(&format!(
        "{name} gRPC: open loop at {rate} commands/s, 100 counters"
    ));

    stopping.cancel();
    served.await.unwrap().unwrap();
}

#[tokio::main]
async fn main() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "scaleout append benchmark: {cores} cores, {RUN:?} per scenario, every append durable\n"
    );

    let dir = tempfile::tempdir().unwrap();
    redb_baseline(&dir.path().join("raw.redb"))
        .print("baseline redb: one fsync'd transaction per append");
    let redb: Arc<dyn EventStore> =
        Arc::new(RedbStore::open(dir.path().join("events.redb")).unwrap());
    store_appends("redb", Arc::clone(&redb)).await;

    let url = common::postgres_url();
    let schema = format!("bench_{}", Uuid::now_v7().simple());
    let postgres: Arc<dyn EventStore> = Arc::new(
        PostgresStore::connect(PostgresConfig::new(&url).with_schema(schema.clone()))
            .await
            .expect("PostgreSQL (scripts/test.sh starts it)"),
    );
    for writers in WRITERS {
        postgres_baseline(&url, &schema, writers)
            .await
            .print(&format!(
                "baseline PostgreSQL: {writers:>2} connections, autocommit INSERT"
            ));
        let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        admin
            .batch_execute(&format!("DROP TABLE {schema}.raw"))
            .await
            .unwrap();
    }
    store_appends("PostgreSQL", Arc::clone(&postgres)).await;

    println!();
    grpc_commands("redb", redb).await;
    grpc_commands("PostgreSQL", postgres).await;

    common::drop_schema(&schema).await;
}
