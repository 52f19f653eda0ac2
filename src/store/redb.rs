//! The embedded event store: one redb file, durable on every commit.
//!
//! redb allows one write transaction at a time, so a single writer thread owns
//! writing and commits whatever appends queued during the previous fsync in
//! one transaction (see `group_commit`). Positions come from a counter that
//! only that writer advances, so they are dense and in commit order; reads run
//! in parallel on snapshots. The log is keyed by position, so reading it all
//! is one sequential scan, and a stream is an index of positions.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use prost::Message;
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
};
use tokio::sync::Notify;
use uuid::Uuid;

use super::plan::{BatchState, Planned, plan};
use super::{
    AppendOutcome, AppendRequest, AppendResult, EventStore, Fingerprint, LogFilter, LogPage,
    RecordedEvent, RecordedRequest, RequestId, Snapshot, StoreError, page_window,
};
use super::{Batches, Pending, Submitter, answer, answer_all, appends, submit, writes};
use crate::group_commit;
use crate::pb;

/// Stream id → current version.
const STREAMS: TableDefinition<&str, u64> = TableDefinition::new("streams");
/// Position → encoded [`pb::EventEnvelope`]: the log.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// (stream id, version) → position.
const STREAM_INDEX: TableDefinition<(&str, u64), u64> = TableDefinition::new("stream_index");
/// Positions of the events not yet published.
const UNPUBLISHED: TableDefinition<u64, ()> = TableDefinition::new("unpublished");
/// Request id → (stream id, version, event ids as 16-byte UUIDs).
const REQUESTS: TableDefinition<u128, (&str, u64, &[u8])> = TableDefinition::new("requests");
/// Request id → the fingerprint of its request; missing for requests
/// recorded before fingerprints were kept.
const FINGERPRINTS: TableDefinition<u128, [u8; 32]> = TableDefinition::new("request_fingerprints");
/// Stream id → its latest snapshot (version, shape, state).
const SNAPSHOTS: TableDefinition<&str, (u64, u32, &[u8])> = TableDefinition::new("snapshots");
/// Counters; holds the next event position.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_POSITION: &str = "next_position";

/// Whether appends also queue their events for an outbox relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Outbox {
    /// Every event waits in the outbox until a relay has published it.
    #[default]
    Kept,
    /// Nothing reads an outbox (consumers follow the log itself), so none
    /// is written: it would only grow.
    Off,
}

/// The redb-backed [`EventStore`].
#[derive(Debug)]
pub struct RedbStore {
    // Field order matters: the submitter drops first, which ends the writer
    // loop, and then the writer thread is joined, so a store that has been
    // dropped has released its file.
    submitter: Submitter,
    writer: Writer,
    db: Arc<Database>,
    appended: Arc<Notify>,
}

#[derive(Debug)]
struct Writer(Option<JoinHandle<()>>);

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            let _ = thread.join();
        }
    }
}

