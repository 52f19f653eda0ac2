//! Append and command throughput and latency, beside raw baselines run in the
//! same process on the same disk and server.
//!
//! `cargo bench --bench append` (needs PostgreSQL; `scripts/test.sh` starts
//! it). Every append measured here is durable when it returns: redb commits
//! with `Durability::Immediate` (fsync), PostgreSQL with
//! `synchronous_commit = on`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::report::{self, Report, Sample};
use reference::pb::{self, command_service_client::CommandServiceClient};
use scaleout::config::ServerArgs;
use scaleout::store::postgres::{PostgresConfig, PostgresStore};
use scaleout::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent, NewEvents};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use uuid::Uuid;

/// Whether the trace exporter sees spans: off, this process runs as a
/// binary without `--otlp-endpoint` does (logs at `info` only).
static TRACING: AtomicBool = AtomicBool::new(false);

/// An OTLP collector in this process that counts the spans it is sent.
#[derive(Debug, Clone, Default)]
struct Collector(Arc<AtomicU64>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(Default::default()))
    }
}

/// Logs as the binaries write them (`info`, here into a sink) and a trace
/// exporter to a collector in this process, which sees spans only while
/// [`TRACING`] is set; returns the collector's span count.
async fn install_telemetry() -> (Arc<AtomicU64>, opentelemetry_sdk::trace::SdkTracerProvider) {
    use tracing_subscriber::filter::FilterExt as _;
    use tracing_subscriber::prelude::*;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let collector = Collector::default();
    let spans = Arc::clone(&collector.0);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(
                    collector,
                ),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let provider = scaleout::telemetry::exporter(&endpoint, 1.0, "bench").unwrap();
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::sink)
        .with_filter(tracing_subscriber::EnvFilter::new("info"));
    let traces =
        scaleout::telemetry::spans(&provider).with_filter(scaleout::telemetry::traced().and(
            tracing_subscriber::filter::filter_fn(|_| TRACING.load(Ordering::Relaxed)),
        ));
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .init();
    (spans, provider)
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
        metadata: common::metadata(),
    }
}

/// Where a scenario's writers append: a stream each, or one they share.
#[derive(Clone, Copy)]
enum Streams {
    Own,
    Shared,
}

impl Streams {
    fn name(self, writers: usize) -> &'static str {
        match (self, writers) {
            (_, 1) => "1 writer",
            (Streams::Own, _) => "16 writers, a stream each",
            (Streams::Shared, _) => "16 writers, one shared stream",
        }
    }
}

/// The scenarios of the store and gRPC rows: (writers, streams).
const SHAPES: [(usize, Streams); 3] =
    [(1, Streams::Own), (16, Streams::Own), (16, Streams::Shared)];

/// `writers` appending one event at a time for a run, on fresh streams.
async fn store_appends(store: &Arc<dyn EventStore>, writers: usize, streams: Streams) -> Sample {
    let run = Uuid::now_v7().simple().to_string();
    let store = Arc::clone(store);
    report::closed_loop(writers, move |writer| {
        let stream = match streams {
            Streams::Own => format!("{run}-{writer}"),
            Streams::Shared => format!("{run}-shared"),
        };
        let store = Arc::clone(&store);
        async move {
            store.append(one_event(stream)).await.expect("append");
        }
    })
    .await
}

/// Baseline: redb with one durable transaction per append, no group commit
/// (redb takes one writer at a time, so one writer is its best).
struct RawRedb(Arc<redb::Database>);

