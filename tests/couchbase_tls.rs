//! The Couchbase document store over `couchbases://`, through the real SDK
//! to the KV test server serving TLS with a certificate made here.

mod support;

use std::time::Duration;

use couchbase_kv_server::{ServerConfig, TestServer, TlsIdentity};
use scaleout::documents::DocumentStore;
use scaleout::documents::couchbase::{CouchbaseConfig, CouchbaseDocuments};
use support::certificates::Authority;

/// SASL_AUTH: where the SDK sends the password (PLAIN, over TLS).
const SASL_AUTH: u8 = 0x21;

async fn tls_server(authority: &Authority) -> TestServer {
    let issued = authority.issue(false);
    TestServer::start(ServerConfig {
        tls: Some(TlsIdentity {
            certificate_pem: issued.cert,
            key_pem: issued.key,
        }),
        ..ServerConfig::default()
    })
    .await
    .unwrap()
}

fn config(connection_string: String, ca: Option<std::path::PathBuf>) -> CouchbaseConfig {
    CouchbaseConfig {
        connection_string,
        username: "Administrator".into(),
        password: "password".into(),
        bucket: "scaleout".into(),
        scope: "_default".into(),
        collection: "_default".into(),
        timeout: Duration::from_millis(500),
        ca,
    }
}

#[tokio::test]
async fn documents_are_written_and_read_over_tls_to_a_cluster_whose_certificate_chains_to_the_ca() {
    let authority = Authority::new("couchbase test CA");
    let server = tls_server(&authority).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, &authority.pem).unwrap();
    assert!(server.connection_string().starts_with("couchbases://"));

    let documents = CouchbaseDocuments::connect(config(server.connection_string(), Some(ca)))
        .await
        .expect("a Couchbase connection over TLS");
    documents.insert("over-tls", br#"{"n":1}"#).await.unwrap();
    let read = documents.get("over-tls").await.unwrap().unwrap();
    assert_eq!(read.body, br#"{"n":1}"#);
    assert!(server.requests(SASL_AUTH) > 0);
}

#[tokio::test]
async fn a_cluster_whose_certificate_chains_to_no_trusted_ca_never_sees_the_password() {
    let trusted = Authority::new("the CA the client trusts");
    let other = Authority::new("another CA");
    let server = tls_server(&other).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, &trusted.pem).unwrap();

    let refused = CouchbaseDocuments::connect(config(server.connection_string(), Some(ca))).await;
    assert!(refused.is_err());
    assert_eq!(
        server.requests(SASL_AUTH),
        0,
        "the password went to an unverified server"
    );
}

#[tokio::test]
async fn plaintext_to_a_tls_port_no_ca_and_an_unreadable_ca_are_refused() {
    let authority = Authority::new("couchbase test CA");
    let server = tls_server(&authority).await;
    let plain = server
        .connection_string()
        .replace("couchbases://", "couchbase://");
    assert!(
        CouchbaseDocuments::connect(config(plain, None))
            .await
            .is_err()
    );
    assert_eq!(server.requests(SASL_AUTH), 0);

    // The SDK cannot check the host name: without a CA named, nothing is
    // sent at all.
    let error = CouchbaseDocuments::connect(config(server.connection_string(), None))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("--couchbase-ca"), "{error}");

    let missing = std::path::PathBuf::from("/nonexistent/couchbase-ca.crt");
    let error = CouchbaseDocuments::connect(config(server.connection_string(), Some(missing)))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("/nonexistent/couchbase-ca.crt"),
        "{error}"
    );
}