impl RedbStore {
    /// Opens the store at `path` with an outbox, creating the file and its
    /// folder if missing.
    ///
    /// Blocking (opening may repair a file after a crash): call it from
    /// `spawn_blocking` in async code.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, Outbox::Kept)
    }

    /// [`RedbStore::open`], choosing whether an outbox is kept.
    pub fn open_with(path: impl AsRef<Path>, outbox: Outbox) -> Result<Self, StoreError> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::backend(format!("creating {}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(backend)?;
        create_tables(&db).map_err(backend)?;
        legacy::migrate(&db).map_err(backend)?;
        let db = Arc::new(db);
        let (submitter, mut partitions) = group_commit::queue(1);
        let batches = partitions.pop().expect("one partition");
        let writer_db = Arc::clone(&db);
        let appended = Arc::new(Notify::new());
        let notify = Arc::clone(&appended);
        let thread = std::thread::Builder::new()
            .name("redb-event-writer".into())
            .spawn(move || write_loop(&writer_db, batches, &notify, outbox))
            .map_err(|e| StoreError::backend(format!("starting the writer thread: {e}")))?;
        Ok(Self {
            submitter,
            writer: Writer(Some(thread)),
            db,
            appended,
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::backend(format!("read task failed: {e}")))?
    }
}

#[async_trait]
impl EventStore for RedbStore {
    async fn append_chain(
        &self,
        chain: Vec<AppendRequest>,
    ) -> Vec<Result<AppendOutcome, StoreError>> {
        submit(&self.submitter, chain).await
    }

    async fn read_stream(
        &self,
        stream_id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let stream_id = stream_id.to_owned();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let index = txn.open_table(STREAM_INDEX).map_err(backend)?;
            let log = txn.open_table(LOG).map_err(backend)?;
            index
                .range((stream_id.as_str(), from_version)..=(stream_id.as_str(), u64::MAX))
                .map_err(backend)?
                .take(limit)
                .map(|entry| {
                    let (_, position) = entry.map_err(backend)?;
                    event_at(&log, position.value())
                })
                .collect()
        })
        .await
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<LogPage, StoreError> {
        let filter = filter.clone();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let head = head(&txn)?;
            let (from, window) = page_window(from_position, limit, &filter, head);
            let mut page = LogPage {
                events: Vec::new(),
                next_position: from,
                head,
            };
            let Some(window) = window else {
                return Ok(page);
            };
            let log = txn.open_table(LOG).map_err(backend)?;
            page.next_position = window.end() + 1;
            for entry in log.range(window).map_err(backend)? {
                let (position, bytes) = entry.map_err(backend)?;
                let event = decode_event(position.value(), bytes.value())?;
                if filter.accepts(&event.stream_type, &event.event_type) {
                    page.events.push(event);
                    if page.events.len() == limit {
                        page.next_position = position.value() + 1;
                        break;
                    }
                }
            }
            Ok(page)
        })
        .await
    }

    async fn find_request(
        &self,
        request_id: RequestId,
    ) -> Result<Option<RecordedRequest>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let requests = txn.open_table(REQUESTS).map_err(backend)?;
            let fingerprints = txn.open_table(FINGERPRINTS).map_err(backend)?;
            recorded_request(&requests, &fingerprints, request_id).map_err(backend)
        })
        .await
    }

    async fn read_outbox(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let unpublished = txn.open_table(UNPUBLISHED).map_err(backend)?;
            let log = txn.open_table(LOG).map_err(backend)?;
            let Some(first) = after.checked_add(1) else {
                return Ok(Vec::new());
            };
            unpublished
                .range(first..)
                .map_err(backend)?
                .take(limit)
                .map(|entry| {
                    let (position, _) = entry.map_err(backend)?;
                    event_at(&log, position.value())
                })
                .collect()
        })
        .await
    }

    async fn lease_outbox(&self) -> Result<bool, StoreError> {
        // The file is locked to this process: its relay is the only one.
        Ok(true)
    }

    async fn delete_outbox(&self, positions: &[u64]) -> Result<(), StoreError> {
        let positions = positions.to_vec();
        self.read(move |db| {
            let mut txn = db.begin_write().map_err(backend)?;
            // A delete lost in a crash only publishes a row again, which
            // consumers skip; it need not cost an fsync of its own (the next
            // append's durable commit persists it).
            txn.set_durability(Durability::None)
                .map_err(|e| StoreError::backend(e.to_string()))?;
            {
                let mut unpublished = txn.open_table(UNPUBLISHED).map_err(backend)?;
                for position in positions {
                    unpublished.remove(position).map_err(backend)?;
                }
            }
            txn.commit().map_err(backend)
        })
        .await
    }

    fn appended(&self) -> &Notify {
        &self.appended
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.writer.0.as_ref().is_some_and(|t| !t.is_finished()) {
            Ok(())
        } else {
            Err(StoreError::unavailable(
                "the redb writer thread has stopped",
            ))
        }
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        // A write transaction of its own: it waits its turn beside the
        // appends' group commits, on a blocking thread.
        self.read(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut snapshots = txn.open_table(SNAPSHOTS).map_err(backend)?;
                let kept = snapshots
                    .get(snapshot.stream_id.as_str())
                    .map_err(backend)?
                    .map(|kept| kept.value().0);
                if kept.is_none_or(|kept| kept < snapshot.version) {
                    let value = (snapshot.version, snapshot.shape, snapshot.state.as_slice());
                    snapshots
                        .insert(snapshot.stream_id.as_str(), value)
                        .map_err(backend)?;
                }
            }
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn load_snapshot(&self, stream_id: &str) -> Result<Option<Snapshot>, StoreError> {
        let stream_id = stream_id.to_owned();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let snapshots = txn.open_table(SNAPSHOTS).map_err(backend)?;
            let found = snapshots.get(stream_id.as_str()).map_err(backend)?;
            Ok(found.map(|kept| {
                let (version, shape, state) = kept.value();
                Snapshot {
                    stream_id: stream_id.clone(),
                    version,
                    shape,
                    state: state.to_vec(),
                }
            }))
        })
        .await
    }
}

fn create_tables(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    txn.open_table(STREAMS)?;
    txn.open_table(LOG)?;
    txn.open_table(STREAM_INDEX)?;
    txn.open_table(UNPUBLISHED)?;
    txn.open_table(REQUESTS)?;
    txn.open_table(FINGERPRINTS)?;
    txn.open_table(SNAPSHOTS)?;
    txn.open_table(META)?;
    txn.commit()?;
    Ok(())
}

