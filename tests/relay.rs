//! The outbox relay end to end: events appended through the real stores
//! reach every service type over the real buses, through broker connection
//! loss, a broker outage and two relays on one database.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use scaleout::bus::memory::MemoryBus;
use scaleout::bus::rabbitmq::{RabbitBus, RabbitConfig};
use scaleout::bus::{EventBus, Subscription};
use scaleout::relay::{Relay, RelayConfig, RelayState};
use scaleout::store::postgres::{PostgresConfig, PostgresStore};
use scaleout::store::{AppendRequest, EventMetadata, EventStore, ExpectedVersion, NewEvent};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(120);
const SERVICE_TYPES: [&str; 2] = ["projector", "audit"];

/// How often each service type received each message id.
#[derive(Default)]
struct Seen(Mutex<BTreeMap<&'static str, HashMap<String, u32>>>);

impl Seen {
    fn record(&self, service_type: &'static str, id: String) {
        *self
            .0
            .lock()
            .unwrap()
            .entry(service_type)
            .or_default()
            .entry(id)
            .or_default() += 1;
    }

    /// Waits until every service type has every id; returns duplicates per type.
    async fn wait_for_all(&self, ids: &[String]) -> BTreeMap<&'static str, u32> {
        let started = Instant::now();
        loop {
            {
                let seen = self.0.lock().unwrap();
                let missing: Vec<(&str, usize)> = SERVICE_TYPES
                    .iter()
                    .map(|t| {
                        (
                            *t,
                            ids.iter()
                                .filter(|id| !seen.get(t).is_some_and(|m| m.contains_key(*id)))
                                .count(),
                        )
                    })
                    .filter(|(_, n)| *n > 0)
                    .collect();
                if missing.is_empty() {
                    return seen
                        .iter()
                        .map(|(t, counts)| (*t, counts.values().map(|n| n - 1).sum()))
                        .collect();
                }
                assert!(
                    started.elapsed() < DEADLINE,
                    "still missing after {DEADLINE:?}: {missing:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Three competing consumers per service type, acking everything.
async fn consume(bus: &Arc<dyn EventBus>, seen: &Arc<Seen>, consumers: &mut JoinSet<()>) {
    for service_type in SERVICE_TYPES {
        for _ in 0..3 {
            let subscription = Subscription {
                service_type: service_type.into(),
                bindings: vec!["#".into()],
                prefetch: 200,
                max_attempts: 5,
            };
            let mut subscriber = bus.subscribe(&subscription).await.unwrap();
            let seen = Arc::clone(seen);
            consumers.spawn(async move {
                while let Some(delivery) = subscriber.next().await {
                    seen.record(service_type, delivery.message.message_id.clone());
                    // A lost ack only means a redelivery, which is counted.
                    let _ = delivery.ack().await;
                }
            });
        }
    }
}

/// Appends `total` single-event appends over 50 streams from 16 tasks;
/// returns the event ids.
async fn append_events(store: Arc<dyn EventStore>, total: usize, tag: &str) -> Vec<String> {
    let mut writers = JoinSet::new();
    for writer in 0..16 {
        let store = Arc::clone(&store);
        let tag = tag.to_owned();
        writers.spawn(async move {
            let mut ids = Vec::new();
            for i in (writer..total).step_by(16) {
                let event_id = Uuid::now_v7();
                let request = AppendRequest {
                    stream_id: format!("counter-{tag}-{}", i % 50),
                    stream_type: "counter".into(),
                    expected: ExpectedVersion::Any,
                    events: vec![NewEvent {
                        event_id,
                        event_type: "scaleout.v1.CounterIncremented".into(),
                        payload: vec![],
                    }]
                    .try_into()
                    .unwrap(),
                    request_key: None,
                    metadata: EventMetadata {
                        occurred_at: std::time::SystemTime::now(),
                        correlation_id: Uuid::now_v7(),
                        causation_id: Uuid::now_v7(),
                        actor: None,
                        trace: None,
                    },
                };
                store.append(request).await.unwrap();
                ids.push(event_id.to_string());
            }
            ids
        });
    }
    let mut ids = Vec::new();
    while let Some(written) = writers.join_next().await {
        ids.extend(written.unwrap());
    }
    ids
}

async fn wait_for_empty_outbox(store: &dyn EventStore) {
    let started = Instant::now();
    while !store.read_outbox(0, 1).await.unwrap().is_empty() {
        assert!(started.elapsed() < DEADLINE, "outbox rows stuck");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn postgres_store(schema: &str) -> Arc<dyn EventStore> {
    let config = PostgresConfig::new(&support::postgres_url()).with_schema(schema.to_owned());
    Arc::new(PostgresStore::connect(config).await.expect("PostgreSQL"))
}

fn rabbit(config: &RabbitConfig) -> Arc<dyn EventBus> {
    Arc::new(RabbitBus::new(config.clone()))
}

/// Closes this test's broker connections, as `rabbitmqctl close_all_connections`
/// would, without touching the connections of tests running beside it.
fn close_connections(prefix: &str) -> usize {
    let listed = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    let listing = String::from_utf8_lossy(&listed.stdout);
    let pids: Vec<&str> = listing
        .lines()
        .filter(|line| line.contains(prefix))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    for pid in &pids {
        let closed = Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "forced by the relay test"])
            .status()
            .unwrap();
        assert!(closed.success(), "closing {pid}");
    }
    pids.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_reach_two_service_types_over_rabbitmq_through_a_connection_loss() {
    let schema = support::unique_schema("relay");
    let config = support::bus::rabbit_config();
    let _cleanup = support::Cleanup {
        schema: Some(schema.clone()),
        rabbit: Some(config.clone()),
    };
    let store = postgres_store(&schema).await;
    let bus = rabbit(&config);
    let seen = Arc::new(Seen::default());
    let mut consumers = JoinSet::new();
    consume(&bus, &seen, &mut consumers).await;

    let stopping = CancellationToken::new();
    let relay = Relay::new(Arc::clone(&store), Arc::clone(&bus), RelayConfig::default());
    let relaying = tokio::spawn(relay.run(stopping.clone()));
    let mut ids = append_events(Arc::clone(&store), 5_000, "a").await;

    // Mid-run: once some have arrived, cut every connection, then append the
    // rest, so publishing and consuming both have to recover.
    let started = Instant::now();
    while seen.0.lock().unwrap().get("audit").map_or(0, HashMap::len) < 2_000 {
        assert!(started.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let closed = close_connections(config.prefix());
    assert!(closed > 0, "found no connection of this test to close");
    ids.extend(append_events(Arc::clone(&store), 5_000, "b").await);

    let duplicates = seen.wait_for_all(&ids).await;
    println!(
        "10,000 events, connections closed mid-run: duplicates per service type {duplicates:?}"
    );
    wait_for_empty_outbox(store.as_ref()).await;

    stopping.cancel();
    relaying.await.unwrap();
    consumers.abort_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_reach_two_service_types_in_process() {
    let (store, _dir) = support::redb_store();
    let bus: Arc<dyn EventBus> = Arc::new(MemoryBus::new());
    let seen = Arc::new(Seen::default());
    let mut consumers = JoinSet::new();
    consume(&bus, &seen, &mut consumers).await;
    let stopping = CancellationToken::new();
    let relaying = tokio::spawn(
        Relay::new(Arc::clone(&store), bus, RelayConfig::default()).run(stopping.clone()),
    );

    let ids = append_events(Arc::clone(&store), 10_000, "m").await;
    let duplicates = seen.wait_for_all(&ids).await;
    assert_eq!(
        duplicates.values().sum::<u32>(),
        0,
        "the in-process bus never redelivers here"
    );
    wait_for_empty_outbox(store.as_ref()).await;
    stopping.cancel();
    relaying.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_postgres_publish_every_row_once() {
    let schema = support::unique_schema("relays");
    let config = support::bus::rabbit_config();
    let _cleanup = support::Cleanup {
        schema: Some(schema.clone()),
        rabbit: Some(config.clone()),
    };
    let stores = [postgres_store(&schema).await, postgres_store(&schema).await];
    let bus = rabbit(&config);
    let seen = Arc::new(Seen::default());
    let mut consumers = JoinSet::new();
    consume(&bus, &seen, &mut consumers).await;

    let stopping = CancellationToken::new();
    let mut states = Vec::new();
    let mut relays = JoinSet::new();
    for store in &stores {
        let relay = Relay::new(Arc::clone(store), Arc::clone(&bus), RelayConfig::default());
        states.push(relay.state());
        relays.spawn(relay.run(stopping.clone()));
    }
    let (a, b) = tokio::join!(
        append_events(Arc::clone(&stores[0]), 2_500, "x"),
        append_events(Arc::clone(&stores[1]), 2_500, "y"),
    );
    let ids: Vec<String> = a.into_iter().chain(b).collect();
    let duplicates = seen.wait_for_all(&ids).await;
    assert_eq!(
        duplicates.values().sum::<u32>(),
        0,
        "one relay at a time: no row published twice in the normal path"
    );
    wait_for_empty_outbox(stores[0].as_ref()).await;
    let standing_by = states
        .iter()
        .filter(|s| *s.borrow() == RelayState::Standby)
        .count();
    assert_eq!(standing_by, 1, "exactly one relay holds the outbox");

    stopping.cancel();
    while relays.join_next().await.is_some() {}
    consumers.abort_all();
}

/// command-svc relaying through a proxy to RabbitMQ that a test cuts or
/// freezes, while consumers talk to the broker directly and see what arrives.
struct ProxiedRelay {
    seen: Arc<Seen>,
    consumers: JoinSet<()>,
    /// `None` while the broker is away.
    proxy: Option<support::Proxy>,
    proxy_addr: std::net::SocketAddr,
    service: support::CommandService,
    _dir: tempfile::TempDir,
    _cleanup: support::Cleanup,
}

impl ProxiedRelay {
    const BROKER: &'static str = "127.0.0.1:5672";

    async fn start(proxied: impl FnOnce(RabbitConfig) -> RabbitConfig) -> Self {
        let config = support::bus::rabbit_config();
        let cleanup = support::Cleanup {
            schema: None,
            rabbit: Some(config.clone()),
        };
        let seen = Arc::new(Seen::default());
        let mut consumers = JoinSet::new();
        consume(&rabbit(&config), &seen, &mut consumers).await;
        let proxy_addr = support::Proxy::free_addr().await;
        let proxy = support::Proxy::start(proxy_addr, Self::BROKER).await;
        let url = support::bus::rabbitmq_url().replace(Self::BROKER, &proxy_addr.to_string());
        let bus = proxied(RabbitConfig::new(&url).with_prefix(config.prefix()));
        let (store, dir) = support::redb_store();
        let service = support::CommandService::start_full(scaleout::app::CommandService {
            app: std::sync::Arc::new(reference::Reference),
            store,
            bus: Some(Arc::new(RabbitBus::new(bus))),
            server: scaleout::config::ServerArgs {
                health_interval: Duration::from_millis(100),
                ..Default::default()
            },
            retry: Default::default(),
            snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
            relay: RelayConfig {
                backoff_max: Duration::from_millis(500),
                ..Default::default()
            },
        })
        .await;
        Self {
            seen,
            consumers,
            proxy: Some(proxy),
            proxy_addr,
            service,
            _dir: dir,
            _cleanup: cleanup,
        }
    }

    /// Commands are accepted whatever the broker does; their event ids.
    async fn increment(&self, times: usize) -> Vec<String> {
        let mut client = self.service.client().await;
        let mut ids = Vec::new();
        for _ in 0..times {
            let response = client
                .increment_counter(reference::pb::IncrementCounterRequest {
                    counter_id: "visits".into(),
                    ..Default::default()
                })
                .await
                .expect("commands are accepted whatever the broker does");
            ids.extend(response.into_inner().result.unwrap().event_ids);
        }
        ids
    }

    async fn relay_is(&self, wanted: tonic_health::pb::health_check_response::ServingStatus) {
        support::wait_for_health(
            self.service.channel().await,
            scaleout::app::OUTBOX_RELAY_HEALTH,
            wanted,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_keep_flowing_while_rabbitmq_is_away_and_arrive_once_it_is_back() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut relay = ProxiedRelay::start(|config| config).await;
    let mut ids = relay.increment(1).await;
    relay.seen.wait_for_all(&ids).await;
    relay.relay_is(ServingStatus::Serving).await;

    // The broker goes away: the proxy closes every connection.
    relay.proxy = None;
    ids.extend(relay.increment(20).await);
    relay.relay_is(ServingStatus::NotServing).await;
    support::wait_for_health(
        relay.service.channel().await,
        "scaleout.v1.CommandService",
        ServingStatus::Serving,
    )
    .await;

    relay.proxy = Some(support::Proxy::start(relay.proxy_addr, ProxiedRelay::BROKER).await);
    relay.seen.wait_for_all(&ids).await;
    relay.relay_is(ServingStatus::Serving).await;
    relay.consumers.abort_all();
}

/// A broker that hangs (the connection stays open, nothing comes back): the
/// relay's publish gives up at its timeout, health says NOT_SERVING instead
/// of SERVING while nothing moves, and everything arrives once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_broker_takes_the_relay_health_down_and_loses_nothing() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut relay =
        ProxiedRelay::start(|config| config.with_publish_timeout(Duration::from_secs(1))).await;
    let mut ids = relay.increment(1).await;
    relay.seen.wait_for_all(&ids).await;
    relay.relay_is(ServingStatus::Serving).await;

    relay.proxy.as_ref().unwrap().freeze();
    ids.extend(relay.increment(20).await);
    relay.relay_is(ServingStatus::NotServing).await;

    relay.proxy.as_ref().unwrap().thaw();
    relay.seen.wait_for_all(&ids).await;
    relay.relay_is(ServingStatus::Serving).await;
    relay.consumers.abort_all();
}
