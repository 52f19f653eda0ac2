//! Health follows the event store: a PostgreSQL that stops answering makes
//! command-svc NOT_SERVING (and commands UNAVAILABLE); its return makes it
//! SERVING again. The outage is a TCP proxy in front of the real server
//! that the test cuts and restores.

mod support;

use std::sync::Arc;
use std::time::Duration;

use reference::pb;
use scaleout::config::ServerArgs;
use scaleout::store::postgres::{PostgresConfig, PostgresStore};
use support::{CommandService, Proxy};
use tokio::net::TcpListener;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const POSTGRES: &str = "127.0.0.1:5432";

async fn wait_for_status(
    health: &mut HealthClient<tonic::transport::Channel>,
    wanted: ServingStatus,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: "scaleout.v1.CommandService".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        if status == wanted {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {status:?}, waiting for {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_event_store_down_and_up() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(addr, POSTGRES).await;
    let url = support::postgres_url().replace(POSTGRES, &addr.to_string());
    let schema = support::unique_schema("health");
    let store = PostgresStore::connect(PostgresConfig::new(&url).with_schema(schema.clone()))
        .await
        .expect("PostgreSQL through the proxy");
    let args = ServerArgs {
        health_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let service = CommandService::start_with(Arc::new(store), args).await;
    let mut health = HealthClient::new(service.channel().await);
    wait_for_status(&mut health, ServingStatus::Serving).await;

    drop(proxy);
    wait_for_status(&mut health, ServingStatus::NotServing).await;
    let refused = service
        .client()
        .await
        .increment_counter(pb::IncrementCounterRequest {
            counter_id: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    let _proxy = Proxy::start(addr, POSTGRES).await;
    wait_for_status(&mut health, ServingStatus::Serving).await;
    service
        .client()
        .await
        .increment_counter(pb::IncrementCounterRequest {
            counter_id: "c".into(),
            ..Default::default()
        })
        .await
        .expect("commands work again once the store is back");

    support::drop_schema(&schema).await;
}
