//! The embedded event store: one redb file, durable on every commit.
//!
//! redb allows one write transaction at a time, so a single writer thread owns
//! writing and commits whatever appends queued during the previous fsync in
//! one transaction (see `group_commit`). Reads run in parallel on snapshots.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use prost::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::Notify;
use uuid::Uuid;

use super::group_commit::{self, Batches, Pending, Submitter};
use super::plan::{BatchState, Planned, plan};
use super::{
    AppendOutcome, AppendRequest, AppendResult, EventStore, RecordedEvent, RequestId, StoreError,
};
use crate::pb;

/// Stream id → current version.
const STREAMS: TableDefinition<&str, u64> = TableDefinition::new("streams");
/// (stream id, version) → (position, encoded [`pb::EventEnvelope`]).
const EVENTS: TableDefinition<(&str, u64), (u64, &[u8])> = TableDefinition::new("events");
/// Position → (stream id, version) of each event not yet published.
const OUTBOX: TableDefinition<u64, (&str, u64)> = TableDefinition::new("outbox");
/// Request id → (stream id, version, event ids as 16-byte UUIDs).
const REQUESTS: TableDefinition<u128, (&str, u64, &[u8])> = TableDefinition::new("requests");
/// Counters; holds the next event position.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_POSITION: &str = "next_position";

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
    /// Opens the store at `path`, creating the file and its folder if missing.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Backend(format!("creating {}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(backend)?;
        create_tables(&db).map_err(backend)?;
        let db = Arc::new(db);
        let (submitter, mut partitions) = group_commit::queue(1);
        let batches = partitions.pop().expect("one partition");
        let writer_db = Arc::clone(&db);
        let appended = Arc::new(Notify::new());
        let notify = Arc::clone(&appended);
        let thread = std::thread::Builder::new()
            .name("redb-event-writer".into())
            .spawn(move || write_loop(&writer_db, batches, &notify))
            .map_err(|e| StoreError::Backend(format!("starting the writer thread: {e}")))?;
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
            .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
    }
}

