//! The read-model store port: JSON documents with compare-and-swap.
//!
//! Read models are written by many competing projector instances, so every
//! write states what it expects: [`DocumentStore::insert`] only if the key is
//! free, [`DocumentStore::replace`] and [`DocumentStore::remove`] only with
//! the CAS value that was read. A lost race comes back as
//! [`DocumentError::Exists`] or [`DocumentError::CasMismatch`] and the writer
//! reads again; there is no unconditional write in the port at all.
//!
//! Chosen at run time from config, so the trait is object safe and held as
//! `Arc<dyn DocumentStore>`: [`redb`] is the embedded default, [`couchbase`]
//! the production engine; both pass one conformance suite.

pub mod couchbase;
pub mod redb;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Cause;

/// A document's version as its store counts it; never 0 (the port has no
/// "any version" write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cas(std::num::NonZeroU64);

impl Cas {
    /// `None` for 0, which no store hands out.
    pub fn new(value: u64) -> Option<Self> {
        std::num::NonZeroU64::new(value).map(Self)
    }

    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for Cas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A stored document: its JSON body and the CAS to write it back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub body: Vec<u8>,
    pub cas: Cas,
}

/// What a document operation can fail with. Keys name the document;
/// failures of the store keep their cause as `source()`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DocumentError {
    #[error("document {0} does not exist")]
    NotFound(String),
    #[error("document {0} already exists")]
    Exists(String),
    /// Someone wrote the document since it was read: read it again.
    #[error("document {0} changed since it was read")]
    CasMismatch(String),
    /// The store cannot be reached or did not answer in time.
    #[error("document store unavailable: {context}")]
    Unavailable {
        context: String,
        #[source]
        cause: Option<Cause>,
    },
    /// The store refuses this document for good (too large, an invalid
    /// key): the same write will fail again, whatever the store's health.
    #[error("document refused: {context}")]
    Rejected {
        context: String,
        #[source]
        cause: Option<Cause>,
    },
    /// The store answered with a failure that is not the document's
    /// fault (wrong credentials, a missing bucket, an internal error).
    #[error("document store failure: {context}")]
    Backend {
        context: String,
        #[source]
        cause: Option<Cause>,
    },
}

impl DocumentError {
    pub fn unavailable(context: impl Into<String>) -> Self {
        Self::Unavailable {
            context: context.into(),
            cause: None,
        }
    }

    pub fn rejected(context: impl Into<String>) -> Self {
        Self::Rejected {
            context: context.into(),
            cause: None,
        }
    }

    pub fn backend(context: impl Into<String>) -> Self {
        Self::Backend {
            context: context.into(),
            cause: None,
        }
    }

    /// The same error, caused by `cause`.
    pub fn caused_by(mut self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        if let Self::Unavailable { cause: kept, .. }
        | Self::Rejected { cause: kept, .. }
        | Self::Backend { cause: kept, .. } = &mut self
        {
            *kept = Some(Cause::new(cause));
        }
        self
    }

    /// Whether the same call may succeed later because the store was away;
    /// a CAS conflict is an answer to act on, not a failure.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// Where read models live.
#[async_trait]
pub trait DocumentStore: Send + Sync + fmt::Debug + 'static {
    /// The document at `key`, or `None`.
    async fn get(&self, key: &str) -> Result<Option<Document>, DocumentError>;

    /// Writes a new document; [`DocumentError::Exists`] if the key is taken.
    async fn insert(&self, key: &str, body: &[u8]) -> Result<Cas, DocumentError>;

    /// Overwrites a document if it is still at `cas`.
    async fn replace(&self, key: &str, body: &[u8], cas: Cas) -> Result<Cas, DocumentError>;

    /// Removes a document if it is still at `cas`.
    async fn remove(&self, key: &str, cas: Cas) -> Result<(), DocumentError>;

    /// Checks that the store answers, for health reporting.
    async fn ping(&self) -> Result<(), DocumentError>;
}

/// Opens the embedded store a `--document-store` value names: `redb:PATH`
/// (a `couchbase://` store also needs credentials: see
/// [`crate::config::DocumentStoreArgs::open`]).
pub async fn open(spec: &str) -> Result<Arc<dyn DocumentStore>, DocumentError> {
    if let Some(path) = spec.strip_prefix("redb:") {
        // Opening may repair a file after a crash: not on a runtime thread.
        let path = path.to_owned();
        let opened = tokio::task::spawn_blocking(move || redb::RedbDocuments::open(path))
            .await
            .map_err(|e| DocumentError::backend(format!("opening the read models: {e}")))?;
        Ok(Arc::new(opened?))
    } else {
        Err(DocumentError::backend(format!(
            "unknown document store {spec:?}: expected redb:PATH"
        )))
    }
}

impl crate::config::DocumentStoreArgs {
    /// Opens the store these flags name (here, not in `config`, which
    /// depends on nothing).
    pub async fn open(
        &self,
    ) -> Result<std::sync::Arc<dyn crate::documents::DocumentStore>, crate::documents::DocumentError>
    {
        use crate::documents::couchbase::{CouchbaseConfig, CouchbaseDocuments};
        let store = &self.document_store;
        if !(store.starts_with("couchbase://") || store.starts_with("couchbases://")) {
            return crate::documents::open(store).await;
        }
        let config = CouchbaseConfig {
            connection_string: store.clone(),
            username: self.couchbase_username.clone(),
            password: self.couchbase_password.clone(),
            bucket: self.couchbase_bucket.clone(),
            scope: self.couchbase_scope.clone(),
            collection: self.couchbase_collection.clone(),
            timeout: self.couchbase_timeout,
            ca: self.couchbase_ca.clone(),
        };
        let store = CouchbaseDocuments::connect(config).await?;
        Ok(std::sync::Arc::new(
            store.with_durability(self.couchbase_durability),
        ))
    }
}
