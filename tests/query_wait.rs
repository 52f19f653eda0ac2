//! A read that waits for a version the view has not reached costs a bounded
//! number of document reads: the pauses between them back off.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use scaleout::documents::redb::RedbDocuments;
use scaleout::documents::{Cas, Document, DocumentError, DocumentStore};
use scaleout::query::{Queries, QueryError};

/// A real store that counts the reads made of it, each taking at least
/// `latency` (as a read over the network does).
#[derive(Debug)]
struct Counted {
    inner: RedbDocuments,
    reads: AtomicU64,
    latency: Duration,
}

#[async_trait::async_trait]
impl DocumentStore for Counted {
    async fn get(&self, key: &str) -> Result<Option<Document>, DocumentError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.latency).await;
        self.inner.get(key).await
    }
    async fn insert(&self, key: &str, body: &[u8]) -> Result<Cas, DocumentError> {
        self.inner.insert(key, body).await
    }
    async fn replace(&self, key: &str, body: &[u8], cas: Cas) -> Result<Cas, DocumentError> {
        self.inner.replace(key, body, cas).await
    }
    async fn remove(&self, key: &str, cas: Cas) -> Result<(), DocumentError> {
        self.inner.remove(key, cas).await
    }
    async fn ping(&self) -> Result<(), DocumentError> {
        self.inner.ping().await
    }
}

#[tokio::test]
async fn waiting_for_a_version_backs_off_and_still_answers_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Counted {
        inner: RedbDocuments::open(dir.path().join("views.redb")).unwrap(),
        reads: AtomicU64::new(0),
        latency: Duration::ZERO,
    });
    let body = br#"{"counter_id":"c","count":1,"version":1,"_applied":{"counter-c":1}}"#;
    store.insert("counter::c", body).await.unwrap();
    let queries = reference::queries::ReferenceQueries(Queries::new(store.clone()));
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(1);
    let answer = queries.counter("c", 2, deadline).await;
    assert!(
        matches!(
            answer,
            Err(QueryError::NotCaughtUp {
                wanted: 2,
                current: 1,
                ..
            })
        ),
        "{answer:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1),
        "gave up early: {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(1500),
        "overslept: {waited:?}"
    );
    // Pauses of a power of two milliseconds, at most a quarter of the wait
    // so far: about 4 reads per doubling of the wait, some 35 in the first
    // second (8 a second after it); a 1 ms poll would read about 1,000 times.
    let reads = store.reads.load(Ordering::SeqCst);
    assert!(reads <= 40, "{reads} reads in one second of waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_waiting_on_one_document_share_its_reads() {
    const WAITERS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Counted {
        inner: RedbDocuments::open(dir.path().join("views.redb")).unwrap(),
        reads: AtomicU64::new(0),
        // Reads that overlap, as a remote store's do: one under way is
        // shared by whoever asks meanwhile. (The waiters' polls fall on a
        // shared grid, so they ask together however far apart they start.)
        latency: Duration::from_millis(20),
    });
    let body = br#"{"counter_id":"c","count":1,"version":1,"_applied":{"counter-c":1}}"#;
    store.insert("counter::c", body).await.unwrap();
    let queries = reference::queries::ReferenceQueries(Queries::new(store.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let waiting: Vec<_> = (0..WAITERS)
        .map(|_| {
            let queries = queries.clone();
            tokio::spawn(async move { queries.counter("c", 2, deadline).await })
        })
        .collect();
    for waiter in waiting {
        let answer = waiter.await.unwrap();
        assert!(
            matches!(answer, Err(QueryError::NotCaughtUp { current: 1, .. })),
            "{answer:?}"
        );
    }
    // One waiter alone reads about 35 times in its first second (see
    // above); 20 reading on their own would read about 700 times.
    let reads = store.reads.load(Ordering::SeqCst);
    assert!(reads <= 3 * 20, "{reads} reads for {WAITERS} waiters");
}
