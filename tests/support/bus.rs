//! Buses for the conformance suite, each fresh and cleaned up after the case.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use scaleout::bus::memory::MemoryBus;
use scaleout::bus::rabbitmq::{RabbitBus, RabbitConfig};
use scaleout::bus::{BusMessage, EventBus};
use scaleout::store::{EventMetadata, RecordedEvent};
use uuid::Uuid;

/// Every service type the suites subscribe with, so cleanup finds their queues.
pub const SERVICE_TYPES: &[&str] = &[
    "projector",
    "audit",
    "files",
    "counters",
    "retrying",
    "parking",
    "bounded",
    "handover",
];

pub fn rabbitmq_url() -> String {
    std::env::var("SCALEOUT_TEST_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub async fn memory<F, Fut>(case: F)
where
    F: FnOnce(Arc<dyn EventBus>) -> Fut,
    Fut: Future<Output = ()>,
{
    case(Arc::new(MemoryBus::new())).await;
}

/// A RabbitMQ bus whose names carry a prefix of its own; its exchanges and
/// queues are deleted afterwards, also when the case fails.
pub async fn rabbitmq<F, Fut>(case: F)
where
    F: FnOnce(Arc<dyn EventBus>) -> Fut,
    Fut: Future<Output = ()>,
{
    let config = rabbit_config();
    let bus = RabbitBus::connect(config.clone())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672");
    let outcome = AssertUnwindSafe(case(Arc::new(bus))).catch_unwind().await;
    delete_topology(&config).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

pub fn rabbit_config() -> RabbitConfig {
    RabbitConfig::new(&rabbitmq_url())
        .with_prefix(format!("test-{}", uuid::Uuid::now_v7().simple()))
}

/// Deletes a test's exchanges and queues. Each deletion gets a connection
/// of its own and one retry: RabbitMQ 3.10 can close the connection that
/// deletes a quorum queue whose consumer has only just gone away.
pub async fn delete_topology(config: &RabbitConfig) {
    let queues = SERVICE_TYPES
        .iter()
        .flat_map(|service| [config.queue(service), config.dead_letter_queue(service)]);
    for queue in queues {
        for attempt in 0..2 {
            let (_connection, channel) = fresh_channel().await;
            let deleted = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            if deleted.is_ok() || attempt == 1 {
                deleted.unwrap_or_else(|e| panic!("deleting {queue}: {e}"));
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    let (_connection, channel) = fresh_channel().await;
    for exchange in [config.events_exchange(), config.dead_letter_exchange()] {
        channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
    }
}

async fn fresh_channel() -> (lapin::Connection, lapin::Channel) {
    let connection =
        lapin::Connection::connect(&rabbitmq_url(), lapin::ConnectionProperties::default())
            .await
            .expect("RabbitMQ for cleanup");
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// Messages ready in a service type's queue (not counting unacked ones).
pub async fn queue_depth(config: &RabbitConfig, service_type: &str) -> u32 {
    let connection =
        lapin::Connection::connect(&rabbitmq_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare(
            config.queue(service_type).into(),
            passive,
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    queue.message_count()
}

/// A message carrying a `stream_type` event at `version` of `stream_type-1`.
pub fn message(stream_type: &str, event_type: &str, version: u64) -> BusMessage {
    BusMessage::from_event(&RecordedEvent {
        position: version,
        stream_id: format!("{stream_type}-1"),
        stream_type: stream_type.into(),
        version,
        event_id: Uuid::now_v7(),
        event_type: event_type.into(),
        payload: vec![1, 2, 3],
        metadata: EventMetadata {
            occurred_at: std::time::SystemTime::now(),
            correlation_id: Uuid::now_v7(),
            causation_id: Uuid::now_v7(),
            actor: None,
            trace: None,
        },
        request_id: None,
    })
}
