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
    assert_eq!(
        store.insert("doc::a", br#"{"n":2}"#).await,
        Err(DocumentError::Exists("doc::a".into()))
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
    assert_eq!(
        store.replace("doc::b", br#"{"n":3}"#, first).await,
        Err(DocumentError::CasMismatch("doc::b".into()))
    );
    assert_eq!(
        store.get("doc::b").await.unwrap().unwrap().body,
        br#"{"n":2}"#
    );
    assert_eq!(
        store.replace("doc::missing", b"{}", first).await,
        Err(DocumentError::NotFound("doc::missing".into()))
    );
}

async fn remove_needs_the_cas_that_was_read(store: Arc<dyn DocumentStore>) {
    let first = store.insert("doc::c", b"{}").await.unwrap();
    let second = store.replace("doc::c", br#"{"x":1}"#, first).await.unwrap();
    assert_eq!(
        store.remove("doc::c", first).await,
        Err(DocumentError::CasMismatch("doc::c".into()))
    );
    store.remove("doc::c", second).await.unwrap();
    assert_eq!(store.get("doc::c").await.unwrap(), None);
    assert_eq!(
        store.remove("doc::c", second).await,
        Err(DocumentError::NotFound("doc::c".into()))
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
