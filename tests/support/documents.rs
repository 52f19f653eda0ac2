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
