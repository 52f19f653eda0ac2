//! End-to-end lag: from a command's response to its effect being visible
//! through the query service (a GetCounter with `min_version`), open loop
//! at 100 and 1,000 commands/s, on the embedded platform and on the split
//! deployment (command-svc on PostgreSQL + RabbitMQ, two projectors and
//! query-svc on Couchbase through the KV test server; all in this process).
//!
//! Then, on the split deployment at 1,000 commands/s, the document store
//! frozen for 20 s: how long after it answers again until every view shows
//! every command acknowledged by then.
//!
//! `cargo bench --bench e2e` (needs PostgreSQL and RabbitMQ).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::report::{self, Report, Sample};
use reference::pb::{
    self, command_service_client::CommandServiceClient, query_service_client::QueryServiceClient,
};
use scaleout::bus::rabbitmq::{RabbitBus, RabbitConfig};
use scaleout::bus::{EventBus, Subscription};
use scaleout::documents::DocumentStore;
use scaleout::documents::couchbase::{CouchbaseConfig, CouchbaseDocuments};
use scaleout::grpc::RemoteLog;
use scaleout::store::EventStore;
use scaleout::store::postgres::{PostgresConfig, PostgresStore};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

async fn listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Open loop at `rate` for a run: each command, then a read of it with
/// min_version; the sample's latencies are accepted → visible.
async fn measure(commands: Channel, queries: Channel, rate: u32) -> Sample {
    let run = uuid::Uuid::now_v7().simple().to_string();
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < report::run_for() {
        ticker.tick().await;
        let (mut commands, mut queries) = (
            CommandServiceClient::new(commands.clone()),
            QueryServiceClient::new(queries.clone()),
        );
        let counter_id = format!("{run}-{}", sent % 100);
        sent += 1;
        tasks.spawn(async move {
            let command_started = Instant::now();
            let version = commands
                .increment_counter(pb::IncrementCounterRequest {
                    counter_id: counter_id.clone(),
                    ..Default::default()
                })
                .await
                .expect("command")
                .into_inner()
                .result
                .unwrap()
                .version;
            let accepted = Instant::now();
            let mut read = tonic::Request::new(pb::GetCounterRequest {
                counter_id,
                min_version: version,
            });
            read.set_timeout(Duration::from_secs(10));
            queries
                .get_counter(read)
                .await
                .expect("visible within 10 s");
            (accepted - command_started, accepted.elapsed())
        });
    }
    let (mut command_latency, mut lag) = (Vec::new(), Vec::new());
    while let Some(done) = tasks.join_next().await {
        let (command, visible) = done.unwrap();
        command_latency.push(command);
        lag.push(visible);
    }
    let elapsed = started.elapsed();
    command_latency.sort_unstable();
    eprintln!(
        "    command p50 {:.2?} p99 {:.2?}",
        command_latency[command_latency.len() / 2],
        command_latency[command_latency.len() * 99 / 100],
    );
    Sample::latencies(lag, elapsed)
}

async fn embedded(rate: u32) -> Sample {
    let dir = tempfile::tempdir().unwrap();
    let (listener, url) = listener().await;
    let stopping = CancellationToken::new();
    let platform = scaleout::app::Platform {
        app: std::sync::Arc::new(reference::Reference),
        data_dir: dir.path().to_owned(),
        server: Default::default(),
        retry: Default::default(),
        snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
        max_wait: Duration::from_secs(10),
    };
    let served = tokio::spawn(scaleout::app::run_platform(
        listener,
        platform,
        stopping.clone(),
    ));
    let channel = channel(&url).await;
    let sample = measure(channel.clone(), channel, rate).await;
    stopping.cancel();
    served.await.unwrap().unwrap();
    sample
}

