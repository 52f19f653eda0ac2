//! The projector as a process: killed with SIGKILL mid-stream and restarted,
//! its read models still equal the fold of the event log.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reference::domain::values::{Amount, Id};
use reference::domain::{Counter, CounterCommand};
use scaleout::bus::rabbitmq::RabbitBus;
use scaleout::bus::{EventBus, Subscription};
use scaleout::command::{Command, CommandHandler, RetryPolicy};
use scaleout::documents::redb::RedbDocuments;
use scaleout::relay::Relay;
use support::Process;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(120);

fn handled(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("scaleout_projector_handled_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_mid_stream_and_restarted_still_equals_the_fold() {
    let config = support::bus::rabbit_config();
    let _cleanup = support::Cleanup {
        schema: None,
        rabbit: Some(config.clone()),
    };
    let (store, _dir) = support::redb_store();
    let bus: Arc<dyn EventBus> = Arc::new(RabbitBus::new(config.clone()));
    let subscription = Subscription {
        service_type: "projector".into(),
        bindings: vec!["#".into()],
        prefetch: 50,
        max_attempts: 5,
    };
    // The queue exists before the first event is relayed.
    drop(bus.subscribe(&subscription).await.unwrap());
    let stopping = CancellationToken::new();
    tokio::spawn(
        Relay::new(Arc::clone(&store), Arc::clone(&bus), Default::default()).run(stopping.clone()),
    );

    let views = tempfile::tempdir().unwrap();
    let views_path = views.path().join("views.redb");
    // The log the projector fills gaps from: command-svc's read API.
    let log = support::CommandService::start(Arc::clone(&store)).await;
    let args: Vec<String> = [
        "--event-log",
        &log.url(),
        "--listen",
        "127.0.0.1:0",
        "--event-bus",
        &support::bus::rabbitmq_url(),
        "--event-bus-prefix",
        config.prefix(),
        "--document-store",
        &format!("redb:{}", views_path.display()),
        "--prefetch",
        "50",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let projector = Process::start("projector", &args);

    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));
    let mut writers = tokio::task::JoinSet::new();
    for t in 0..8 {
        let handler = Arc::clone(&handler);
        writers.spawn(async move {
            for i in 0..250u64 {
                let command = Command {
                    aggregate_id: Id::parse(if i % 5 == 0 { "cold" } else { "hot" }).unwrap(),
                    command: CounterCommand::Increment {
                        amount: Amount::parse(1 + t).unwrap(),
                    },
                    expected: None,
                    request_key: None,
                    origin: Default::default(),
                };
                handler.execute::<Counter>(command).await.unwrap();
            }
        });
    }

    // Mid-stream: some, not all, events are projected; then SIGKILL.
    let started = Instant::now();
    while handled(&projector.http_get("/metrics").await) < 200 {
        assert!(
            started.elapsed() < DEADLINE,
            "the projector is not projecting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(projector); // SIGKILL: no graceful anything
    let mut projector = Process::start("projector", &args);
    while writers.join_next().await.is_some() {}

    // Drained: the outbox is empty and, with the projector stopped (which
    // hands back anything unacked), nothing is left in its queue.
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < DEADLINE,
            "the projector never drained its queue"
        );
        while !store.read_outbox(0, 1).await.unwrap().is_empty()
            || support::bus::queue_depth(&config, "projector").await > 0
        {
            assert!(started.elapsed() < DEADLINE, "events are stuck");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(projector.stop().success());
        if support::bus::queue_depth(&config, "projector").await == 0 {
            break;
        }
        projector = Process::start("projector", &args);
    }

    let log = support::projection::read_log(
        store.as_ref(),
        &["counter-hot".into(), "counter-cold".into()],
    )
    .await;
    assert_eq!(log.len(), 2000);
    let expected = support::projection::fold_log(&log);
    let documents = RedbDocuments::open(&views_path).unwrap();
    let actual = support::projection::read_documents(&documents, &expected).await;
    assert_eq!(actual, expected, "the read models are the fold of the log");
    stopping.cancel();
}

fn paused_workers(metrics: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("scaleout_projector_paused_workers "))
        .and_then(|n| n.trim().parse().ok())
}

/// Starts a projector process on `config`'s broker names and a fresh
/// document store, with `--max-attempts 5` and health probed every 100 ms.
async fn projector_on(
    config: &scaleout::bus::rabbitmq::RabbitConfig,
    log: &support::CommandService,
    views: &std::path::Path,
) -> Process {
    let args: Vec<String> = [
        "--event-log",
        &log.url(),
        "--listen",
        "127.0.0.1:0",
        "--event-bus",
        &support::bus::rabbitmq_url(),
        "--event-bus-prefix",
        config.prefix(),
        "--document-store",
        &format!("redb:{}", views.join("views.redb").display()),
        "--max-attempts",
        "5",
        "--health-interval",
        "100ms",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    Process::start("projector", &args)
}

async fn overall_health(
    projector: &Process,
) -> tonic_health::pb::health_check_response::ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", projector.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// A projector whose queue it cannot use (here another connection holds it
/// exclusively) consumes nothing, so it must not say SERVING, however well
/// its bus and store answer pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_that_cannot_consume_is_not_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let config = support::bus::rabbit_config();
    let _cleanup = support::Cleanup {
        schema: None,
        rabbit: Some(config.clone()),
    };
    let holder = lapin::Connection::connect(
        &support::bus::rabbitmq_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = holder.create_channel().await.unwrap();
    channel
        .queue_declare(
            config.queue("projector").as_str().into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();

    let (store, _dir) = support::redb_store();
    let log = support::CommandService::start(store).await;
    let views = tempfile::tempdir().unwrap();
    let projector = projector_on(&config, &log, views.path()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while paused_workers(&projector.http_get("/metrics").await) != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the refused worker is not counted as paused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Several health rounds later, still not serving.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(overall_health(&projector).await, ServingStatus::NotServing);
    }
    drop(holder);
}

/// Changing `--max-attempts` on a deployment whose queue already exists
/// (with another delivery limit, which the broker would refuse to
/// redeclare) still consumes: the queue is used as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_with_a_changed_max_attempts_uses_the_existing_queue() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let config = support::bus::rabbit_config();
    let _cleanup = support::Cleanup {
        schema: None,
        rabbit: Some(config.clone()),
    };
    let bus = RabbitBus::new(config.clone());
    let other_limit = Subscription {
        service_type: "projector".into(),
        bindings: vec!["#".into()],
        prefetch: 10,
        max_attempts: 99,
    };
    drop(bus.subscribe(&other_limit).await.unwrap());

    let (store, _dir) = support::redb_store();
    let log = support::CommandService::start(store).await;
    let views = tempfile::tempdir().unwrap();
    let projector = projector_on(&config, &log, views.path()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while overall_health(&projector).await != ServingStatus::Serving {
        assert!(Instant::now() < deadline, "the projector never consumed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        paused_workers(&projector.http_get("/metrics").await),
        Some(0)
    );
}
