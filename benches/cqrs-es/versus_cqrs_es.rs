//! Commands on PostgreSQL through scaleout's gRPC service, beside cqrs-es +
//! postgres-es 0.5 on the same PostgreSQL: 16 clients, each incrementing a
//! counter of its own that holds ~800 events when the run starts.
//!
//! `scripts/bench.sh cqrs-es` (needs PostgreSQL). cqrs-es is called in this
//! process, with no network between the client and the framework; scaleout's
//! commands go through gRPC over loopback and also write outbox rows.

#[path = "../common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::str::FromStr;
use std::sync::Arc;

use common::report::{self, Report, Sample};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, CqrsFramework, DomainEvent};
use postgres_es::{PostgresCqrs, PostgresEventRepository};
use reference::domain::CounterEvent;
use reference::pb::{self, command_service_client::CommandServiceClient};
use scaleout::domain::DomainEvent as _;
use scaleout::store::postgres::{PostgresConfig, PostgresStore};
use scaleout::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent, NewEvents};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use uuid::Uuid;

const CLIENTS: usize = 16;
/// Events each counter holds before a run.
const HISTORY: usize = 800;
/// cqrs-es snapshots every this many events (scaleout: its default, 100).
const SNAPSHOT_EVERY: usize = 100;

/// The same counter as the reference application's, as a cqrs-es aggregate.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Counter {
    count: u64,
}

#[derive(Debug)]
struct Increment {
    times: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Incremented {
    amount: u64,
}

impl DomainEvent for Incremented {
    fn event_type(&self) -> String {
        "Incremented".into()
    }

    fn event_version(&self) -> String {
        "1".into()
    }
}

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Command = Increment;
    type Event = Incremented;
    type Error = Infallible;
    type Services = ();

    async fn handle(
        &mut self,
        command: Increment,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), Infallible> {
        for _ in 0..command.times {
            sink.write(Incremented { amount: 1 }, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Incremented) {
        self.count += event.amount;
    }
}

/// cqrs-es over postgres-es in a schema of its own, with the tables its
/// README gives.
struct CqrsEs {
    framework: Arc<PostgresCqrs<Counter>>,
}

impl CqrsEs {
    async fn connect(url: &str, schema: &str, snapshots: bool) -> Self {
        let options = PgConnectOptions::from_str(url)
            .unwrap()
            .options([("search_path", schema)]);
        let pool = PgPoolOptions::new()
            .max_connections(CLIENTS as u32)
            .connect_with(options)
            .await
            .expect("PostgreSQL (scripts/bench.sh starts it)");
        let repository = PostgresEventRepository::new(pool);
        let store = if snapshots {
            cqrs_es::persist::PersistedEventStore::new_snapshot_store(repository, SNAPSHOT_EVERY)
        } else {
            cqrs_es::persist::PersistedEventStore::new_event_store(repository)
        };
        Self {
            framework: Arc::new(CqrsFramework::new(store, vec![], ())),
        }
    }

    async fn create_tables(url: &str, schema: &str) {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "CREATE SCHEMA {schema};
                 CREATE TABLE {schema}.events (
                   aggregate_type text NOT NULL, aggregate_id text NOT NULL,
                   sequence bigint CHECK (sequence >= 0) NOT NULL,
                   event_type text NOT NULL, event_version text NOT NULL,
                   payload json NOT NULL, metadata json NOT NULL,
                   PRIMARY KEY (aggregate_type, aggregate_id, sequence));
                 CREATE TABLE {schema}.snapshots (
                   aggregate_type text NOT NULL, aggregate_id text NOT NULL,
                   last_sequence bigint CHECK (last_sequence >= 0) NOT NULL,
                   current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
                   payload json NOT NULL,
                   PRIMARY KEY (aggregate_type, aggregate_id, last_sequence));"
            ))
            .await
            .unwrap();
    }

    /// A run on fresh counters, each given [`HISTORY`] events by one command first.
    async fn increments(&self) -> Sample {
        let run = Uuid::now_v7().simple().to_string();
        let counters: Vec<String> = (0..CLIENTS).map(|c| format!("{run}-{c}")).collect();
        let history = counters
            .iter()
            .map(|id| self.framework.execute(id, Increment { times: HISTORY }));
        for written in futures_util::future::join_all(history).await {
            written.expect("cqrs-es history");
        }
        let framework = Arc::clone(&self.framework);
        report::closed_loop(CLIENTS, move |client| {
            let (framework, id) = (Arc::clone(&framework), counters[client].clone());
            async move {
                framework
                    .execute(&id, Increment { times: 1 })
                    .await
                    .expect("cqrs-es increment");
            }
        })
        .await
    }
}

