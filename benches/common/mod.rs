//! What the benchmarks share: where the servers are, and cleaning up after.

#![allow(dead_code)] // each benchmark uses its own subset

pub mod report;

use std::sync::Arc;

use scaleout::bus::rabbitmq::RabbitConfig;
use scaleout::store::EventMetadata;
use scaleout::store::redb::RedbStore;

/// Metadata for a benchmark's event: now, fresh ids.
pub fn metadata() -> EventMetadata {
    EventMetadata {
        occurred_at: std::time::SystemTime::now(),
        correlation_id: uuid::Uuid::now_v7(),
        causation_id: uuid::Uuid::now_v7(),
        actor: None,
        trace: None,
    }
}

/// Opens a redb event store off the runtime's threads (opening may repair).
pub async fn open_redb(path: std::path::PathBuf) -> Arc<RedbStore> {
    let store = tokio::task::spawn_blocking(move || RedbStore::open(path).unwrap())
        .await
        .unwrap();
    Arc::new(store)
}

/// command-svc's reference application on `store` with `server`'s
/// settings and no bus, as the benchmarks serve it.
pub fn command_service(
    store: Arc<dyn scaleout::store::EventStore>,
    server: scaleout::config::ServerArgs,
) -> scaleout::app::CommandService {
    scaleout::app::CommandService {
        app: Arc::new(reference::Reference),
        store,
        bus: None,
        server,
        retry: Default::default(),
        snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
        relay: Default::default(),
    }
}

pub fn postgres_url() -> String {
    std::env::var("SCALEOUT_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://scaleout:scaleout@127.0.0.1:5432/scaleout".into())
}

pub fn rabbitmq_url() -> String {
    std::env::var("SCALEOUT_TEST_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub async fn drop_schema(schema: &str) {
    let (admin, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// Deletes the exchanges of `config` and the queues of `service`.
pub async fn delete_topology(config: &RabbitConfig, service: &str) {
    delete(
        &[config.queue(service), config.dead_letter_queue(service)],
        &[config.events_exchange(), config.dead_letter_exchange()],
    )
    .await;
}

/// Deletes queues and exchanges, each queue with its own connection and one
/// retry: RabbitMQ 3.10 can close the connection that deletes a quorum
/// queue whose consumers have only just gone away.
pub async fn delete(queues: &[String], exchanges: &[String]) {
    for queue in queues {
        for attempt in 0..2 {
            let (_connection, channel) = channel().await;
            let deleted = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
            if deleted.is_ok() || attempt == 1 {
                deleted.unwrap_or_else(|e| panic!("deleting {queue}: {e}"));
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    let (_connection, channel) = channel().await;
    for exchange in exchanges {
        channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await
            .unwrap();
    }
}

async fn channel() -> (lapin::Connection, lapin::Channel) {
    let connection =
        lapin::Connection::connect(&rabbitmq_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}
