//! The production read-model store: Couchbase, through the official SDK.
//!
//! Documents are written raw (already-encoded JSON with JSON flags), so the
//! SDK neither re-encodes them nor needs to know their types, and N1QL sees
//! ordinary JSON. The SDK retries forever (a dead address never fails
//! `Cluster::connect`, an operation on an unknown bucket never returns, and
//! TMPFAIL, NOT_MY_VBUCKET or a frozen server make a call wait without
//! end), so every call here is bounded by the configured timeout and a call
//! that runs out of it is [`DocumentError::Unavailable`]. What the SDK does
//! return is sorted by `classify`.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use couchbase::authenticator::PasswordAuthenticator;
use couchbase::cluster::Cluster;
use couchbase::collection::Collection;
use couchbase::durability_level::DurabilityLevel;
use couchbase::error::{Error as CouchbaseError, ErrorKind};
use couchbase::options::cluster_options::{ClusterOptions, TlsOptions};
use couchbase::options::kv_options::{InsertOptions, RemoveOptions, ReplaceOptions};

use super::{Cas, Document, DocumentError, DocumentStore};
use crate::config::CouchbaseDurability;

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
    /// The PEM CA a `couchbases://` cluster's certificate must chain to
    /// (required with TLS: see [`CouchbaseDocuments::connect`]).
    pub ca: Option<PathBuf>,
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
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

/// The Couchbase-backed [`DocumentStore`].
pub struct CouchbaseDocuments {
    collection: Collection,
    timeout: Duration,
    /// Asked of every insert, replace and remove (NONE sends nothing).
    durability: DurabilityLevel,
    // Keeps the connections open for as long as the store lives.
    _cluster: Cluster,
}

impl std::fmt::Debug for CouchbaseDocuments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CouchbaseDocuments")
            .field("timeout", &self.timeout)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

/// A key that is never written, read to check that the bucket answers.
const PING_KEY: &str = "_scaleout::ping";

impl CouchbaseDocuments {
    /// Connects and checks that the bucket answers. Over `couchbases://`,
    /// the cluster's certificate must chain to [`CouchbaseConfig::ca`] (or
    /// a CA of the system's); its host name is not checked, since the SDK
    /// checks it against `host:port`.
    pub async fn connect(config: CouchbaseConfig) -> Result<Self, DocumentError> {
        let mut options = ClusterOptions::new(
            PasswordAuthenticator::new(&config.username, &config.password).into(),
        );
        // The SDK (1.1, OpenSSL) checks a certificate's name against
        // `host:port`, which no certificate names: over TLS, the chain to a
        // CA named here is what is checked, and the name cannot be.
        if config.connection_string.starts_with("couchbases://") && config.ca.is_none() {
            return Err(DocumentError::backend(
                "couchbases:// needs --couchbase-ca: the Couchbase SDK cannot check a \
                 certificate's host name, so the cluster's CA must be named",
            ));
        }
        if let Some(path) = &config.ca {
            let refused = |e: &dyn std::fmt::Display| {
                DocumentError::backend(format!("the Couchbase CA {}: {e}", path.display()))
            };
            let pem = std::fs::read(path).map_err(|e| refused(&e))?;
            let ca = native_tls::Certificate::from_pem(&pem).map_err(|e| refused(&e))?;
            options = options.tls_options(
                TlsOptions::new()
                    .add_ca_certificate(ca)
                    .danger_accept_invalid_hostnames(true),
            );
        }
        let connecting = config.timeout.saturating_mul(4);
        let cluster = tokio::time::timeout(
            connecting,
            Cluster::connect(&config.connection_string, options),
        )
        .await
        .map_err(|_| {
            DocumentError::unavailable(format!(
                "no connection to {} within {connecting:?} (wrong address or credentials?)",
                config.connection_string
            ))
        })?
        .map_err(|e| DocumentError::unavailable(e.to_string()).caused_by(e))?;
        let collection = cluster
            .bucket(&config.bucket)
            .scope(&config.scope)
            .collection(&config.collection);
        let store = Self {
            collection,
            timeout: config.timeout,
            durability: DurabilityLevel::NONE,
            _cluster: cluster,
        };
        store.ping().await?;
        Ok(store)
    }

    /// Makes every write wait for `durability` (see `--couchbase-durability`).
    pub fn with_durability(mut self, durability: CouchbaseDurability) -> Self {
        self.durability = match durability {
            CouchbaseDurability::None => DurabilityLevel::NONE,
            CouchbaseDurability::Majority => DurabilityLevel::MAJORITY,
            CouchbaseDurability::PersistToMajority => DurabilityLevel::PERSIST_TO_MAJORITY,
        };
        self
    }