impl RawRedb {
    const TABLE: redb::TableDefinition<'static, (&'static str, u64), &'static [u8]> =
        redb::TableDefinition::new("raw");

    /// Creates the database off the runtime's threads, as every redb call here runs.
    async fn create(path: std::path::PathBuf) -> Self {
        let db = tokio::task::spawn_blocking(move || redb::Database::create(path).unwrap())
            .await
            .unwrap();
        Self(Arc::new(db))
    }

    async fn run(&self) -> Sample {
        let db = Arc::clone(&self.0);
        let run = report::run_for();
        tokio::task::spawn_blocking(move || {
            let stream = Uuid::now_v7().simple().to_string();
            let start = Instant::now();
            let mut latencies = Vec::new();
            let mut version = 0u64;
            while start.elapsed() < run {
                let began = Instant::now();
                let txn = db.begin_write().unwrap();
                txn.open_table(Self::TABLE)
                    .unwrap()
                    .insert((stream.as_str(), version), [8u8; 24].as_slice())
                    .unwrap();
                txn.commit().unwrap();
                version += 1;
                latencies.push(began.elapsed());
            }
            Sample::latencies(latencies, start.elapsed())
        })
        .await
        .unwrap()
    }
}

/// Baseline: what a PostgreSQL store without group commit does, one
/// transaction per append from each connection: read the stream's version,
/// insert the event and its outbox row, commit.
struct RawPostgres {
    clients: Arc<Vec<tokio_postgres::Client>>,
    schema: String,
}

impl RawPostgres {
    async fn connect(url: &str, schema: &str) -> Self {
        let mut clients = Vec::new();
        for _ in 0..16 {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            clients.push(client);
        }
        clients[0]
            .batch_execute(&format!(
                "CREATE TABLE {schema}.raw_events (position bigserial PRIMARY KEY, stream text NOT NULL, \
                 version bigint NOT NULL, payload bytea NOT NULL, UNIQUE (stream, version)); \
                 CREATE TABLE {schema}.raw_outbox (position bigint PRIMARY KEY)"
            ))
            .await
            .unwrap();
        Self {
            clients: Arc::new(clients),
            schema: schema.to_owned(),
        }
    }

    async fn run(&self, writers: usize) -> Sample {
        let (clients, schema) = (Arc::clone(&self.clients), self.schema.clone());
        let run = Uuid::now_v7().simple().to_string();
        report::closed_loop(writers, move |writer| {
            let (clients, schema, stream) =
                (Arc::clone(&clients), schema.clone(), format!("{run}-{writer}"));
            async move {
                let client = &clients[writer];
                client.batch_execute("BEGIN").await.unwrap();
                let version: i64 = client
                    .query_one(
                        &format!(
                            "SELECT coalesce(max(version), 0) FROM {schema}.raw_events WHERE stream = $1"
                        ),
                        &[&stream],
                    )
                    .await
                    .unwrap()
                    .get(0);
                let position: i64 = client
                    .query_one(
                        &format!(
                            "INSERT INTO {schema}.raw_events (stream, version, payload) \
                             VALUES ($1, $2, $3) RETURNING position"
                        ),
                        &[&stream, &(version + 1), &vec![8u8; 24]],
                    )
                    .await
                    .unwrap()
                    .get(0);
                client
                    .execute(
                        &format!("INSERT INTO {schema}.raw_outbox (position) VALUES ($1)"),
                        &[&position],
                    )
                    .await
                    .unwrap();
                client.batch_execute("COMMIT").await.unwrap();
            }
        })
        .await
    }
}

/// A command service on `store`, with a client channel to it.
struct CommandServer {
    channel: Channel,
    /// The `authorization` value each command carries, if any.
    token: Option<MetadataValue<Ascii>>,
    stopping: CancellationToken,
    served: tokio::task::JoinHandle<Result<(), scaleout::app::ServeError>>,
}

impl CommandServer {
    async fn start(store: Arc<dyn EventStore>) -> Self {
        Self::start_with(store, ServerArgs::default(), None, None).await
    }

