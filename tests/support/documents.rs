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
    };
    scaleout::documents::couchbase::CouchbaseDocuments::connect(config)
        .await
        .expect("the SDK connects to the KV test server")
}