    async fn bounded<T>(
        &self,
        key: &str,
        operation: impl Future<Output = couchbase::error::Result<T>>,
    ) -> Result<T, DocumentError> {
        tokio::time::timeout(self.timeout, operation)
            .await
            .map_err(|_| {
                DocumentError::unavailable(format!("no answer for {key} within {:?}", self.timeout))
            })?
            .map_err(|e| classify(key, e))
    }
}

/// Sorts an SDK error for callers. [`DocumentError::Unavailable`]: the store
/// did not answer now, or a write's fate is unknown — callers read again
/// and write with CAS, so trying again is safe. [`DocumentError::Rejected`]:
/// this document can never be written. [`DocumentError::Backend`]:
/// trying again cannot help.
fn classify(key: &str, error: CouchbaseError) -> DocumentError {
    let classified = match error.kind() {
        ErrorKind::DocumentNotFound => DocumentError::NotFound(key.to_owned()),
        ErrorKind::DocumentExists => DocumentError::Exists(key.to_owned()),
        ErrorKind::CasMismatch => DocumentError::CasMismatch(key.to_owned()),
        // No answer now. OtherFailure is the SDK's kind for every transport
        // failure: a connection closed with the request in flight (the write
        // may or may not have happened), a failed dispatch, NOT_MY_VBUCKET,
        // a vBucket with no server assigned during a failover.
        ErrorKind::OtherFailure(_)
        | ErrorKind::RequestCanceled
        | ErrorKind::ServerTimeout
        | ErrorKind::TemporaryFailure
        | ErrorKind::RateLimitedFailure
        | ErrorKind::ServiceNotAvailable(_)
        | ErrorKind::ClusterDropped
        | ErrorKind::DocumentLocked
        // A durable write timed out (it may have happened), or waits on another.
        | ErrorKind::DurabilityAmbiguous
        | ErrorKind::DurabilityWriteInProgress
        | ErrorKind::DurableWriteRecommitInProgress => {
            DocumentError::unavailable(error.to_string())
        }
        ErrorKind::ValueTooLarge => DocumentError::rejected(format!(
            "document {key} is larger than Couchbase's 20 MiB limit"
        )),
        ErrorKind::InvalidArgument(_) | ErrorKind::EncodingFailure(_) => {
            DocumentError::rejected(format!("document {key}: {error}"))
        }
        ErrorKind::DurabilityImpossible => DocumentError::backend(format!(
            "writing {key}: the bucket has too few data nodes for --couchbase-durability \
             (on one node, create the bucket with --bucket-replica 0)"
        )),
        // Wrong credentials, bucket, scope or collection, a quota, an
        // unsupported durability level or operation, bad input: permanent.
        _ => DocumentError::backend(error.to_string()),
    };
    classified.caused_by(error)
}

