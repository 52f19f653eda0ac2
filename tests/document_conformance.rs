//! One conformance suite for every read-model store: redb, and Couchbase
//! through the real SDK against this repository's KV protocol test server.

mod support;

use std::sync::Arc;

use scaleout::documents::{DocumentError, DocumentStore};

async fn insert_then_get_and_insert_again_is_refused(store: Arc<dyn DocumentStore>) {
    assert_eq!(store.get("doc::a").await.unwrap(), None);
    let cas = store.insert("doc::a", br#"{"n":1}"#).await.unwrap();
    let read = store.get("doc::a").await.unwrap().expect("inserted");
    assert_eq!(
        (read.body.as_slice(), read.cas),
        (br#"{"n":1}"#.as_slice(), cas)
    );
    let outcome = store.insert("doc::a", br#"{"n":2}"#).await;
    assert!(
        matches!(&outcome, Err(DocumentError::Exists(key)) if key == "doc::a"),
        "{outcome:?}"
    );
    assert_eq!(
        store.get("doc::a").await.unwrap().unwrap().body,
        br#"{"n":1}"#
    );
}

async fn replace_needs_the_cas_that_was_read(store: Arc<dyn DocumentStore>) {
    let first = store.insert("doc::b", br#"{"n":1}"#).await.unwrap();
    let second = store.replace("doc::b", br#"{"n":2}"#, first).await.unwrap();
    assert_ne!(first, second, "every write gets a new CAS");
    let outcome = store.replace("doc::b", br#"{"n":3}"#, first).await;
    assert!(
        matches!(&outcome, Err(DocumentError::CasMismatch(key)) if key == "doc::b"),
        "{outcome:?}"
    );
    assert_eq!(
        store.get("doc::b").await.unwrap().unwrap().body,
        br#"{"n":2}"#
    );
    let outcome = store.replace("doc::missing", b"{}", first).await;
    assert!(
        matches!(&outcome, Err(DocumentError::NotFound(key)) if key == "doc::missing"),
        "{outcome:?}"
    );
}

async fn remove_needs_the_cas_that_was_read(store: Arc<dyn DocumentStore>) {
    let first = store.insert("doc::c", b"{}").await.unwrap();
    let second = store.replace("doc::c", br#"{"x":1}"#, first).await.unwrap();
    let outcome = store.remove("doc::c", first).await;
    assert!(
        matches!(&outcome, Err(DocumentError::CasMismatch(key)) if key == "doc::c"),
        "{outcome:?}"
    );
    store.remove("doc::c", second).await.unwrap();
    assert_eq!(store.get("doc::c").await.unwrap(), None);
    let outcome = store.remove("doc::c", second).await;
    assert!(
        matches!(&outcome, Err(DocumentError::NotFound(key)) if key == "doc::c"),
        "{outcome:?}"
    );
    // The key is free again.
    store.insert("doc::c", b"{}").await.unwrap();
}

/// 8 tasks × 500 read-modify-write increments of one document: CAS loses
/// no update.
async fn concurrent_cas_increments_lose_nothing(store: Arc<dyn DocumentStore>) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let mut conflicts = 0u32;
            for _ in 0..500 {
                loop {
                    let current = store.get("doc::hot").await.unwrap();
                    let n = current
                        .as_ref()
                        .map_or(0, |d| serde_json::from_slice::<u64>(&d.body).unwrap());
                    let body = (n + 1).to_string().into_bytes();
                    let written = match &current {
                        None => store.insert("doc::hot", &body).await.map(drop),
                        Some(d) => store.replace("doc::hot", &body, d.cas).await.map(drop),
                    };
                    match written {
                        Ok(()) => break,
                        Err(DocumentError::Exists(_) | DocumentError::CasMismatch(_)) => {
                            conflicts += 1
                        }
                        Err(other) => panic!("{other}"),
                    }
                }
            }
            conflicts
        });
    }
    let mut conflicts = 0;
    while let Some(task) = tasks.join_next().await {
        conflicts += task.unwrap();
    }
    let total: u64 =
        serde_json::from_slice(&store.get("doc::hot").await.unwrap().unwrap().body).unwrap();
    assert_eq!(total, 4000, "{conflicts} conflicts were retried");
}

macro_rules! conformance {
    ($backend:ident: $($case:ident),+ $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::support::documents::$backend(|store| super::$case(store)).await;
                }
            )+
        }
    };
}

macro_rules! all_cases {
    ($backend:ident) => {
        conformance!($backend:
            insert_then_get_and_insert_again_is_refused,
            replace_needs_the_cas_that_was_read,
            remove_needs_the_cas_that_was_read,
            concurrent_cas_increments_lose_nothing,
        );
    };
}

all_cases!(redb);
all_cases!(couchbase);

/// The Couchbase store when Couchbase Server fails: faults switched on the
/// KV test server while the SDK stays connected.
mod couchbase_faults {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use couchbase_kv_server::{Fault, TestServer};
    use scaleout::config::CouchbaseDurability;
    use scaleout::documents::couchbase::{CouchbaseConfig, CouchbaseDocuments};
    use scaleout::documents::{Document, DocumentError, DocumentStore};

    /// Short, so calls the SDK would retry forever end soon.
    const TIMEOUT: Duration = Duration::from_millis(800);

    async fn store(server: &TestServer) -> CouchbaseDocuments {
        let config = CouchbaseConfig {
            connection_string: server.connection_string(),
            username: "Administrator".into(),
            password: "password".into(),
            bucket: "scaleout".into(),
            scope: "_default".into(),
            collection: "_default".into(),
            timeout: TIMEOUT,
            ca: None,
        };
        CouchbaseDocuments::connect(config)
            .await
            .expect("the SDK connects to the KV test server")
    }