/// scaleout's command service on a PostgreSQL store, as command-svc runs it
/// without a bus.
struct Scaleout {
    store: Arc<dyn EventStore>,
    channel: Channel,
    stopping: CancellationToken,
    served: tokio::task::JoinHandle<Result<(), scaleout::app::ServeError>>,
}

impl Scaleout {
    async fn start(url: &str, schema: &str) -> Self {
        let store: Arc<dyn EventStore> = Arc::new(
            PostgresStore::connect(PostgresConfig::new(url).with_schema(schema.to_owned()))
                .await
                .expect("PostgreSQL (scripts/bench.sh starts it)"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stopping = CancellationToken::new();
        let served = tokio::spawn(scaleout::app::run_command_service(
            listener,
            common::command_service(Arc::clone(&store), Default::default()),
            stopping.clone(),
        ));
        let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
        Self {
            store,
            channel,
            stopping,
            served,
        }
    }

    /// [`HISTORY`] increments of `counter`, appended as its commands append them.
    fn history(counter: &str) -> AppendRequest {
        let event = CounterEvent::Incremented(pb::CounterIncremented {
            counter_id: counter.to_owned(),
            amount: 1,
        });
        let events = (0..HISTORY)
            .map(|_| NewEvent {
                event_id: Uuid::now_v7(),
                event_type: event.event_type(),
                payload: event.encode(),
            })
            .collect::<Vec<_>>();
        AppendRequest {
            stream_id: format!("counter-{counter}"),
            stream_type: "counter".into(),
            expected: ExpectedVersion::NoStream,
            events: NewEvents::try_from(events).unwrap(),
            request_key: None,
            metadata: common::metadata(),
        }
    }

    /// A run on fresh counters, each holding [`HISTORY`] events first.
    async fn increments(&self) -> Sample {
        let run = Uuid::now_v7().simple().to_string();
        let counters: Vec<String> = (0..CLIENTS).map(|c| format!("{run}-{c}")).collect();
        let history = counters
            .iter()
            .map(|id| self.store.append(Self::history(id)));
        for written in futures_util::future::join_all(history).await {
            written.expect("scaleout history");
        }
        let channel = self.channel.clone();
        report::closed_loop(CLIENTS, move |client| {
            let mut client_of = CommandServiceClient::new(channel.clone());
            let counter_id = counters[client].clone();
            async move {
                client_of
                    .increment_counter(pb::IncrementCounterRequest {
                        counter_id,
                        ..Default::default()
                    })
                    .await
                    .expect("increment");
            }
        })
        .await
    }

    async fn stop(self) {
        self.stopping.cancel();
        self.served.await.unwrap().unwrap();
    }
}

#[tokio::main]
async fn main() {
    let url = common::postgres_url();
    let mut report = Report::start(
        "versus_cqrs_es",
        "gRPC commands on PostgreSQL beside cqrs-es + postgres-es 0.5 on the same server",
    );
    let id = Uuid::now_v7().simple();
    let (ours, events, snapshots) = (
        format!("bench_{id}"),
        format!("bench_cqrs_events_{id}"),
        format!("bench_cqrs_snapshots_{id}"),
    );
    let scaleout = Scaleout::start(&url, &ours).await;
    CqrsEs::create_tables(&url, &events).await;
    CqrsEs::create_tables(&url, &snapshots).await;
    let by_events = CqrsEs::connect(&url, &events, false).await;
    let by_snapshots = CqrsEs::connect(&url, &snapshots, true).await;
    let scenario =
        "scaleout gRPC commands on PostgreSQL: 16 clients, a counter each holding ~800 events";
    report
        .compare(
            scenario,
            "cqrs-es + postgres-es, snapshots every 100, in process",
            async || by_snapshots.increments().await,
            async || scaleout.increments().await,
        )
        .await;
    report
        .compare(
            &format!("{scenario} (again)"),
            "cqrs-es + postgres-es, events only (no snapshots), in process",
            async || by_events.increments().await,
            async || scaleout.increments().await,
        )
        .await;
    report.finish();
    scaleout.stop().await;
    for schema in [ours, events, snapshots] {
        common::drop_schema(&schema).await;
    }
}