#[async_trait]
impl EventStore for RedbStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        self.submitter.submit(request).await
    }

    async fn read_stream(
        &self,
        stream_id: &str,
        from_version: u64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let stream_id = stream_id.to_owned();
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let events = txn.open_table(EVENTS).map_err(backend)?;
            events
                .range((stream_id.as_str(), from_version)..=(stream_id.as_str(), u64::MAX))
                .map_err(backend)?
                .map(|entry| {
                    let (_, value) = entry.map_err(backend)?;
                    let (position, bytes) = value.value();
                    decode_event(position, bytes)
                })
                .collect()
        })
        .await
    }

    async fn find_request(
        &self,
        request_id: RequestId,
    ) -> Result<Option<AppendResult>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let requests = txn.open_table(REQUESTS).map_err(backend)?;
            let found = requests.get(request_id.0.as_u128()).map_err(backend)?;
            Ok(found.map(|value| decode_result(value.value())))
        })
        .await
    }

    async fn read_outbox(&self, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let outbox = txn.open_table(OUTBOX).map_err(backend)?;
            let events = txn.open_table(EVENTS).map_err(backend)?;
            outbox
                .iter()
                .map_err(backend)?
                .take(limit)
                .map(|entry| {
                    let (_, key) = entry.map_err(backend)?;
                    let (stream_id, version) = key.value();
                    let event = events
                        .get((stream_id, version))
                        .map_err(backend)?
                        .ok_or_else(|| {
                            StoreError::Backend(format!(
                                "outbox names a missing event {stream_id}@{version}"
                            ))
                        })?;
                    let (position, bytes) = event.value();
                    decode_event(position, bytes)
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
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            {
                let mut outbox = txn.open_table(OUTBOX).map_err(backend)?;
                for position in positions {
                    outbox.remove(position).map_err(backend)?;
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
            Err(StoreError::Unavailable(
                "the redb writer thread has stopped".into(),
            ))
        }
    }
}

fn create_tables(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    txn.open_table(STREAMS)?;
    txn.open_table(EVENTS)?;
    txn.open_table(OUTBOX)?;
    txn.open_table(REQUESTS)?;
    txn.open_table(META)?;
    txn.commit()?;
    Ok(())
}

fn write_loop(db: &Database, mut batches: Batches, appended: &Notify) {
    while let Some(batch) = batches.next_blocking() {
        match commit(db, &batch) {
            Ok(planned) => {
                if planned.iter().any(|p| matches!(p, Planned::Write { .. })) {
                    appended.notify_waiters();
                }
                for (pending, planned) in batch.into_iter().zip(planned) {
                    pending.answer(planned.into_outcome());
                }
            }
            Err(error) => {
                tracing::error!(%error, appends = batch.len(), "redb commit failed");
                for pending in batch {
                    pending.answer(Err(StoreError::Backend(format!("commit failed: {error}"))));
                }
            }
        }
    }
}

/// Plans and writes one batch in one durable transaction.
fn commit(db: &Database, batch: &[Pending]) -> Result<Vec<Planned>, redb::Error> {
    let txn = db.begin_write()?;
    let planned = {
        let mut streams = txn.open_table(STREAMS)?;
        let mut events = txn.open_table(EVENTS)?;
        let mut outbox = txn.open_table(OUTBOX)?;
        let mut requests = txn.open_table(REQUESTS)?;
        let mut meta = txn.open_table(META)?;

        let mut state = BatchState::default();
        for request in batch.iter().map(|p| &p.request) {
            if !state.versions.contains_key(&request.stream_id)
                && let Some(version) = streams.get(request.stream_id.as_str())?
            {
                state
                    .versions
                    .insert(request.stream_id.clone(), version.value());
            }
            if let Some(id) = request.request_id
                && let Some(found) = requests.get(id.0.as_u128())?
            {
                state.requests.insert(id, decode_result(found.value()));
            }
        }
        let planned = plan(batch.iter().map(|p| &p.request), state);

        let mut position = meta.get(NEXT_POSITION)?.map_or(1, |v| v.value());
        for (request, planned) in batch.iter().map(|p| &p.request).zip(&planned) {
            let Planned::Write {
                first_version,
                result,
            } = planned
            else {
                continue;
            };
            let stream = request.stream_id.as_str();
            for (version, event) in (*first_version..).zip(request.events.as_slice()) {
                let envelope = RecordedEvent {
                    position,
                    stream_id: request.stream_id.clone(),
                    stream_type: request.stream_type.clone(),
                    version,
                    event_id: event.event_id,
                    event_type: event.event_type.clone(),
                    payload: event.payload.clone(),
                    metadata: request.metadata.clone(),
                    request_id: request.request_id,
                }
                .to_envelope()
                .encode_to_vec();
                events.insert((stream, version), (position, envelope.as_slice()))?;
                outbox.insert(position, (stream, version))?;
                position += 1;
            }
            streams.insert(stream, result.version)?;
            if let Some(id) = request.request_id {
                let ids: Vec<u8> = result
                    .event_ids
                    .iter()
                    .flat_map(|id| *id.as_bytes())
                    .collect();
                requests.insert(id.0.as_u128(), (stream, result.version, ids.as_slice()))?;
            }
        }
        meta.insert(NEXT_POSITION, position)?;
        planned
    };
    txn.commit()?;
    Ok(planned)
}

fn decode_event(position: u64, bytes: &[u8]) -> Result<RecordedEvent, StoreError> {
    let envelope = pb::EventEnvelope::decode(bytes)
        .map_err(|e| StoreError::Backend(format!("corrupt event at position {position}: {e}")))?;
    RecordedEvent::from_envelope(position, envelope)
        .map_err(|e| StoreError::Backend(format!("corrupt event at position {position}: {e}")))
}

fn decode_result((stream_id, version, ids): (&str, u64, &[u8])) -> AppendResult {
    AppendResult {
        stream_id: stream_id.to_owned(),
        version,
        event_ids: ids
            .chunks_exact(16)
            .map(|chunk| Uuid::from_slice(chunk).expect("chunks_exact yields 16 bytes"))
            .collect(),
    }
}

fn backend(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Backend(error.into().to_string())
}
