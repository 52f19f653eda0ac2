//! What the real SDK, over TCP, surfaces when the server fails the way
//! Couchbase Server can: each fault is switched on while the client is
//! connected, and off again to show the same client recovers.

use std::time::Duration;

use couchbase::authenticator::PasswordAuthenticator;
use couchbase::cluster::Cluster;
use couchbase::collection::Collection;
use couchbase::durability_level::DurabilityLevel;
use couchbase::error::ErrorKind;
use couchbase::options::cluster_options::ClusterOptions;
use couchbase::options::kv_options::{InsertOptions, RemoveOptions, ReplaceOptions};
use couchbase_kv_server::protocol::{MAX_VALUE, opcode};
use couchbase_kv_server::{Fault, ServerConfig, TestServer};
use tokio::time::{Instant, timeout};

/// How long a call may take while the server fails: short, as the SDK
/// retries these faults forever.
const BOUND: Duration = Duration::from_millis(1500);
/// How long recovery may take: the SDK reconnects within a second.
const RECOVERY: Duration = Duration::from_secs(10);

/// A connected SDK client whose bucket connection is already open.
struct Client {
    collection: Collection,
    _cluster: Cluster,
}

async fn connect(server: &TestServer) -> Client {
    let options =
        ClusterOptions::new(PasswordAuthenticator::new("Administrator", "password").into());
    let cluster = timeout(
        RECOVERY,
        Cluster::connect(server.connection_string(), options),
    )
    .await
    .expect("connected in time")
    .expect("connected");
    let collection = cluster.bucket("scaleout").default_collection();
    timeout(RECOVERY, collection.upsert("doc", 1, None))
        .await
        .expect("the first write in time")
        .expect("the first write");
    Client {
        collection,
        _cluster: cluster,
    }
}

impl Client {
    async fn read(&self, key: &str) -> couchbase::error::Result<u64> {
        self.collection.get(key, None).await?.content_as()
    }
}

/// Polls `probe` until it yields, failing the test after [`RECOVERY`].
async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + RECOVERY;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(Instant::now() < deadline, "not within {RECOVERY:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// TMPFAIL and NOT_MY_VBUCKET are retried by the SDK without end, reads and
/// writes alike: a bounded call runs out of time, it never sees an error.
/// Once cleared, the same client works at once; the refused write was never
/// applied, and dropping the call stopped its retries.
async fn retried_until_the_bound(fault: Fault) {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let client = connect(&server).await;
    let (gets, adds) = (server.requests(opcode::GET), server.requests(opcode::ADD));

    server.faults().set(fault);
    assert!(timeout(BOUND, client.read("doc")).await.is_err());
    assert!(
        timeout(BOUND, client.collection.insert("new", 1, None))
            .await
            .is_err()
    );
    assert!(
        server.requests(opcode::GET) - gets >= 3,
        "the read was retried"
    );
    assert!(
        server.requests(opcode::ADD) - adds >= 3,
        "the write was retried"
    );

    server.faults().clear();
    assert_eq!(timeout(BOUND, client.read("doc")).await.unwrap(), Ok(1));
    timeout(BOUND, client.collection.insert("new", 2, None))
        .await
        .unwrap()
        .expect("the refused insert never happened");
}

#[tokio::test]
async fn temporary_failure_is_retried_until_the_bound_and_clears() {
    retried_until_the_bound(Fault::TemporaryFailure).await;
}

#[tokio::test]
async fn not_my_vbucket_is_retried_until_the_bound_and_clears() {
    retried_until_the_bound(Fault::NotMyVbucket).await;
}

/// A frozen server answers nothing, and the SDK has no timeout of its own:
/// it waits, without retrying, and calls run out of time. A write that ran
/// out of time still reached the server, which applies it once thawed: to
/// the caller it may or may not have happened.
#[tokio::test]
async fn a_frozen_server_times_calls_out_and_answers_them_late() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let client = connect(&server).await;
    let (gets, hellos) = (server.requests(opcode::GET), server.requests(opcode::HELLO));

    server.faults().set(Fault::Freeze);
    assert!(timeout(BOUND, client.read("doc")).await.is_err());
    assert_eq!(
        server.requests(opcode::GET) - gets,
        1,
        "sent once, never answered"
    );
    assert!(
        timeout(BOUND, client.collection.upsert("doc", 2, None))
            .await
            .is_err()
    );

    assert_eq!(server.requests(opcode::HELLO), hellos, "no new connection");

    server.faults().clear();
    eventually("the write that timed out is applied", async || {
        (timeout(BOUND, client.read("doc")).await == Ok(Ok(2))).then_some(())
    })
    .await;
}

