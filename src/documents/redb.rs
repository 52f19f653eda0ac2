//! The embedded read-model store: one redb file.
//!
//! redb serializes write transactions, so compare-and-swap is a check inside
//! the write transaction. Writes are durable on return (fsync), and group
//! committed by the event store's engine (`group_commit`): one writer thread
//! applies every write that queued during the previous fsync, each with its
//! own check, in one transaction. A projector writes all the documents of a batch at once, so
//! they cost one fsync instead of one each.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{Cas, Document, DocumentError, DocumentStore};
use crate::group_commit::{self, Stopped};
use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// Key → (CAS, JSON body).
const DOCUMENTS: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("documents");
/// Holds the last CAS handed out, so every write gets a new one.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LAST_CAS: &str = "last_cas";

/// The redb-backed [`DocumentStore`].
#[derive(Debug, Clone)]
pub struct RedbDocuments {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Arc<Database>,
    /// `None` only while dropping, so the writer sees the queue close.
    writes: Option<Submitter>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.writes = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// One conditional write waiting for its transaction.
#[derive(Debug)]
struct Write {
    key: String,
    op: Op,
}

type Outcome = Result<Option<Cas>, DocumentError>;
type Submitter = group_commit::Submitter<Write, Outcome>;
type Batches = group_commit::Batches<Write, Outcome>;

#[derive(Debug)]
enum Op {
    Insert(Vec<u8>),
    Replace(Vec<u8>, Cas),
    Remove(Cas),
}

impl RedbDocuments {
    /// Opens the store at `path`, creating the file and its folder if missing.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DocumentError> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| DocumentError::backend(format!("creating {}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(DOCUMENTS).map_err(backend)?;
        txn.open_table(META).map_err(backend)?;
        txn.commit().map_err(backend)?;
        let db = Arc::new(db);
        let (writes, mut partitions) = group_commit::queue(1);
        let batches = partitions.pop().expect("one partition");
        let writer_db = Arc::clone(&db);
        let writer = std::thread::Builder::new()
            .name("redb-document-writer".into())
            .spawn(move || write_loop(&writer_db, batches))
            .map_err(|e| DocumentError::backend(format!("starting the writer thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                writes: Some(writes),
                writer: Some(writer),
            }),
        })
    }

    async fn write(&self, key: &str, op: Op) -> Result<Option<Cas>, DocumentError> {
        let stopped = || DocumentError::unavailable("the redb document writer has stopped");
        let writes = self.inner.writes.as_ref().ok_or_else(stopped)?;
        let write = Write {
            key: key.to_owned(),
            op,
        };
        writes
            .submit(write, |write| &write.key)
            .await
            .unwrap_or_else(|Stopped| Err(stopped()))
    }
}

fn write_loop(db: &Database, mut batches: Batches) {
    while let Some(batch) = batches.next_blocking() {
        match commit(db, &batch) {
            Ok(outcomes) => {
                for (pending, outcome) in batch.into_iter().zip(outcomes) {
                    pending.answer(outcome);
                }
            }
            Err(error) => {
                tracing::error!(%error, writes = batch.len(), "redb document commit failed");
                for pending in batch {
                    pending.answer(Err(error.clone()));
                }
            }
        }
    }
}

/// Applies a batch in order, each write checked against what the ones
/// before it left, and commits once.
fn commit(
    db: &Database,
    batch: &[group_commit::Pending<Write, Outcome>],
) -> Result<Vec<Outcome>, DocumentError> {
    let txn = db.begin_write().map_err(backend)?;
    let outcomes = {
        let mut documents = txn.open_table(DOCUMENTS).map_err(backend)?;
        let mut meta = txn.open_table(META).map_err(backend)?;
        let mut last_cas = meta
            .get(LAST_CAS)
            .map_err(backend)?
            .map_or(0, |v| v.value());
        let mut outcomes = Vec::with_capacity(batch.len());
        for write in batch.iter().map(|pending| &pending.write) {
            let key = write.key.as_str();
            let current = documents.get(key).map_err(backend)?.map(|v| v.value().0);
            let refusal = match (&write.op, current) {
                (Op::Insert(_), Some(_)) => Some(DocumentError::Exists(write.key.clone())),
                (Op::Replace(..) | Op::Remove(_), None) => {
                    Some(DocumentError::NotFound(write.key.clone()))
                }
                (Op::Replace(_, cas) | Op::Remove(cas), Some(current)) if cas.get() != current => {
                    Some(DocumentError::CasMismatch(write.key.clone()))
                }
                _ => None,
            };
            if let Some(refusal) = refusal {
                outcomes.push(Err(refusal));
                continue;
            }
            let outcome = match &write.op {
                Op::Insert(body) | Op::Replace(body, _) => {
                    last_cas += 1;
                    documents
                        .insert(key, (last_cas, body.as_slice()))
                        .map_err(backend)?;
                    Cas::new(last_cas)
                }
                Op::Remove(_) => {
                    documents.remove(key).map_err(backend)?;
                    None
                }
            };
            outcomes.push(Ok(outcome));
        }
        meta.insert(LAST_CAS, last_cas).map_err(backend)?;
        outcomes
    };
    txn.commit().map_err(backend)?;
    Ok(outcomes)
}

#[async_trait]
impl DocumentStore for RedbDocuments {
    async fn get(&self, key: &str) -> Result<Option<Document>, DocumentError> {
        let db = Arc::clone(&self.inner.db);
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(backend)?;
            let documents = txn.open_table(DOCUMENTS).map_err(backend)?;
            let found = documents.get(key.as_str()).map_err(backend)?;
            found
                .map(|value| {
                    let (cas, body) = value.value();
                    let cas = Cas::new(cas)
                        .ok_or_else(|| DocumentError::backend(format!("{key} has CAS 0")))?;
                    Ok(Document {
                        body: body.to_vec(),
                        cas,
                    })
                })
                .transpose()
        })
        .await
        .map_err(|e| DocumentError::backend(format!("read task failed: {e}")))?
    }

    async fn insert(&self, key: &str, body: &[u8]) -> Result<Cas, DocumentError> {
        written(key, self.write(key, Op::Insert(body.to_vec())).await?)
    }

    async fn replace(&self, key: &str, body: &[u8], cas: Cas) -> Result<Cas, DocumentError> {
        written(key, self.write(key, Op::Replace(body.to_vec(), cas)).await?)
    }

    async fn remove(&self, key: &str, cas: Cas) -> Result<(), DocumentError> {
        self.write(key, Op::Remove(cas)).await.map(drop)
    }

    async fn ping(&self) -> Result<(), DocumentError> {
        match &self.inner.writer {
            Some(writer) if !writer.is_finished() => Ok(()),
            _ => Err(DocumentError::unavailable(
                "the redb document writer has stopped",
            )),
        }
    }
}

fn written(key: &str, cas: Option<Cas>) -> Result<Cas, DocumentError> {
    cas.ok_or_else(|| DocumentError::backend(format!("no CAS for the write of {key}")))
}

fn backend(error: impl Into<redb::Error>) -> DocumentError {
    let error = error.into();
    DocumentError::backend(error.to_string()).caused_by(error)
}