    /// Over TLS (certificates from rcgen in `dir`), every command with a
    /// bearer token verified against an ES256 JWKS.
    async fn secured(store: Arc<dyn EventStore>, dir: &std::path::Path) -> Self {
        use base64::Engine;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(dir.join("tls.crt"), certified.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), certified.signing_key.serialize_pem()).unwrap();
        let signer = rcgen::KeyPair::generate().unwrap();
        let point = signer.public_key_raw();
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "bench",
            "x": b64(&point[1..33]), "y": b64(&point[33..]),
        }]});
        std::fs::write(dir.join("jwks.json"), jwks.to_string()).unwrap();
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3_600;
        let claims = serde_json::json!({
            "sub": "bench", "aud": "scaleout", "exp": exp, "scope": "scaleout.commands",
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("bench".into());
        let key =
            jsonwebtoken::EncodingKey::from_ec_pem(signer.serialize_pem().as_bytes()).unwrap();
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        let mut args = ServerArgs::default();
        args.tls.tls_cert = Some(dir.join("tls.crt"));
        args.tls.tls_key = Some(dir.join("tls.key"));
        args.auth.auth_jwks = Some(dir.join("jwks.json"));
        args.auth.auth_audience = Some("scaleout".into());
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                certified.cert.pem(),
            ))
            .domain_name("localhost");
        let token = format!("Bearer {token}").parse().unwrap();
        Self::start_with(store, args, Some(tls), Some(token)).await
    }

    async fn start_with(
        store: Arc<dyn EventStore>,
        args: ServerArgs,
        tls: Option<tonic::transport::ClientTlsConfig>,
        token: Option<MetadataValue<Ascii>>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = match tls {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        };
        let stopping = CancellationToken::new();
        let served = tokio::spawn(scaleout::app::run_command_service(
            listener,
            common::command_service(store, args),
            stopping.clone(),
        ));
        let mut endpoint = Channel::from_shared(url).unwrap();
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).unwrap();
        }
        let channel = endpoint.connect().await.unwrap();
        Self {
            channel,
            token,
            stopping,
            served,
        }
    }

    async fn stop(self) {
        self.stopping.cancel();
        self.served.await.unwrap().unwrap();
    }

    /// `clients` incrementing counters in a closed loop for a run.
    async fn increments(&self, clients: usize, streams: Streams) -> Sample {
        let (channel, run) = (self.channel.clone(), Uuid::now_v7().simple().to_string());
        let token = self.token.clone();
        report::closed_loop(clients, move |client| {
            let counter_id = match streams {
                Streams::Own => format!("{run}-{client}"),
                Streams::Shared => format!("{run}-shared"),
            };
            increment(
                CommandServiceClient::new(channel.clone()),
                counter_id,
                token.clone(),
            )
        })
        .await
    }

    /// `clients` calling the health check in a closed loop: what the gRPC
    /// client and server cost alone, through the same layers, without a store.
    async fn health_checks(&self, clients: usize) -> Sample {
        let channel = self.channel.clone();
        report::closed_loop(clients, move |_| {
            let mut client = HealthClient::new(channel.clone());
            async move {
                client
                    .check(HealthCheckRequest::default())
                    .await
                    .expect("health check");
            }
        })
        .await
    }

    /// `rate` commands a second over 100 counters for a run, each latency
    /// taken from the moment the command was due, so queueing counts.
    async fn open_loop(&self, rate: u32) -> Sample {
        let run = Uuid::now_v7().simple().to_string();
        let start = Instant::now();
        let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
        let mut tasks = JoinSet::new();
        let commands = rate as u128 * report::run_for().as_millis() / 1000;
        for i in 0..commands {
            let due = ticker.tick().await;
            let client = CommandServiceClient::new(self.channel.clone());
            let counter_id = format!("{run}-{}", i % 100);
            tasks.spawn(async move {
                increment(client, counter_id, None).await;
                due.elapsed()
            });
        }
        let mut latencies = Vec::new();
        while let Some(latency) = tasks.join_next().await {
            latencies.push(latency.unwrap());
        }
        Sample::latencies(latencies, start.elapsed())
    }
}

async fn increment(
    mut client: CommandServiceClient<Channel>,
    counter_id: String,
    token: Option<MetadataValue<Ascii>>,
) {
    let mut request = tonic::Request::new(pb::IncrementCounterRequest {
        counter_id,
        ..Default::default()
    });
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", token);
    }
    client.increment_counter(request).await.expect("increment");
}

