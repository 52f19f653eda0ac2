//! The production read-model store: Couchbase, through the official SDK.
//!
//! Documents are written raw (already-encoded JSON with JSON flags), so the
//! SDK neither re-encodes them nor needs to know their types, and N1QL sees
//! ordinary JSON. The SDK retries forever (a dead address never fails
//! `Cluster::connect`, an operation on an unknown bucket never returns), so
//! every call here is bounded by the configured timeout and a call that runs
//! out of it is [`DocumentError::Unavailable`].

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use couchbase::authenticator::PasswordAuthenticator;
use couchbase::cluster::Cluster;
use couchbase::collection::Collection;
use couchbase::error::{Error as CouchbaseError, ErrorKind};
use couchbase::options::cluster_options::ClusterOptions;
use couchbase::options::kv_options::{InsertOptions, RemoveOptions, ReplaceOptions};

use super::{Cas, Document, DocumentError, DocumentStore};

/// Where the bucket is and how to reach it.
#[derive(Clone)]
pub struct CouchbaseConfig {
    /// e.g. `couchbase://db.example.com` or `couchbase://127.0.0.1:11210`.
    pub connection_string: String,
    pub username: String,
    pub password: String,
    pub bucket: String,
    pub scope: String,
    pub collection: String,
    /// Bound on every operation; connecting may take a few of these.
    pub timeout: Duration,
}

impl std::fmt::Debug for CouchbaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CouchbaseConfig")
            .field("connection_string", &self.connection_string)
            .field("username", &self.username)
            .field("bucket", &self.bucket)
            .field("scope", &self.scope)
            .field("collection", &self.collection)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The Couchbase-backed [`DocumentStore`].
pub struct CouchbaseDocuments {
    collection: Collection,
    timeout: Duration,
    // Keeps the connections open for as long as the store lives.
    _cluster: Cluster,
}

impl std::fmt::Debug for CouchbaseDocuments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CouchbaseDocuments")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A key that is never written, read to check that the bucket answers.
const PING_KEY: &str = "_scaleout::ping";

impl CouchbaseDocuments {
    /// Connects and checks that the bucket answers.
    pub async fn connect(config: CouchbaseConfig) -> Result<Self, DocumentError> {
        let options = ClusterOptions::new(
            PasswordAuthenticator::new(&config.username, &config.password).into(),
        );
        let connecting = config.timeout.saturating_mul(4);
        let cluster = tokio::time::timeout(
            connecting,
            Cluster::connect(&config.connection_string, options),
        )
        .await
        .map_err(|_| {
            DocumentError::Unavailable(format!(
                "no connection to {} within {connecting:?} (wrong address or credentials?)",
                config.connection_string
            ))
        })?
        .map_err(|e| DocumentError::Unavailable(e.to_string()))?;
        let collection = cluster
            .bucket(&config.bucket)
            .scope(&config.scope)
            .collection(&config.collection);
        let store = Self {
            collection,
            timeout: config.timeout,
            _cluster: cluster,
        };
        store.ping().await?;
        Ok(store)
    }

    async fn bounded<T>(
        &self,
        key: &str,
        operation: impl Future<Output = couchbase::error::Result<T>>,
    ) -> Result<T, DocumentError> {
        tokio::time::timeout(self.timeout, operation)
            .await
            .map_err(|_| {
                DocumentError::Unavailable(format!("no answer for {key} within {:?}", self.timeout))
            })?
            .map_err(|e| classify(key, &e))
    }
}

fn classify(key: &str, error: &CouchbaseError) -> DocumentError {
    match error.kind() {
        ErrorKind::DocumentNotFound => DocumentError::NotFound(key.to_owned()),
        ErrorKind::DocumentExists => DocumentError::Exists(key.to_owned()),
        ErrorKind::CasMismatch => DocumentError::CasMismatch(key.to_owned()),
        ErrorKind::TemporaryFailure
        | ErrorKind::ServerTimeout
        | ErrorKind::ServiceNotAvailable(_)
        | ErrorKind::ClusterDropped
        | ErrorKind::AuthenticationFailure
        | ErrorKind::BucketNotFound => DocumentError::Unavailable(error.to_string()),
        _ => DocumentError::Backend(error.to_string()),
    }
}

fn cas(key: &str, value: u64) -> Result<Cas, DocumentError> {
    Cas::new(value)
        .ok_or_else(|| DocumentError::Backend(format!("Couchbase returned CAS 0 for {key}")))
}

#[async_trait]
impl DocumentStore for CouchbaseDocuments {
    async fn get(&self, key: &str) -> Result<Option<Document>, DocumentError> {
        match self.bounded(key, self.collection.get(key, None)).await {
            Ok(found) => Ok(Some(Document {
                body: found.content_as_raw().0.to_vec(),
                cas: cas(key, found.cas())?,
            })),
            Err(DocumentError::NotFound(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn insert(&self, key: &str, body: &[u8]) -> Result<Cas, DocumentError> {
        let (body, flags) =
            couchbase::transcoding::raw_json::encode(&body).map_err(|e| classify(key, &e))?;
        let written = self
            .bounded(
                key,
                self.collection
                    .insert_raw(key, body, flags, InsertOptions::new()),
            )
            .await?;
        cas(key, written.cas())
    }

    async fn replace(&self, key: &str, body: &[u8], expected: Cas) -> Result<Cas, DocumentError> {
        let (body, flags) =
            couchbase::transcoding::raw_json::encode(&body).map_err(|e| classify(key, &e))?;
        let options = ReplaceOptions::new().cas(expected.get());
        let written = self
            .bounded(key, self.collection.replace_raw(key, body, flags, options))
            .await?;
        cas(key, written.cas())
    }

    async fn remove(&self, key: &str, expected: Cas) -> Result<(), DocumentError> {
        let options = RemoveOptions::new().cas(expected.get());
        self.bounded(key, self.collection.remove(key, options))
            .await
            .map(drop)
    }

    async fn ping(&self) -> Result<(), DocumentError> {
        self.get(PING_KEY).await.map(drop)
    }
}