fn write_loop(db: &Database, mut batches: Batches, appended: &Notify, outbox: Outbox) {
    while let Some(batch) = batches.next_blocking() {
        match commit(db, &batch, outbox) {
            Ok(planned) => {
                if planned.iter().any(|p| matches!(p, Planned::Write { .. })) {
                    appended.notify_waiters();
                }
                answer(batch, planned);
            }
            Err(error) => {
                tracing::error!(%error, appends = batch.len(), "redb commit failed");
                answer_all(
                    batch,
                    &StoreError::backend(format!("commit failed: {error}")),
                );
            }
        }
    }
}

/// Plans and writes one batch in one durable transaction.
fn commit(db: &Database, batch: &[Pending], outbox: Outbox) -> Result<Vec<Planned>, redb::Error> {
    let txn = db.begin_write()?;
    let planned = {
        let mut streams = txn.open_table(STREAMS)?;
        let mut log = txn.open_table(LOG)?;
        let mut index = txn.open_table(STREAM_INDEX)?;
        let mut unpublished = txn.open_table(UNPUBLISHED)?;
        let mut requests = txn.open_table(REQUESTS)?;
        let mut fingerprints = txn.open_table(FINGERPRINTS)?;
        let mut meta = txn.open_table(META)?;

        let mut state = BatchState::default();
        for request in appends(batch) {
            if !state.versions.contains_key(&request.stream_id)
                && let Some(version) = streams.get(request.stream_id.as_str())?
            {
                state
                    .versions
                    .insert(request.stream_id.clone(), version.value());
            }
            if let Some(key) = request.request_key
                && let Some(found) = recorded_request(&requests, &fingerprints, key.id)?
            {
                state.requests.insert(key.id, found);
            }
        }
        let planned = plan(batch.iter().map(|p| p.write.as_slice()), state);

        let mut position = meta.get(NEXT_POSITION)?.map_or(1, |v| v.value());
        for (request, first_version, result) in writes(batch, &planned) {
            let stream = request.stream_id.as_str();
            for (version, event) in (first_version..).zip(request.events.as_slice()) {
                let envelope = RecordedEvent {
                    position,
                    stream_id: request.stream_id.clone(),
                    stream_type: request.stream_type.clone(),
                    version,
                    event_id: event.event_id,
                    event_type: event.event_type.clone(),
                    payload: event.payload.clone(),
                    metadata: request.metadata.clone(),
                    request_id: request.request_key.map(|key| key.id),
                }
                .to_envelope()
                .encode_to_vec();
                log.insert(position, envelope.as_slice())?;
                index.insert((stream, version), position)?;
                if outbox == Outbox::Kept {
                    unpublished.insert(position, ())?;
                }
                position += 1;
            }
            streams.insert(stream, result.version)?;
            if let Some(key) = request.request_key {
                let ids: Vec<u8> = result
                    .event_ids
                    .iter()
                    .flat_map(|id| *id.as_bytes())
                    .collect();
                let id = key.id.0.as_u128();
                requests.insert(id, (stream, result.version, ids.as_slice()))?;
                fingerprints.insert(id, key.fingerprint.0)?;
            }
        }
        meta.insert(NEXT_POSITION, position)?;
        planned
    };
    txn.commit()?;
    Ok(planned)
}

/// The last committed position, as of `txn`'s snapshot.
fn head(txn: &ReadTransaction) -> Result<u64, StoreError> {
    let meta = txn.open_table(META).map_err(backend)?;
    let next = meta.get(NEXT_POSITION).map_err(backend)?;
    Ok(next.map_or(1, |v| v.value()) - 1)
}

/// The event at a position the index or outbox names.
fn event_at(
    log: &impl ReadableTable<u64, &'static [u8]>,
    position: u64,
) -> Result<RecordedEvent, StoreError> {
    let bytes = log
        .get(position)
        .map_err(backend)?
        .ok_or_else(|| StoreError::backend(format!("no event at indexed position {position}")))?;
    decode_event(position, bytes.value())
}

fn decode_event(position: u64, bytes: &[u8]) -> Result<RecordedEvent, StoreError> {
    let envelope = pb::EventEnvelope::decode(bytes)
        .map_err(|e| StoreError::backend(format!("corrupt event at position {position}: {e}")))?;
    RecordedEvent::from_envelope(position, envelope)
        .map_err(|e| StoreError::backend(format!("corrupt event at position {position}: {e}")))
}