/// A connection closed with a write in flight fails that write at once
/// with `OtherFailure("request cancelled: Closed in flight …")` — the SDK
/// does not retry a write it cannot know the fate of — and reconnects. A
/// call made while the SDK has not yet noticed the close can be lost with
/// the connection and never answered (couchbase-core 1.1 registers it after
/// the read loop drained its pending requests), so recovery is waited for
/// call by call, each bounded.
async fn dropped_mid_write(applied: bool) {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let client = connect(&server).await;
    let hellos = server.requests(opcode::HELLO);

    server.faults().set(Fault::DropMidWrite { applied });
    let error = timeout(BOUND, client.collection.upsert("doc", 2, None))
        .await
        .expect("an answer, not a hang")
        .expect_err("the write fails");
    assert!(
        matches!(error.kind(), ErrorKind::OtherFailure(message) if message.contains("Closed in flight")),
        "{error}"
    );
    let read = eventually("a read on a new connection", async || {
        timeout(BOUND, client.read("doc")).await.ok()
    })
    .await;
    assert_eq!(
        read,
        Ok(if applied { 2 } else { 1 }),
        "reads work during the fault, and the write is there only if it was applied"
    );
    assert!(
        server.requests(opcode::HELLO) > hellos,
        "the SDK opened a new connection"
    );
    server.faults().clear();
    timeout(BOUND, client.collection.upsert("doc", 3, None))
        .await
        .unwrap()
        .expect("writes work again");
}

#[tokio::test]
async fn a_write_applied_before_the_connection_drops_fails_yet_is_there() {
    dropped_mid_write(true).await;
}

#[tokio::test]
async fn a_write_dropped_with_its_connection_fails_and_is_not_there() {
    dropped_mid_write(false).await;
}

#[tokio::test]
async fn a_value_above_20_mib_is_refused_as_value_too_large() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let client = connect(&server).await;
    let limit = vec![b'x'; MAX_VALUE];
    timeout(
        RECOVERY,
        client.collection.upsert_raw("big", &limit, 0, None),
    )
    .await
    .unwrap()
    .expect("20 MiB is allowed");

    let too_big = vec![b'x'; 21 << 20];
    let error = timeout(
        RECOVERY,
        client.collection.upsert_raw("big", &too_big, 0, None),
    )
    .await
    .unwrap()
    .expect_err("21 MiB is not");
    assert_eq!(error.kind(), &ErrorKind::ValueTooLarge, "{error}");
    assert_eq!(
        timeout(BOUND, client.read("doc")).await.unwrap(),
        Ok(1),
        "the connection stays"
    );
}

/// With no replicas, every durability level is met by the write itself.
#[tokio::test]
async fn durable_writes_are_applied_like_plain_ones() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let client = connect(&server).await;
    for level in [
        DurabilityLevel::MAJORITY,
        DurabilityLevel::MAJORITY_AND_PERSIST_ACTIVE,
        DurabilityLevel::PERSIST_TO_MAJORITY,
    ] {
        let c = &client.collection;
        let key = format!("durable::{level}");
        let durable = async {
            let inserted = c
                .insert(
                    &key,
                    1,
                    InsertOptions::new().durability_level(level.clone()),
                )
                .await?;
            let options = ReplaceOptions::new()
                .cas(inserted.cas())
                .durability_level(level.clone());
            let replaced = c.replace(&key, 2, options).await?;
            assert_eq!(client.read(&key).await, Ok(2));
            let options = RemoveOptions::new()
                .cas(replaced.cas())
                .durability_level(level.clone());
            c.remove(&key, options).await
        };
        timeout(RECOVERY, durable)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{level}: {e}"));
        let gone = client.read(&key).await.unwrap_err();
        assert_eq!(gone.kind(), &ErrorKind::DocumentNotFound);
    }
    assert_eq!(server.durable_requests(), 9, "3 levels × 3 writes");
}