    fn is_unavailable<T: std::fmt::Debug>(outcome: &Result<T, DocumentError>) -> bool {
        matches!(outcome, Err(DocumentError::Unavailable { .. }))
    }

    /// TMPFAIL and NOT_MY_VBUCKET: the SDK retries until our timeout, so
    /// reads and writes are Unavailable; once the fault clears the store
    /// works again, and the refused write never happened.
    async fn unavailable_while(fault: Fault) {
        let server = TestServer::start(Default::default()).await.unwrap();
        let store = store(&server).await;
        let cas = store.insert("doc::a", br#"{"n":1}"#).await.unwrap();

        server.faults().set(fault);
        let read = store.get("doc::a").await;
        assert!(is_unavailable(&read), "{read:?}");
        let write = store.replace("doc::a", br#"{"n":2}"#, cas).await;
        assert!(is_unavailable(&write), "{write:?}");

        server.faults().clear();
        let read = store.get("doc::a").await.unwrap().unwrap();
        assert_eq!(
            (read.body.as_slice(), read.cas),
            (br#"{"n":1}"#.as_slice(), cas)
        );
        store.replace("doc::a", br#"{"n":2}"#, cas).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn couchbase_temporary_failure_is_unavailable_then_works() {
        unavailable_while(Fault::TemporaryFailure).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn couchbase_not_my_vbucket_is_unavailable_then_works() {
        unavailable_while(Fault::NotMyVbucket).await;
    }

    /// A frozen server: Unavailable once the timeout runs out, not later.
    /// The write that timed out reached the server and is applied once it
    /// thaws, so a caller that reads again sees a new CAS and its stale
    /// write is refused: Unavailable on a write is safe with CAS.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn couchbase_frozen_is_unavailable_within_the_timeout() {
        let server = TestServer::start(Default::default()).await.unwrap();
        let store = store(&server).await;
        let cas = store.insert("doc::a", br#"{"n":1}"#).await.unwrap();

        server.faults().set(Fault::Freeze);
        let started = Instant::now();
        let write = store.replace("doc::a", br#"{"n":2}"#, cas).await;
        let took = started.elapsed();
        assert!(is_unavailable(&write), "{write:?}");
        assert!(took < TIMEOUT * 2, "Unavailable after {took:?}");

        server.faults().clear();
        let current = read_again(&store, "doc::a").await;
        assert_ne!(current.cas, cas, "the late write was applied first");
        assert_eq!(current.body, br#"{"n":2}"#);
        let outcome = store.replace("doc::a", br#"{"n":3}"#, cas).await;
        assert!(
            matches!(&outcome, Err(DocumentError::CasMismatch(key)) if key == "doc::a"),
            "{outcome:?}"
        );
    }

    /// Reads until the store answers: Unavailable is for trying again.
    async fn read_again(store: &CouchbaseDocuments, key: &str) -> Document {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match store.get(key).await {
                Ok(Some(document)) => return document,
                Err(DocumentError::Unavailable { .. }) if Instant::now() < deadline => {}
                other => panic!("reading {key} again: {other:?}"),
            }
        }
    }

    /// A connection closed with the write in flight: Unavailable at once
    /// (not after the timeout), whether or not the write happened; reading
    /// again tells which. (That read may itself be Unavailable once: the SDK
    /// can lose a call sent while it has not yet noticed the close.)
    async fn dropped_mid_write(applied: bool) {
        let server = TestServer::start(Default::default()).await.unwrap();
        let store = store(&server).await;
        let cas = store.insert("doc::a", br#"{"n":1}"#).await.unwrap();

        server.faults().set(Fault::DropMidWrite { applied });
        let started = Instant::now();
        let write = store.replace("doc::a", br#"{"n":2}"#, cas).await;
        assert!(is_unavailable(&write), "{write:?}");
        assert!(started.elapsed() < TIMEOUT, "failed at once");

        server.faults().clear();
        let read = read_again(&store, "doc::a").await;
        let expected: &[u8] = if applied {
            br#"{"n":2}"#
        } else {
            br#"{"n":1}"#
        };
        assert_eq!(read.body, expected);
        assert_eq!(read.cas == cas, !applied);
        store
            .replace("doc::a", br#"{"n":3}"#, read.cas)
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn couchbase_write_applied_then_dropped_is_unavailable_and_there() {
        dropped_mid_write(true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn couchbase_write_dropped_unapplied_is_unavailable_and_not_there() {
        dropped_mid_write(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn couchbase_value_too_large_is_rejected_not_unavailable() {
        let server = TestServer::start(Default::default()).await.unwrap();
        let store = store(&server).await;
        let too_large = format!("\"{}\"", "x".repeat(21 << 20));
        match store.insert("doc::big", too_large.as_bytes()).await {
            Err(DocumentError::Rejected {
                context: message, ..
            }) => {
                assert!(message.contains("20 MiB"), "{message}")
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert!(store.get("doc::big").await.unwrap().is_none());
    }

    /// Durable writes go through the test server (one node, no replicas:
    /// every level is met at once) with the same CAS semantics, and only
    /// when asked for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn couchbase_durable_writes_keep_cas_semantics() {
        for durability in [
            CouchbaseDurability::None,
            CouchbaseDurability::Majority,
            CouchbaseDurability::PersistToMajority,
        ] {
            let server = TestServer::start(Default::default()).await.unwrap();
            let store = Arc::new(store(&server).await.with_durability(durability));
            super::replace_needs_the_cas_that_was_read(store.clone()).await;
            super::remove_needs_the_cas_that_was_read(store).await;
            let durable = server.durable_requests();
            assert_eq!(
                durable > 0,
                durability != CouchbaseDurability::None,
                "{durability:?}: {durable}"
            );
        }
    }
}
