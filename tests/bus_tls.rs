//! The bus over `amqps://`, against the broker's own TLS listener: the one
//! `scripts/test.sh` starts on 5671 beside the running RabbitMQ, with a CA
//! of its own (`SCALEOUT_TEST_RABBITMQ_TLS_CA` names another).

mod support;

use std::time::Duration;

use scaleout::bus::rabbitmq::{RabbitBus, RabbitConfig};
use scaleout::bus::{EventBus, Subscription};

const PATIENCE: Duration = Duration::from_secs(10);

fn tls_url(host: &str) -> String {
    format!("amqps://guest:guest@{host}:5671/%2f")
}

fn test_ca() -> String {
    let path = std::env::var("SCALEOUT_TEST_RABBITMQ_TLS_CA")
        .unwrap_or_else(|_| "/var/lib/rabbitmq/scaleout-test-tls/ca.crt".into());
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("reading {path}: {e}; scripts/test.sh starts RabbitMQ's TLS listener and makes it")
    })
}

/// A configuration of its own, and what removes its queues afterwards.
fn config(url: &str) -> (RabbitConfig, support::Cleanup) {
    let plain = support::bus::rabbit_config();
    let config = RabbitConfig::new(url).with_prefix(plain.prefix());
    let cleanup = support::Cleanup {
        schema: None,
        rabbit: Some(plain),
    };
    (config, cleanup)
}

#[tokio::test]
async fn events_travel_over_tls_to_a_broker_whose_certificate_chains_to_the_configured_ca() {
    let (config, _cleanup) = config(&tls_url("localhost"));
    let bus = RabbitBus::connect(config.with_ca(test_ca()))
        .await
        .expect("RabbitMQ over TLS on localhost:5671");
    let mut subscriber = bus
        .subscribe(&Subscription {
            service_type: "counters".into(),
            bindings: vec!["counter.#".into()],
            prefetch: 10,
            max_attempts: 3,
        })
        .await
        .unwrap();
    let sent = support::bus::message("counter", "scaleout.v1.CounterIncremented", 1);
    let published = bus.publish(std::slice::from_ref(&sent)).await;
    assert!(published.iter().all(Result::is_ok), "{published:?}");
    let delivery = tokio::time::timeout(PATIENCE, subscriber.next())
        .await
        .expect("no delivery over TLS")
        .unwrap();
    assert_eq!(delivery.message.message_id, sent.message_id);
    assert_eq!(delivery.message.body, sent.body);
    delivery.ack().await.unwrap();
}

#[tokio::test]
async fn a_broker_whose_certificate_chains_to_no_trusted_ca_is_refused() {
    // The system's CAs only: the test CA is not among them.
    let (config, _cleanup) = config(&tls_url("localhost"));
    let error = RabbitBus::new(config).ping().await.unwrap_err();
    assert!(
        error.to_string().to_lowercase().contains("certificate"),
        "{error}"
    );
}

#[tokio::test]
async fn a_broker_answering_under_another_name_is_refused() {
    // The same broker and CA, reached by an address its certificate does
    // not name (it names localhost and 127.0.0.1).
    let (config, _cleanup) = config(&tls_url("127.0.0.2"));
    let error = RabbitBus::new(config.with_ca(test_ca()))
        .ping()
        .await
        .unwrap_err();
    assert!(
        error.to_string().to_lowercase().contains("certificate"),
        "{error}"
    );
}

/// The shipped binaries given `--event-bus amqps://… --event-bus-ca`: the
/// relay publishes over TLS and a projector consumes over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_svc_and_a_projector_run_over_tls_with_the_ca_flag() {
    let (config, _cleanup) = config(&tls_url("localhost"));
    let data = tempfile::tempdir().unwrap();
    let ca = data.path().join("rabbitmq-ca.crt");
    std::fs::write(&ca, test_ca()).unwrap();
    let bus = [
        "--event-bus".to_owned(),
        tls_url("localhost"),
        "--event-bus-prefix".to_owned(),
        config.prefix().to_owned(),
        "--event-bus-ca".to_owned(),
        ca.display().to_string(),
    ];
    let command = support::Process::start(
        "command-svc",
        &[
            &[
                "--listen".to_owned(),
                "127.0.0.1:0".to_owned(),
                "--event-store".to_owned(),
                format!("redb:{}", data.path().join("events.redb").display()),
            ][..],
            &bus,
        ]
        .concat(),
    );
    let projector = support::Process::start(
        "projector",
        &[
            &[
                "--listen".to_owned(),
                "127.0.0.1:0".to_owned(),
                "--document-store".to_owned(),
                format!("redb:{}", data.path().join("views.redb").display()),
                "--event-log".to_owned(),
                format!("http://{}", command.addr),
            ][..],
            &bus,
        ]
        .concat(),
    );
    let mut commands = reference::pb::command_service_client::CommandServiceClient::connect(
        format!("http://{}", command.addr),
    )
    .await
    .unwrap();
    commands
        .increment_counter(reference::pb::IncrementCounterRequest {
            counter_id: "over-tls".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = projector.http_get("/metrics").await;
        let handled = metrics
            .lines()
            .find_map(|line| line.strip_prefix("scaleout_projector_handled_total "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if handled >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the projector handled nothing over TLS"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(projector.stop().success());
    assert!(command.stop().success());
}