#[tokio::main]
async fn main() {
    let (spans, provider) = install_telemetry().await;
    let mut report = Report::start(
        "append",
        "durable appends and commands, beside one transaction per append",
    );
    let dir = tempfile::tempdir().unwrap();
    let raw_redb = RawRedb::create(dir.path().join("raw.redb")).await;
    let path = dir.path().join("events.redb");
    let redb: Arc<dyn EventStore> = common::open_redb(path).await;
    for (writers, streams) in SHAPES {
        report
            .compare(
                &format!("redb store: {}", streams.name(writers)),
                "raw redb: 1 writer, a transaction per append",
                async || raw_redb.run().await,
                async || store_appends(&redb, writers, streams).await,
            )
            .await;
    }

    let url = common::postgres_url();
    let schema = format!("bench_{}", Uuid::now_v7().simple());
    let postgres: Arc<dyn EventStore> = Arc::new(
        PostgresStore::connect(PostgresConfig::new(&url).with_schema(schema.clone()))
            .await
            .expect("PostgreSQL (scripts/test.sh starts it)"),
    );
    let raw_postgres = RawPostgres::connect(&url, &schema).await;
    for (writers, streams) in SHAPES {
        let connections = if writers == 1 { 1 } else { 16 };
        report
            .compare(
                &format!("PostgreSQL store: {}", streams.name(writers)),
                &format!("a transaction per append, {connections} connection(s)"),
                async || raw_postgres.run(connections).await,
                async || store_appends(&postgres, writers, streams).await,
            )
            .await;
    }

    for (name, store) in [("redb", &redb), ("PostgreSQL", &postgres)] {
        let server = CommandServer::start(Arc::clone(store)).await;
        for streams in [Streams::Shared, Streams::Own] {
            let what = match streams {
                Streams::Own => "a counter each",
                Streams::Shared => "one counter",
            };
            report
                .compare(
                    &format!("{name} gRPC commands: 16 clients, {what}"),
                    &format!("{name} store: {}", streams.name(16)),
                    async || store_appends(store, 16, streams).await,
                    async || server.increments(16, streams).await,
                )
                .await;
        }
        // What one stream shared by all costs, beside streams of their own.
        report
            .compare(
                &format!("{name} gRPC commands: 16 clients on one counter, against a counter each"),
                &format!("{name} gRPC commands: 16 clients, a counter each"),
                async || server.increments(16, Streams::Own).await,
                async || server.increments(16, Streams::Shared).await,
            )
            .await;
        report
            .alone(
                &format!("{name} gRPC commands: open loop, 1,000/s over 100 counters"),
                async || server.open_loop(1000).await,
            )
            .await;
        server.stop().await;
    }

    let plain = CommandServer::start(Arc::clone(&redb)).await;
    // The most calls the gRPC client and server pass on this machine.
    report
        .alone(
            "gRPC health checks: 16 clients, through the command service's layers, no store",
            async || plain.health_checks(16).await,
        )
        .await;
    // What TLS and a token check on every call cost, beside plaintext.
    let secured = CommandServer::secured(Arc::clone(&redb), dir.path()).await;
    report
        .compare(
            "redb gRPC commands over TLS, each with an ES256 bearer token: 16 clients, a counter each",
            "the same, plaintext without a token",
            async || plain.increments(16, Streams::Own).await,
            async || secured.increments(16, Streams::Own).await,
        )
        .await;
    plain.stop().await;
    secured.stop().await;

    // What recording and exporting every span costs, beside the same
    // process exporting none.
    let server = CommandServer::start(Arc::clone(&redb)).await;
    report
        .compare(
            "redb gRPC commands, every span exported over OTLP to a collector on this machine: 16 clients, a counter each",
            "the same, no spans exported",
            async || {
                TRACING.store(false, Ordering::Relaxed);
                server.increments(16, Streams::Own).await
            },
            async || {
                TRACING.store(true, Ordering::Relaxed);
                server.increments(16, Streams::Own).await
            },
        )
        .await;
    TRACING.store(false, Ordering::Relaxed);
    server.stop().await;
    let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    eprintln!("spans exported: {}", spans.load(Ordering::Relaxed));
    report.finish();
    common::drop_schema(&schema).await;
}