/// Open loop at `rate` while the document store freezes for `freeze` (from
/// 1 s in, with 5 s of load after it): the time from the thaw until every
/// view shows every command acknowledged by the thaw is the sample's one
/// latency.
async fn measure_freeze(
    commands: Channel,
    queries: Channel,
    faults: couchbase_kv_server::Faults,
    rate: u32,
    freeze: Duration,
) -> Sample {
    use std::collections::HashMap;
    use std::sync::Mutex;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let sending = {
        let (acked, commands) = (Arc::clone(&acked), commands.clone());
        let lasts = freeze + Duration::from_secs(6);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
            let mut tasks = JoinSet::new();
            let started = Instant::now();
            let mut sent = 0u64;
            while started.elapsed() < lasts {
                ticker.tick().await;
                let mut commands = CommandServiceClient::new(commands.clone());
                let (acked, counter_id) = (Arc::clone(&acked), format!("{run}-{}", sent % 100));
                sent += 1;
                tasks.spawn(async move {
                    let request = pb::IncrementCounterRequest {
                        counter_id: counter_id.clone(),
                        ..Default::default()
                    };
                    let result = commands.increment_counter(request).await.expect("command");
                    let version = result.into_inner().result.unwrap().version;
                    let mut acked = acked.lock().unwrap();
                    let highest = acked.entry(counter_id).or_default();
                    *highest = (*highest).max(version);
                });
            }
            while tasks.join_next().await.is_some() {}
            sent
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    faults.set(couchbase_kv_server::Fault::Freeze);
    tokio::time::sleep(freeze).await;
    let during = acked.lock().unwrap().values().sum::<u64>();
    faults.clear();
    let thawed = Instant::now();
    let wanted = acked.lock().unwrap().clone();
    let mut queries = QueryServiceClient::new(queries);
    for (counter_id, version) in wanted {
        loop {
            let mut read = tonic::Request::new(pb::GetCounterRequest {
                counter_id: counter_id.clone(),
                min_version: version,
            });
            read.set_timeout(Duration::from_secs(10));
            if queries.get_counter(read).await.is_ok() {
                break;
            }
            assert!(
                thawed.elapsed() < Duration::from_secs(120),
                "never caught up"
            );
        }
    }
    let caught_up = thawed.elapsed();
    let sent = sending.await.unwrap();
    eprintln!("    {during} commands acknowledged by the thaw, {sent} in all");
    Sample::throughput(sent as usize, freeze + Duration::from_secs(6))
        .with_latencies(vec![caught_up])
}

async fn split(rate: u32, freeze: Option<Duration>) -> Sample {
    let run = uuid::Uuid::now_v7().simple().to_string();
    let (pg_url, amqp) = (common::postgres_url(), common::rabbitmq_url());
    let schema = format!("e2e_{run}");
    let rabbit = RabbitConfig::new(&amqp).with_prefix(format!("bench-e2e-{run}"));
    let couchbase = couchbase_kv_server::TestServer::start(Default::default())
        .await
        .unwrap();
    let documents = || async {
        let config = CouchbaseConfig {
            connection_string: couchbase.connection_string(),
            username: "Administrator".into(),
            password: "password".into(),
            bucket: "scaleout".into(),
            scope: "_default".into(),
            collection: "_default".into(),
            timeout: Duration::from_secs(5),
            ca: None,
        };
        Arc::new(CouchbaseDocuments::connect(config).await.unwrap()) as Arc<dyn DocumentStore>
    };
    let stopping = CancellationToken::new();
    let mut services = JoinSet::new();
    let (command_listener, command_url) = listener().await;
    for _ in 0..2 {
        let (listener, _) = listener().await;
        let projector = scaleout::app::ProjectorService {
            app: std::sync::Arc::new(reference::Reference),
            bus: Arc::new(RabbitBus::new(rabbit.clone())),
            documents: documents().await,
            log: Arc::new(
                RemoteLog::new(&command_url, Duration::from_secs(5), &Default::default()).unwrap(),
            ),
            sweep_delay: Duration::from_secs(5),
            subscription: Subscription {
                service_type: "projector".into(),
                bindings: vec!["#".into()],
                prefetch: 100,
                max_attempts: 5,
            },
            projections: Vec::new(),
            workers: 1,
            config: Default::default(),
            server: Default::default(),
        };
        services.spawn(async move {
            drop(scaleout::app::run_projector(listener, projector, CancellationToken::new()).await)
        });
    }
    // The projectors' queue exists before the first event is relayed.
    drop(
        RabbitBus::new(rabbit.clone())
            .subscribe(&Subscription {
                service_type: "projector".into(),
                bindings: vec!["#".into()],
                prefetch: 100,
                max_attempts: 5,
            })
            .await
            .unwrap(),
    );
    let store: Arc<dyn EventStore> = Arc::new(
        PostgresStore::connect(PostgresConfig::new(&pg_url).with_schema(schema.clone()))
            .await
            .unwrap(),
    );
    let command = scaleout::app::CommandService {
        app: std::sync::Arc::new(reference::Reference),
        store,
        bus: Some(Arc::new(RabbitBus::new(rabbit.clone())) as Arc<dyn EventBus>),
        server: Default::default(),
        retry: Default::default(),
        snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
        relay: Default::default(),
    };
    let command_stopping = stopping.clone();
    services.spawn(async move {
        drop(scaleout::app::run_command_service(command_listener, command, command_stopping).await)
    });
    let (query_listener, query_url) = listener().await;
    let query = scaleout::app::QueryService {
        app: std::sync::Arc::new(reference::Reference),
        documents: documents().await,
        max_wait: Duration::from_secs(10),
        server: Default::default(),
    };
    let query_stopping = stopping.clone();
    services.spawn(async move {
        drop(scaleout::app::run_query_service(query_listener, query, query_stopping).await)
    });

    let (commands, queries) = (channel(&command_url).await, channel(&query_url).await);
    let sample = match freeze {
        None => measure(commands, queries, rate).await,
        Some(freeze) => measure_freeze(commands, queries, couchbase.faults(), rate, freeze).await,
    };
    stopping.cancel();
    services.abort_all();

    common::drop_schema(&schema).await;
    common::delete_topology(&rabbit, "projector").await;
    sample
}

#[tokio::main]
async fn main() {
    let mut report = Report::start(
        "e2e",
        "open loop over 100 counters; latencies from a command's answer until a query shows it",
    );
    for rate in [100, 1000] {
        report
            .alone(
                &format!("embedded platform, {rate} commands/s"),
                async || embedded(rate).await,
            )
            .await;
        report
            .alone(
                &format!(
                    "split (PostgreSQL, RabbitMQ, 2 projectors, KV test server), {rate} commands/s"
                ),
                async || split(rate, None).await,
            )
            .await;
    }
    report
        .alone(
            "split, 1,000 commands/s, document store frozen 20 s: from the thaw until every view shows every acknowledged command",
            async || split(1000, Some(Duration::from_secs(20))).await,
        )
        .await;
    report.finish();
}
