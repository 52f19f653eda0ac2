//! The server as a raw protocol peer: refusals exactly where Couchbase
//! Server refuses, and documents without the collections feature.

use couchbase_kv_server::protocol::{REQUEST, opcode, status};
use couchbase_kv_server::{ServerConfig, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A minimal client: one request, one response.
struct Raw(TcpStream);

struct Answer {
    status: u16,
    cas: u64,
    extras: Vec<u8>,
    value: Vec<u8>,
}

impl Raw {
    async fn connect(server: &TestServer) -> Raw {
        Raw(TcpStream::connect(server.addr()).await.unwrap())
    }

    async fn call(
        &mut self,
        opcode: u8,
        extras: &[u8],
        key: &[u8],
        value: &[u8],
        cas: u64,
    ) -> Answer {
        let body = extras.len() + key.len() + value.len();
        let mut frame = vec![REQUEST, opcode];
        frame.extend_from_slice(&(key.len() as u16).to_be_bytes());
        frame.push(extras.len() as u8);
        frame.push(0);
        frame.extend_from_slice(&0u16.to_be_bytes());
        frame.extend_from_slice(&(body as u32).to_be_bytes());
        frame.extend_from_slice(&7u32.to_be_bytes());
        frame.extend_from_slice(&cas.to_be_bytes());
        frame.extend_from_slice(extras);
        frame.extend_from_slice(key);
        frame.extend_from_slice(value);
        self.0.write_all(&frame).await.unwrap();
        let mut header = [0u8; 24];
        self.0.read_exact(&mut header).await.unwrap();
        assert_eq!(header[0], 0x81, "a response frame");
        assert_eq!(
            u32::from_be_bytes(header[12..16].try_into().unwrap()),
            7,
            "the opaque comes back"
        );
        let extras_len = usize::from(header[4]);
        let mut body = vec![0u8; u32::from_be_bytes(header[8..12].try_into().unwrap()) as usize];
        self.0.read_exact(&mut body).await.unwrap();
        let value = body.split_off(extras_len);
        Answer {
            status: u16::from_be_bytes([header[6], header[7]]),
            cas: u64::from_be_bytes(header[16..24].try_into().unwrap()),
            extras: body,
            value,
        }
    }

    async fn plain(&mut self, user: &str, password: &str) -> u16 {
        let credentials = format!("\0{user}\0{password}");
        self.call(opcode::SASL_AUTH, &[], b"PLAIN", credentials.as_bytes(), 0)
            .await
            .status
    }
}

#[tokio::test]
async fn wrong_credentials_are_refused_with_auth_error() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let mut raw = Raw::connect(&server).await;
    assert_eq!(
        raw.plain("Administrator", "wrong").await,
        status::AUTH_ERROR
    );
    assert_eq!(raw.plain("nobody", "password").await, status::AUTH_ERROR);

    // SCRAM-SHA512 with a proof that is not the password's.
    let first = raw
        .call(
            opcode::SASL_AUTH,
            &[],
            b"SCRAM-SHA512",
            b"n,,n=Administrator,r=abcdef",
            0,
        )
        .await;
    assert_eq!(first.status, status::AUTH_CONTINUE);
    let server_first = String::from_utf8(first.value).unwrap();
    let nonce = server_first
        .split(',')
        .find_map(|p| p.strip_prefix("r="))
        .unwrap();
    let bogus = format!(
        "c=biws,r={nonce},p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="
    );
    let step = raw
        .call(opcode::SASL_STEP, &[], b"SCRAM-SHA512", bogus.as_bytes(), 0)
        .await;
    assert_eq!(step.status, status::AUTH_ERROR);

    // Nothing but the handshake works unauthenticated.
    assert_eq!(
        raw.call(opcode::SELECT_BUCKET, &[], b"scaleout", b"", 0)
            .await
            .status,
        status::EACCESS
    );
}

#[tokio::test]
async fn an_unknown_bucket_and_an_unknown_opcode_are_refused() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let mut raw = Raw::connect(&server).await;
    assert_eq!(
        raw.plain("Administrator", "password").await,
        status::SUCCESS
    );
    assert_eq!(
        raw.call(opcode::SELECT_BUCKET, &[], b"nope", b"", 0)
            .await
            .status,
        status::EACCESS
    );
    assert_eq!(
        raw.call(opcode::GET, &[], b"k", b"", 0).await.status,
        status::NO_BUCKET
    );
    assert_eq!(
        raw.call(0xa5, &[], b"", b"", 0).await.status,
        status::UNKNOWN_COMMAND
    );
}

#[tokio::test]
async fn documents_work_without_the_collections_feature() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let mut raw = Raw::connect(&server).await;
    assert_eq!(
        raw.plain("Administrator", "password").await,
        status::SUCCESS
    );
    assert_eq!(
        raw.call(opcode::SELECT_BUCKET, &[], b"scaleout", b"", 0)
            .await
            .status,
        status::SUCCESS
    );
    let flags_and_expiry = [0, 0, 0, 42, 0, 0, 0, 0];
    let added = raw
        .call(opcode::ADD, &flags_and_expiry, b"doc", b"{\"n\":1}", 0)
        .await;
    assert_eq!(added.status, status::SUCCESS);
    assert_ne!(added.cas, 0);
    let got = raw.call(opcode::GET, &[], b"doc", b"", 0).await;
    assert_eq!(
        (got.status, got.cas, got.value.as_slice()),
        (status::SUCCESS, added.cas, b"{\"n\":1}".as_slice())
    );
    assert_eq!(got.extras, [0, 0, 0, 42], "GET returns the flags");
    let stale = raw
        .call(
            opcode::REPLACE,
            &flags_and_expiry,
            b"doc",
            b"{}",
            added.cas + 1,
        )
        .await;
    assert_eq!(stale.status, status::KEY_EEXISTS);
    assert_eq!(
        raw.call(opcode::ADD, &flags_and_expiry, b"doc", b"{}", 0)
            .await
            .status,
        status::KEY_EEXISTS
    );
    assert_eq!(
        raw.call(opcode::DELETE, &[], b"doc", b"", added.cas)
            .await
            .status,
        status::SUCCESS
    );
    assert_eq!(
        raw.call(opcode::GET, &[], b"doc", b"", 0).await.status,
        status::KEY_ENOENT
    );
}

#[tokio::test]
async fn the_sdk_never_gets_in_with_a_wrong_password() {
    use couchbase::authenticator::PasswordAuthenticator;
    use couchbase::cluster::Cluster;
    use couchbase::options::cluster_options::ClusterOptions;

    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let options = ClusterOptions::new(PasswordAuthenticator::new("Administrator", "wrong").into());
    let attempt = async {
        let cluster = Cluster::connect(server.connection_string(), options).await?;
        let collection = cluster.bucket("scaleout").default_collection();
        collection.get("any", None).await.map(drop)
    };
    // The SDK retries a refused login forever; it must not succeed.
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(3), attempt).await;
    assert!(
        !matches!(outcome, Ok(Ok(()))),
        "a wrong password got in: {outcome:?}"
    );
}