fn recorded_request(
    requests: &impl ReadableTable<u128, (&'static str, u64, &'static [u8])>,
    fingerprints: &impl ReadableTable<u128, [u8; 32]>,
    id: RequestId,
) -> Result<Option<RecordedRequest>, redb::StorageError> {
    let id = id.0.as_u128();
    let Some(found) = requests.get(id)? else {
        return Ok(None);
    };
    let (stream_id, version, ids) = found.value();
    Ok(Some(RecordedRequest {
        result: AppendResult {
            stream_id: stream_id.to_owned(),
            version,
            event_ids: ids
                .chunks_exact(16)
                .map(|chunk| Uuid::from_slice(chunk).expect("chunks_exact yields 16 bytes"))
                .collect(),
        },
        fingerprint: fingerprints.get(id)?.map(|f| Fingerprint(f.value())),
    }))
}

fn backend(error: impl Into<redb::Error>) -> StoreError {
    let error = error.into();
    StoreError::backend(error.to_string()).caused_by(error)
}

/// Files written before the log was keyed by position: their events and
/// outbox move to the current tables once, when such a file is opened.
mod legacy {
    use redb::{Database, ReadableTable, TableDefinition, TableHandle};

    use super::{LOG, STREAM_INDEX, UNPUBLISHED};

    /// (stream id, version) → (position, envelope).
    const EVENTS: TableDefinition<(&str, u64), (u64, &[u8])> = TableDefinition::new("events");
    /// Position → (stream id, version).
    const OUTBOX: TableDefinition<u64, (&str, u64)> = TableDefinition::new("outbox");

    pub(super) fn migrate(db: &Database) -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        if !txn
            .list_tables()?
            .any(|table| table.name() == EVENTS.name())
        {
            txn.abort()?;
            return Ok(());
        }
        {
            let events = txn.open_table(EVENTS)?;
            let mut log = txn.open_table(LOG)?;
            let mut index = txn.open_table(STREAM_INDEX)?;
            for entry in events.iter()? {
                let (key, value) = entry?;
                let (stream, version) = key.value();
                let (position, envelope) = value.value();
                log.insert(position, envelope)?;
                index.insert((stream, version), position)?;
            }
            let outbox = txn.open_table(OUTBOX)?;
            let mut unpublished = txn.open_table(UNPUBLISHED)?;
            for entry in outbox.iter()? {
                unpublished.insert(entry?.0.value(), ())?;
            }
        }
        txn.delete_table(EVENTS)?;
        txn.delete_table(OUTBOX)?;
        tracing::info!("moved the event store to the position-keyed layout");
        txn.commit()?;
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::store::{EventStore, LogFilter};

        #[tokio::test]
        async fn a_file_of_the_first_layout_opens_with_its_events_and_outbox() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("events.redb");
            let envelope = |stream: &str, version: u64| {
                let event = crate::store::RecordedEvent {
                    position: 0,
                    stream_id: stream.into(),
                    stream_type: "test".into(),
                    version,
                    event_id: uuid::Uuid::now_v7(),
                    event_type: "test.Happened".into(),
                    payload: vec![version as u8],
                    metadata: crate::store::EventMetadata {
                        occurred_at: std::time::SystemTime::UNIX_EPOCH,
                        correlation_id: uuid::Uuid::nil(),
                        causation_id: uuid::Uuid::nil(),
                        actor: None,
                        trace: None,
                    },
                    request_id: None,
                };
                prost::Message::encode_to_vec(&event.to_envelope())
            };
            {
                let db = Database::create(&path).unwrap();
                let txn = db.begin_write().unwrap();
                {
                    let mut events = txn.open_table(EVENTS).unwrap();
                    events
                        .insert(("a", 1), (1, envelope("a", 1).as_slice()))
                        .unwrap();
                    events
                        .insert(("b", 1), (2, envelope("b", 1).as_slice()))
                        .unwrap();
                    events
                        .insert(("a", 2), (3, envelope("a", 2).as_slice()))
                        .unwrap();
                    let mut outbox = txn.open_table(OUTBOX).unwrap();
                    outbox.insert(3, ("a", 2)).unwrap();
                    let mut meta = txn.open_table(super::super::META).unwrap();
                    meta.insert(super::super::NEXT_POSITION, 4).unwrap();
                }
                txn.commit().unwrap();
            }

            let store = super::super::RedbStore::open(&path).unwrap();
            let stream = store.read_stream("a", 0, usize::MAX).await.unwrap();
            let at: Vec<_> = stream.iter().map(|e| (e.version, e.position)).collect();
            assert_eq!(at, [(1, 1), (2, 3)]);
            let log = store.read_all(0, 10, &LogFilter::all()).await.unwrap();
            let positions: Vec<_> = log.events.iter().map(|e| e.position).collect();
            assert_eq!((positions, log.head), (vec![1, 2, 3], 3));
            let outbox: Vec<_> = store.read_outbox(0, 10).await.unwrap();
            assert_eq!(outbox.iter().map(|e| e.position).collect::<Vec<_>>(), [3]);
        }
    }
}
