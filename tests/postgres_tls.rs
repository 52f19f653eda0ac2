//! TLS to PostgreSQL as the URL's `sslmode` says, against the local server
//! (Debian's PostgreSQL serves TLS with its self-signed "snakeoil"
//! certificate): `require` encrypts, `verify-ca` trusts only the configured
//! CA, `verify-full` also checks the host name, and a URL without `sslmode`
//! stays plain. What a connection used is read from `pg_stat_ssl`.

mod support;

use std::path::{Path, PathBuf};

use scaleout::store::EventStore;
use scaleout::store::postgres::{PostgresConfig, PostgresStore};

/// The local server's own certificate: the CA of a self-signed server.
const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// The URL with `params` added.
fn url(params: &str) -> String {
    let base = support::postgres_url();
    let joiner = if base.contains('?') { '&' } else { '?' };
    format!("{base}{joiner}{params}")
}

/// Opens a store at `url`, trusting `ca`; on success, whether its
/// connections use TLS.
async fn open(url: &str, ca: Option<&Path>) -> Result<bool, String> {
    let name = support::unique_schema("tls");
    let schema = name.clone();
    let url = format!("{url}&application_name={name}");
    let store = PostgresStore::connect(
        PostgresConfig::new(&url)
            .with_schema(schema.clone())
            .with_ca(ca.map(Path::to_path_buf)),
    )
    .await
    .map_err(|e| e.to_string());
    let encrypted = match store {
        Ok(store) => {
            store.ping().await.unwrap();
            let (client, connection) =
                tokio_postgres::connect(&support::postgres_url(), tokio_postgres::NoTls)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            let rows = client
                .query(
                    "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                     WHERE a.application_name = $1",
                    &[&name],
                )
                .await
                .unwrap();
            assert!(!rows.is_empty(), "no connection of the store found");
            Ok(rows.iter().all(|row| row.get::<_, bool>(0)))
        }
        Err(error) => Err(error),
    };
    support::drop_schema(&schema).await;
    encrypted
}

fn server_has_tls() -> bool {
    Path::new(SNAKEOIL).exists()
}

#[tokio::test]
async fn sslmode_decides_tls_and_what_is_checked() {
    assert!(
        server_has_tls(),
        "{SNAKEOIL} is missing: the local PostgreSQL serves no TLS to test against"
    );
    // No sslmode: plain, as before TLS was supported.
    assert_eq!(open(&url("connect_timeout=5"), None).await, Ok(false));
    assert_eq!(open(&url("sslmode=disable"), None).await, Ok(false));
    assert_eq!(open(&url("sslmode=require"), None).await, Ok(true));
    let snakeoil = PathBuf::from(SNAKEOIL);
    assert_eq!(
        open(&url("sslmode=verify-ca"), Some(&snakeoil)).await,
        Ok(true)
    );

    // A CA that did not issue the server's certificate.
    let dir = tempfile::tempdir().unwrap();
    let stranger = dir.path().join("stranger.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&stranger, params.self_signed(&key).unwrap().pem()).unwrap();
    let refused = open(&url("sslmode=verify-ca"), Some(&stranger)).await;
    assert!(refused.is_err(), "a server another CA issued: {refused:?}");
    let refused = open(&url("sslmode=require"), Some(&stranger)).await;
    assert!(
        refused.is_err(),
        "require with a CA checks the chain: {refused:?}"
    );
    // The snakeoil certificate names the machine, not 127.0.0.1.
    let refused = open(&url("sslmode=verify-full"), Some(&snakeoil)).await;
    assert!(
        refused.is_err(),
        "a certificate for another name: {refused:?}"
    );
}
