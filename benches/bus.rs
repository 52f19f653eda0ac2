//! Relay and consumer throughput on the real RabbitMQ, beside raw lapin
//! publish-with-confirms and consume-and-ack on the same broker, same run.
//!
//! `cargo bench --bench bus` (needs RabbitMQ on 127.0.0.1:5672 and
//! PostgreSQL; `scripts/test.sh` starts both).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

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
use scaleout::store::redb::RedbStore;
use scaleout::store::{AppendRequest, EventMetadata, EventStore, ExpectedVersion, NewEvent};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const EVENTS: usize = 10_000;
const CONSUMERS: usize = 3;
const PREFETCH: u16 = 250;
/// Confirms the raw publisher keeps in flight, like the relay's batch.
const WINDOW: usize = 500;

fn rate(label: &str, count: usize, elapsed: Duration) -> f64 {
    let per_second = count as f64 / elapsed.as_secs_f64();
    println!("{label:<62} {per_second:>9.0} events/s  ({count} in {elapsed:.2?})");
    per_second
}

/// Raw lapin: a quorum queue bound to a topic exchange, persistent mandatory
/// messages of the relay's size, WINDOW confirms in flight.
async fn raw(prefix: &str, body: &[u8]) -> (f64, f64) {
    let connection = Connection::connect(&common::rabbitmq_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let exchange = format!("{prefix}.raw-events");
    let queue = format!("{prefix}.raw");
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

    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let started = Instant::now();
    let mut in_flight = Vec::with_capacity(WINDOW);
    for i in 0..EVENTS {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(Uuid::now_v7().to_string().into());
        in_flight.push(
            channel
                .basic_publish(
                    exchange.as_str().into(),
                    "counter.scaleout.v1.CounterIncremented".into(),
                    mandatory,
                    body,
                    properties,
                )
                .await
                .unwrap(),
        );
        if in_flight.len() == WINDOW || i + 1 == EVENTS {
            for confirm in in_flight.drain(..) {
                assert!(confirm.await.unwrap().is_ack());
            }
        }
    }
    let publish = rate(
        "raw lapin: publish with confirms",
        EVENTS,
        started.elapsed(),
    );

    let started = Instant::now();
    let mut consumers = JoinSet::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..CONSUMERS {
        let channel = connection.create_channel().await.unwrap();
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
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
    for _ in 0..EVENTS {
        done_rx.recv().await.unwrap();
    }
    let consume = rate(
        &format!("raw lapin: consume and ack, {CONSUMERS} consumers"),
        EVENTS,
        started.elapsed(),
    );
    consumers.abort_all();
    common::delete(&[queue], &[exchange]).await;
    (publish, consume)
}

/// Appends EVENTS single-event appends from 16 writers (not timed).
async fn fill(store: &Arc<dyn EventStore>) {
    let mut appends = JoinSet::new();
    for writer in 0..16 {
        let store = Arc::clone(store);
        appends.spawn(async move {
            for i in (writer..EVENTS).step_by(16) {
                let event = NewEvent {
                    event_id: Uuid::now_v7(),
                    event_type: "scaleout.v1.CounterIncremented".into(),
                    payload: vec![8; 16],
                };
                let request = AppendRequest {
                    stream_id: format!("counter-{}", i % 100),
                    stream_type: "counter".into(),
                    expected: ExpectedVersion::Any,
                    events: vec![event].try_into().unwrap(),
                    request_key: None,
                    metadata: EventMetadata {
                        occurred_at: SystemTime::now(),
                        correlation_id: Uuid::now_v7(),
                        causation_id: Uuid::now_v7(),
                    },
                };
                store.append(request).await.unwrap();
            }
        });
    }
    while appends.join_next().await.is_some() {}
}

/// The relay draining a full outbox, then CONSUMERS subscribers draining the queue.
async fn scaleout(label: &str, store: Arc<dyn EventStore>, prefix: &str) -> (f64, f64) {
    let config = RabbitConfig::new(&common::rabbitmq_url()).with_prefix(prefix);
    let bus: Arc<dyn EventBus> = Arc::new(RabbitBus::new(config.clone()));
    let subscription = Subscription {
        service_type: "bench".into(),
        bindings: vec!["#".into()],
        prefetch: PREFETCH,
        max_attempts: 5,
    };
    drop(bus.subscribe(&subscription).await.unwrap()); // the queue exists, nobody consumes yet
    fill(&store).await;

    let stopping = CancellationToken::new();
    let started = Instant::now();
    let relaying = tokio::spawn(
        Relay::new(Arc::clone(&store), Arc::clone(&bus), RelayConfig::default())
            .run(stopping.clone()),
    );
    while !store.read_outbox(1).await.unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let publish = rate(
        &format!("scaleout relay from {label}: outbox to confirmed"),
        EVENTS,
        started.elapsed(),
    );
    stopping.cancel();
    relaying.await.unwrap();

    let started = Instant::now();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut consumers = JoinSet::new();
    for _ in 0..CONSUMERS {
        let mut subscriber = bus.subscribe(&subscription).await.unwrap();
        let done = done_tx.clone();
        consumers.spawn(async move {
            while let Some(delivery) = subscriber.next().await {
                delivery.ack().await.unwrap();
                let _ = done.send(());
            }
        });
    }
    for _ in 0..EVENTS {
        done_rx.recv().await.unwrap();
    }
    let consume = rate(
        &format!("scaleout subscribers: consume and ack, {CONSUMERS} consumers"),
        EVENTS,
        started.elapsed(),
    );
    consumers.abort_all();

    common::delete_topology(&config, "bench").await;
    (publish, consume)
}

#[tokio::main]
async fn main() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "scaleout bus benchmark: {cores} cores, {EVENTS} events, RabbitMQ quorum queues, persistent messages\n"
    );
    let run = Uuid::now_v7().simple().to_string();
    let body_size = {
        // The relay's messages carry an envelope of about this size.
        let sample = scaleout::bus::BusMessage::from_event(&scaleout::store::RecordedEvent {
            position: 1,
            stream_id: "counter-1".into(),
            stream_type: "counter".into(),
            version: 1,
            event_id: Uuid::now_v7(),
            event_type: "scaleout.v1.CounterIncremented".into(),
            payload: vec![8; 16],
            metadata: EventMetadata {
                occurred_at: SystemTime::now(),
                correlation_id: Uuid::now_v7(),
                causation_id: Uuid::now_v7(),
            },
            request_id: None,
        });
        sample.body.len()
    };
    // A first raw run warms the broker up; the second is the baseline.
    raw(&format!("bench-{run}-warmup"), &vec![7; body_size]).await;
    println!("  (warm-up above)");
    let (raw_publish, raw_consume) = raw(&format!("bench-{run}"), &vec![7; body_size]).await;

    let dir = tempfile::tempdir().unwrap();
    let redb: Arc<dyn EventStore> =
        Arc::new(RedbStore::open(dir.path().join("events.redb")).unwrap());
    let (publish, consume) = scaleout("redb", redb, &format!("bench-{run}-redb")).await;
    println!(
        "  ratios: relay {:.0}% of raw publish, subscribers {:.0}% of raw consume\n",
        100.0 * publish / raw_publish,
        100.0 * consume / raw_consume
    );

    let pg_url = common::postgres_url();
    let schema = format!("bench_{run}");
    let postgres: Arc<dyn EventStore> = Arc::new(
        PostgresStore::connect(PostgresConfig::new(&pg_url).with_schema(schema.clone()))
            .await
            .unwrap(),
    );
    let (publish, consume) = scaleout("PostgreSQL", postgres, &format!("bench-{run}-pg")).await;
    println!(
        "  ratios: relay {:.0}% of raw publish, subscribers {:.0}% of raw consume",
        100.0 * publish / raw_publish,
        100.0 * consume / raw_consume
    );
    common::drop_schema(&schema).await;
}
