//! Read-model stores for the conformance suite, each fresh.

use std::future::Future;
use std::sync::Arc;

use scaleout::documents::DocumentStore;
use scaleout::documents::redb::RedbDocuments;

pub async fn redb<F, Fut>(case: F)
where
    F: FnOnce(Arc<dyn DocumentStore>) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let store = RedbDocuments::open(dir.path().join("views.redb")).unwrap();
    case(Arc::new(store)).await;
}

/// Couchbase through the real SDK, against this repository's KV test server.
pub async fn couchbase<F, Fut>(case: F)
where
    F: FnOnce(Arc<dyn DocumentStore>) -> Fut,
    Fut: Future<Output = ()>,
{
    let server = couchbase_kv_server::TestServer::start(Default::default())
        .await
        .unwrap();
    let store = couchbase_store(&server).await;
    case(Arc::new(store)).await;
}

pub async fn couchbase_store(
    server: &couchbase_kv_server::TestServer,
) -> scaleout::documents::couchbase::CouchbaseDocuments {
    let config = scaleout::documents::couchbase::CouchbaseConfig {
        connection_string: server.connection_string(),
        username: "Administrator".into(),
        password: "password".into(),
        bucket: "scaleout".into(),
        scope: "_default".into(),
        collection: "_default".into(),
        timeout: std::time::Duration::from_secs(5),
        ca: None,
    };
    scaleout::documents::couchbase::CouchbaseDocuments::connect(config)
        .await
        .expect("the SDK connects to the KV test server")
}

/// A real store behind a switch: while an outage is on, every call fails as
/// a store that does not answer would (`Unavailable`), and is counted.
#[derive(Debug)]
pub struct Outage {
    inner: Arc<dyn DocumentStore>,
    down: std::sync::atomic::AtomicBool,
    refused: std::sync::atomic::AtomicU64,
}

impl Outage {
    pub fn new(inner: Arc<dyn DocumentStore>) -> Self {
        Self {
            inner,
            down: Default::default(),
            refused: Default::default(),
        }
    }

    pub fn begin(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn end(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Calls refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn check(&self) -> Result<(), scaleout::documents::DocumentError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(scaleout::documents::DocumentError::unavailable(
                "outage (test)",
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl DocumentStore for Outage {
    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<scaleout::documents::Document>, scaleout::documents::DocumentError> {
        self.check()?;
        self.inner.get(key).await
    }

    async fn insert(
        &self,
        key: &str,
        body: &[u8],
    ) -> Result<scaleout::documents::Cas, scaleout::documents::DocumentError> {
        self.check()?;
        self.inner.insert(key, body).await
    }

    async fn replace(
        &self,
        key: &str,
        body: &[u8],
        cas: scaleout::documents::Cas,
    ) -> Result<scaleout::documents::Cas, scaleout::documents::DocumentError> {
        self.check()?;
        self.inner.replace(key, body, cas).await
    }

    async fn remove(
        &self,
        key: &str,
        cas: scaleout::documents::Cas,
    ) -> Result<(), scaleout::documents::DocumentError> {
        self.check()?;
        self.inner.remove(key, cas).await
    }

    async fn ping(&self) -> Result<(), scaleout::documents::DocumentError> {
        self.check()?;
        self.inner.ping().await
    }
}
