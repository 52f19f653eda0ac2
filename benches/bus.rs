//! Relay and consumer throughput on the real RabbitMQ, beside raw lapin
//! publish-with-confirms and consume-and-ack on the same broker, same run.
//!
//! `cargo bench --bench bus` (needs RabbitMQ on 127.0.0.1:5672 and
//! PostgreSQL; `scripts/test.sh` starts both).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::report::{self, Report, Sample};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use scaleout::bus::rabbitmq::{RabbitBus, RabbitConfig};
use scaleout::bus::{EventBus, Subscription};
use scaleout::relay::{Relay, RelayConfig};
use scaleout::store::postgres::{PostgresConfig, PostgresStore};
use scaleout::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const CONSUMERS: usize = 3;
const PREFETCH: u16 = 250;
/// Confirms the raw publisher keeps in flight, like the relay's batch.
const WINDOW: usize = 500;

/// Raw lapin on a fresh quorum queue bound to a topic exchange, as the
/// relay's topology is; deleted again by [`RawQueue::delete`].
struct RawQueue {
    connection: Connection,
    channel: lapin::Channel,
    exchange: String,
    queue: String,
}

impl RawQueue {
    async fn declare() -> Self {
        let prefix = format!("bench-raw-{}", Uuid::now_v7().simple());
        let connection =
            Connection::connect(&common::rabbitmq_url(), ConnectionProperties::default())
                .await
                .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let (exchange, queue) = (format!("{prefix}.events"), format!("{prefix}.queue"));
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let queue_options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.as_str().into(), queue_options, arguments)
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Self {
            connection,
            channel,
            exchange,
            queue,
        }
    }

    /// Persistent mandatory messages of `body`, WINDOW confirms in flight.
    async fn publish(&self, body: &[u8]) -> Sample {
        let mandatory = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let events = report::events();
        let started = Instant::now();
        let mut in_flight = Vec::with_capacity(WINDOW);
        for i in 0..events {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(Uuid::now_v7().to_string().into());
            in_flight.push(
                self.channel
                    .basic_publish(
                        self.exchange.as_str().into(),
                        "counter.scaleout.v1.CounterIncremented".into(),
                        mandatory,
                        body,
                        properties,
                    )
                    .await
                    .unwrap(),
            );
            if in_flight.len() == WINDOW || i + 1 == events {
                for confirm in in_flight.drain(..) {
                    assert!(confirm.await.unwrap().is_ack());
                }
            }
        }
        Sample::throughput(events, started.elapsed())
    }

    /// CONSUMERS consumers, each on its own channel, acking every message.
    async fn consume(&self) -> Sample {
        let events = report::events();
        let started = Instant::now();
        let mut consumers = JoinSet::new();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..CONSUMERS {
            let channel = self.connection.create_channel().await.unwrap();
            channel
                .basic_qos(PREFETCH, BasicQosOptions::default())
                .await
                .unwrap();
            let mut consumer = channel
                .basic_consume(
                    self.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let done = done_tx.clone();
            consumers.spawn(async move {
                let _channel = channel;
                while let Some(Ok(delivery)) = consumer.next().await {
                    delivery.ack(BasicAckOptions::default()).await.unwrap();
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

    async fn delete(self) {
        drop(self.connection);
        common::delete(&[self.queue], &[self.exchange]).await;
    }
}

/// Appends [`report::events`] events, ten to an append over 100 streams,
/// from 16 writers (not timed).
async fn fill(store: &Arc<dyn EventStore>) {
    let appends = report::events().div_ceil(10);
    let mut writers = JoinSet::new();
    for writer in 0..16 {
        let store = Arc::clone(store);
        writers.spawn(async move {
            for i in (writer..appends).step_by(16) {
                let events: Vec<NewEvent> = (0..10)
                    .map(|_| NewEvent {
                        event_id: Uuid::now_v7(),
                        event_type: "scaleout.v1.CounterIncremented".into(),
                        payload: vec![8; 16],
                    })
                    .collect();
                let request = AppendRequest {
                    stream_id: format!("counter-{}", i % 100),
                    stream_type: "counter".into(),
                    expected: ExpectedVersion::Any,
                    events: events.try_into().unwrap(),
                    request_key: None,
                    metadata: common::metadata(),
                };
                store.append(request).await.unwrap();
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
}

/// A fresh bus topology with its queue declared, nobody consuming yet.
async fn topology() -> (RabbitConfig, Arc<dyn EventBus>) {
    let prefix = format!("bench-{}", Uuid::now_v7().simple());
    let config = RabbitConfig::new(&common::rabbitmq_url()).with_prefix(prefix);
    let bus: Arc<dyn EventBus> = Arc::new(RabbitBus::new(config.clone()));
    drop(bus.subscribe(&subscription()).await.unwrap());
    (config, bus)
}

fn subscription() -> Subscription {
    Subscription {
        service_type: "bench".into(),
        bindings: vec!["#".into()],
        prefetch: PREFETCH,
        max_attempts: 5,
    }
}

/// The relay draining a full outbox of `store` to a fresh queue.
async fn relay(store: Arc<dyn EventStore>) -> Sample {
    let (config, bus) = topology().await;
    fill(&store).await;
    let stopping = CancellationToken::new();
    let started = Instant::now();
    let relaying = tokio::spawn(
        Relay::new(Arc::clone(&store), Arc::clone(&bus), RelayConfig::default())
            .run(stopping.clone()),
    );
    while !store.read_outbox(0, 1).await.unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let sample = Sample::throughput(report::events(), started.elapsed());
    stopping.cancel();
    relaying.await.unwrap();
    common::delete_topology(&config, "bench").await;
    sample
}

/// CONSUMERS subscribers draining a queue the relay's way filled.
async fn subscribers() -> Sample {
    let (config, bus) = topology().await;
    let events = report::events();
    let messages: Vec<_> = (0..events).map(|_| message()).collect();
    for chunk in messages.chunks(WINDOW) {
        for published in bus.publish(chunk).await {
            published.unwrap();
        }
    }
    let started = Instant::now();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut consumers = JoinSet::new();
    for _ in 0..CONSUMERS {
        let mut subscriber = bus.subscribe(&subscription()).await.unwrap();
        let done = done_tx.clone();
        consumers.spawn(async move {
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
    common::delete_topology(&config, "bench").await;
    sample
}

/// A message as the relay publishes one event, with an id of its own.
fn message() -> scaleout::bus::BusMessage {
    scaleout::bus::BusMessage::from_event(&scaleout::store::RecordedEvent {
        position: 1,
        stream_id: "counter-1".into(),
        stream_type: "counter".into(),
        version: 1,
        event_id: Uuid::now_v7(),
        event_type: "scaleout.v1.CounterIncremented".into(),
        payload: vec![8; 16],
        metadata: common::metadata(),
        request_id: None,
    })
}

#[tokio::main]
async fn main() {
    let mut report = Report::start(
        "bus",
        "the relay and subscribers on RabbitMQ quorum queues, beside raw lapin",
    );
    // Raw messages are the size of the relay's.
    let body = vec![7; message().body.len()];
    // A first raw run warms the broker up.
    let warm = RawQueue::declare().await;
    warm.publish(&body).await;
    warm.delete().await;

    let raw_publish = async || {
        let queue = RawQueue::declare().await;
        let sample = queue.publish(&body).await;
        queue.delete().await;
        sample
    };
    report
        .compare(
            "relay from redb: outbox to confirmed",
            "raw lapin: publish with confirms",
            raw_publish,
            async || {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("events.redb");
                relay(common::open_redb(path).await).await
            },
        )
        .await;
    report
        .compare(
            "relay from PostgreSQL: outbox to confirmed",
            "raw lapin: publish with confirms",
            raw_publish,
            async || {
                let schema = format!("bench_{}", Uuid::now_v7().simple());
                let config =
                    PostgresConfig::new(&common::postgres_url()).with_schema(schema.clone());
                let store = PostgresStore::connect(config).await.unwrap();
                let sample = relay(Arc::new(store)).await;
                common::drop_schema(&schema).await;
                sample
            },
        )
        .await;
    report
        .compare(
            &format!("subscribers: consume and ack, {CONSUMERS} consumers"),
            &format!("raw lapin: consume and ack, {CONSUMERS} consumers"),
            async || {
                let queue = RawQueue::declare().await;
                queue.publish(&body).await;
                let sample = queue.consume().await;
                queue.delete().await;
                sample
            },
            async || subscribers().await,
        )
        .await;
    report.finish();
}
