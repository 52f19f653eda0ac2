//! The embedded read-model store: one redb file.
//!
//! redb serializes write transactions, so compare-and-swap is a check inside
//! the write transaction. Writes are durable on return (fsync), like the
//! event store's.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Cas, Document, DocumentError, DocumentStore};

/// Key → (CAS, JSON body).
const DOCUMENTS: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("documents");
/// Holds the last CAS handed out, so every write gets a new one.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LAST_CAS: &str = "last_cas";

/// The redb-backed [`DocumentStore`].
#[derive(Debug, Clone)]
pub struct RedbDocuments {
    db: Arc<Database>,
}

impl RedbDocuments {
    /// Opens the store at `path`, creating the file and its folder if missing.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DocumentError> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| DocumentError::Backend(format!("creating {}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(DOCUMENTS).map_err(backend)?;
        txn.open_table(META).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Runs `f` in a write transaction on a blocking thread; commits if it succeeds.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, DocumentError> + Send + 'static,
    ) -> Result<T, DocumentError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(backend)?;
            let outcome = {
                let mut writer = Writer {
                    documents: txn.open_table(DOCUMENTS).map_err(backend)?,
                    meta: txn.open_table(META).map_err(backend)?,
                };
                f(&mut writer)?
            };
            txn.commit().map_err(backend)?;
            Ok(outcome)
        })
        .await
        .map_err(|e| DocumentError::Backend(format!("write task failed: {e}")))?
    }
}

struct Writer<'t> {
    documents: redb::Table<'t, &'static str, (u64, &'static [u8])>,
    meta: redb::Table<'t, &'static str, u64>,
}

impl Writer<'_> {
    fn current(&self, key: &str) -> Result<Option<u64>, DocumentError> {
        Ok(self
            .documents
            .get(key)
            .map_err(backend)?
            .map(|v| v.value().0))
    }

    fn put(&mut self, key: &str, body: &[u8]) -> Result<Cas, DocumentError> {
        let cas = self
            .meta
            .get(LAST_CAS)
            .map_err(backend)?
            .map_or(0, |v| v.value())
            + 1;
        self.meta.insert(LAST_CAS, cas).map_err(backend)?;
        self.documents.insert(key, (cas, body)).map_err(backend)?;
        Cas::new(cas).ok_or_else(|| DocumentError::Backend("CAS counter wrapped".into()))
    }
}

#[async_trait]
impl DocumentStore for RedbDocuments {
    async fn get(&self, key: &str) -> Result<Option<Document>, DocumentError> {
        let db = Arc::clone(&self.db);
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(backend)?;
            let documents = txn.open_table(DOCUMENTS).map_err(backend)?;
            let found = documents.get(key.as_str()).map_err(backend)?;
            found
                .map(|value| {
                    let (cas, body) = value.value();
                    let cas = Cas::new(cas)
                        .ok_or_else(|| DocumentError::Backend(format!("{key} has CAS 0")))?;
                    Ok(Document {
                        body: body.to_vec(),
                        cas,
                    })
                })
                .transpose()
        })
        .await
        .map_err(|e| DocumentError::Backend(format!("read task failed: {e}")))?
    }

    async fn insert(&self, key: &str, body: &[u8]) -> Result<Cas, DocumentError> {
        let (key, body) = (key.to_owned(), body.to_vec());
        self.write(move |writer| {
            if writer.current(&key)?.is_some() {
                return Err(DocumentError::Exists(key));
            }
            writer.put(&key, &body)
        })
        .await
    }

    async fn replace(&self, key: &str, body: &[u8], cas: Cas) -> Result<Cas, DocumentError> {
        let (key, body) = (key.to_owned(), body.to_vec());
        self.write(move |writer| match writer.current(&key)? {
            None => Err(DocumentError::NotFound(key)),
            Some(current) if current != cas.get() => Err(DocumentError::CasMismatch(key)),
            Some(_) => writer.put(&key, &body),
        })
        .await
    }

    async fn remove(&self, key: &str, cas: Cas) -> Result<(), DocumentError> {
        let key = key.to_owned();
        self.write(move |writer| match writer.current(&key)? {
            None => Err(DocumentError::NotFound(key)),
            Some(current) if current != cas.get() => Err(DocumentError::CasMismatch(key)),
            Some(_) => {
                writer.documents.remove(key.as_str()).map_err(backend)?;
                Ok(())
            }
        })
        .await
    }

    async fn ping(&self) -> Result<(), DocumentError> {
        Ok(())
    }
}

fn backend(error: impl Into<redb::Error>) -> DocumentError {
    DocumentError::Backend(error.into().to_string())
}
