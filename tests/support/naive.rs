//! A deliberately wrong projector, to show that a harness can tell: it adds
//! counter increments with a GET then a SET, without CAS or version checks,
//! so it loses updates when writers race and counts a redelivery twice.
//! It lives here, in the tests, and nowhere in what ships.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use reference::pb;
use scaleout::bus::{EventBus, Subscription};
use scaleout::documents::{DocumentError, DocumentStore};
use tokio::task::JoinSet;

/// Naive workers competing on one subscription.
pub struct NaiveWorkers {
    /// Deliveries each worker has settled, summed.
    pub settled: Arc<AtomicU64>,
    _workers: JoinSet<()>,
}

impl NaiveWorkers {
    pub async fn start(
        bus: &Arc<dyn EventBus>,
        subscription: &Subscription,
        documents: Arc<dyn DocumentStore>,
        workers: usize,
    ) -> Self {
        let settled = Arc::new(AtomicU64::new(0));
        let mut running = JoinSet::new();
        for _ in 0..workers {
            let mut subscriber = bus.subscribe(subscription).await.unwrap();
            let (documents, settled) = (Arc::clone(&documents), Arc::clone(&settled));
            running.spawn(async move {
                while let Some(delivery) = subscriber.next().await {
                    let envelope = pb::EventEnvelope::decode(&*delivery.message.body).unwrap();
                    let incremented = pb::CounterIncremented::decode(&*envelope.payload).unwrap();
                    get_then_set(documents.as_ref(), &incremented).await;
                    delivery.ack().await.unwrap();
                    settled.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        Self {
            settled,
            _workers: running,
        }
    }
}

async fn get_then_set(documents: &dyn DocumentStore, incremented: &pb::CounterIncremented) {
    let key = format!("counter::{}", incremented.counter_id);
    let current = documents.get(&key).await.unwrap();
    let count = current.as_ref().map_or(0, |document| {
        serde_json::from_slice::<serde_json::Value>(&document.body).unwrap()["count"]
            .as_u64()
            .unwrap()
    });
    let body = serde_json::to_vec(&serde_json::json!({
        "counter_id": incremented.counter_id,
        "count": count + incremented.amount,
    }))
    .unwrap();
    let mut cas = current.map(|document| document.cas);
    loop {
        // The port has no blind write: a SET is a write with the latest CAS.
        let written = match cas {
            None => documents.insert(&key, &body).await.map(drop),
            Some(cas) => documents.replace(&key, &body, cas).await.map(drop),
        };
        match written {
            Err(DocumentError::Exists(_) | DocumentError::CasMismatch(_)) => {
                cas = documents.get(&key).await.unwrap().map(|d| d.cas);
            }
            other => return other.unwrap(),
        }
    }
}