fn cas(key: &str, value: u64) -> Result<Cas, DocumentError> {
    Cas::new(value)
        .ok_or_else(|| DocumentError::backend(format!("Couchbase returned CAS 0 for {key}")))
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
            couchbase::transcoding::raw_json::encode(&body).map_err(|e| classify(key, e))?;
        let options = InsertOptions::new().durability_level(self.durability.clone());
        let written = self
            .bounded(key, self.collection.insert_raw(key, body, flags, options))
            .await?;
        cas(key, written.cas())
    }

    async fn replace(&self, key: &str, body: &[u8], expected: Cas) -> Result<Cas, DocumentError> {
        let (body, flags) =
            couchbase::transcoding::raw_json::encode(&body).map_err(|e| classify(key, e))?;
        let options = ReplaceOptions::new()
            .cas(expected.get())
            .durability_level(self.durability.clone());
        let written = self
            .bounded(key, self.collection.replace_raw(key, body, flags, options))
            .await?;
        cas(key, written.cas())
    }

    async fn remove(&self, key: &str, expected: Cas) -> Result<(), DocumentError> {
        let options = RemoveOptions::new()
            .cas(expected.get())
            .durability_level(self.durability.clone());
        self.bounded(key, self.collection.remove(key, options))
            .await
            .map(drop)
    }

    async fn ping(&self) -> Result<(), DocumentError> {
        self.get(PING_KEY).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use couchbase::error::InvalidArgumentErrorKind;
    use couchbase::service_type::ServiceType;

    use super::*;

    fn classified(kind: ErrorKind) -> DocumentError {
        classify("doc::a", CouchbaseError::new(kind))
    }

    fn is_unavailable(kind: ErrorKind) -> bool {
        matches!(classified(kind), DocumentError::Unavailable { .. })
    }

    #[test]
    fn missing_taken_and_changed_documents_keep_their_meaning() {
        let is_a = |key: &String| key == "doc::a";
        assert!(
            matches!(classified(ErrorKind::DocumentNotFound), DocumentError::NotFound(k) if is_a(&k))
        );
        assert!(
            matches!(classified(ErrorKind::DocumentExists), DocumentError::Exists(k) if is_a(&k))
        );
        assert!(
            matches!(classified(ErrorKind::CasMismatch), DocumentError::CasMismatch(k) if is_a(&k))
        );
    }

    #[test]
    fn a_store_that_does_not_answer_now_is_unavailable() {
        for kind in [
            // What the SDK returns for a connection closed mid-write.
            ErrorKind::OtherFailure("request cancelled: Closed in flight".into()),
            ErrorKind::OtherFailure("no server assigned to vbucket 7".into()),
            ErrorKind::RequestCanceled,
            ErrorKind::ServerTimeout,
            ErrorKind::TemporaryFailure,
            ErrorKind::RateLimitedFailure,
            ErrorKind::ServiceNotAvailable(ServiceType::KV),
            ErrorKind::ClusterDropped,
            ErrorKind::DocumentLocked,
        ] {
            assert!(is_unavailable(kind.clone()), "{kind:?}");
        }
    }

    #[test]
    fn a_failure_keeps_the_sdk_error_as_its_source() {
        let failure = classified(ErrorKind::TemporaryFailure);
        assert!(failure.is_transient());
        let source = std::error::Error::source(&failure).expect("a source");
        assert!(source.is::<CouchbaseError>(), "{source:?}");
    }

    #[test]
    fn a_durable_write_of_unknown_fate_or_waiting_on_another_is_unavailable() {
        for kind in [
            ErrorKind::DurabilityAmbiguous,
            ErrorKind::DurabilityWriteInProgress,
            ErrorKind::DurableWriteRecommitInProgress,
        ] {
            assert!(is_unavailable(kind.clone()), "{kind:?}");
        }
    }

    #[test]
    fn a_value_too_large_is_rejected_and_says_so() {
        let DocumentError::Rejected {
            context: message, ..
        } = classified(ErrorKind::ValueTooLarge)
        else {
            panic!("not Rejected");
        };
        assert!(
            message.contains("doc::a") && message.contains("20 MiB"),
            "{message}"
        );
    }

    #[test]
    fn impossible_durability_is_a_backend_failure_that_names_the_fix() {
        let DocumentError::Backend {
            context: message, ..
        } = classified(ErrorKind::DurabilityImpossible)
        else {
            panic!("not Backend");
        };
        assert!(message.contains("--bucket-replica 0"), "{message}");
    }

    #[test]
    fn a_misconfigured_or_failing_store_is_a_backend_failure() {
        for kind in [
            ErrorKind::AuthenticationFailure,
            ErrorKind::BucketNotFound,
            ErrorKind::ScopeNotFound,
            ErrorKind::CollectionNotFound,
            ErrorKind::QuotaLimitedFailure,
            ErrorKind::DurabilityLevelNotAvailable,
            ErrorKind::UnsupportedOperation,
            ErrorKind::InternalServerFailure,
        ] {
            assert!(
                matches!(classified(kind.clone()), DocumentError::Backend { .. }),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn a_document_the_store_can_never_take_is_rejected() {
        for kind in [
            ErrorKind::ValueTooLarge,
            ErrorKind::EncodingFailure("not JSON".into()),
            ErrorKind::InvalidArgument(InvalidArgumentErrorKind::new(None, "key too long")),
        ] {
            assert!(
                matches!(classified(kind.clone()), DocumentError::Rejected { .. }),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn the_durability_flag_takes_three_values() {
        use clap::Parser;

        #[derive(Debug, Parser)]
        struct Flags {
            #[command(flatten)]
            documents: crate::config::DocumentStoreArgs,
        }
        let parse = |value: &str| {
            Flags::try_parse_from(["test", "--couchbase-durability", value])
                .map(|flags| flags.documents.couchbase_durability)
        };
        assert_eq!(parse("none").ok(), Some(CouchbaseDurability::None));
        assert_eq!(parse("majority").ok(), Some(CouchbaseDurability::Majority));
        assert_eq!(
            parse("persist_to_majority").ok(),
            Some(CouchbaseDurability::PersistToMajority)
        );
        assert!(parse("persist-to-majority").is_err());
    }
}
