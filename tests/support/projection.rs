//! Read models as they should be: the fold of the event log, computed here
//! straight from the stored streams, to compare projectors against.

use std::collections::{BTreeMap, HashMap};

use scaleout::bus::BusMessage;
use scaleout::documents::DocumentStore;
use scaleout::projection::ProjectedEvent;
use scaleout::store::{EventStore, RecordedEvent};

/// Every event of `streams`, in stream order.
pub async fn read_log(store: &dyn EventStore, streams: &[String]) -> Vec<RecordedEvent> {
    let mut log = Vec::new();
    for stream in streams {
        log.extend(store.read_stream(stream, 1, usize::MAX).await.unwrap());
    }
    log
}

/// Document key → the JSON each projection's fold of `log` gives.
pub fn fold_log(log: &[RecordedEvent]) -> BTreeMap<String, serde_json::Value> {
    let projections = reference::views::all();
    let events: Vec<ProjectedEvent> = log
        .iter()
        .map(|e| {
            let known = scaleout::app::Application::known_types(&reference::Reference);
            ProjectedEvent::decode(&BusMessage::from_event(e), &known).unwrap()
        })
        .collect();
    let mut bodies: HashMap<String, Vec<u8>> = HashMap::new();
    for event in &events {
        for projection in &projections {
            for route in projection.routes(event).unwrap() {
                let body = bodies.get(&route.key).map(Vec::as_slice);
                let folded = projection
                    .fold(&route.key, body, &[(event, route.order)])
                    .unwrap();
                if let Some(body) = folded.body {
                    bodies.insert(route.key, body);
                }
            }
        }
    }
    bodies
        .into_iter()
        .map(|(key, body)| (key, serde_json::from_slice(&body).unwrap()))
        .collect()
}

/// The documents at the keys of `expected`, as JSON (`null` when missing).
pub async fn read_documents(
    documents: &dyn DocumentStore,
    expected: &BTreeMap<String, serde_json::Value>,
) -> BTreeMap<String, serde_json::Value> {
    let mut actual = BTreeMap::new();
    for key in expected.keys() {
        let body = documents.get(key).await.unwrap();
        let value = body.map_or(serde_json::Value::Null, |d| {
            serde_json::from_slice(&d.body).unwrap()
        });
        actual.insert(key.clone(), value);
    }
    actual
}

/// Waits (up to `patience`) until the documents equal the fold of the log.
pub async fn wait_for_fold(
    documents: &dyn DocumentStore,
    expected: &BTreeMap<String, serde_json::Value>,
    patience: std::time::Duration,
) {
    let started = std::time::Instant::now();
    loop {
        let actual = read_documents(documents, expected).await;
        if &actual == expected {
            return;
        }
        if started.elapsed() > patience {
            let differing: Vec<_> = expected
                .iter()
                .filter(|(k, v)| actual.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k}: expected {v}, got {}", actual[k]))
                .take(5)
                .collect();
            panic!(
                "read models are not the fold of the log after {patience:?}:\n{}",
                differing.join("\n")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}
