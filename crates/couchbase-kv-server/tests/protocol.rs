//! The server as a raw protocol peer: refusals exactly where Couchbase
//! Server refuses, documents without the collections feature, the error
//! map, durability frames and what each fault puts on the wire.

use std::time::Duration;

use couchbase_kv_server::protocol::{ALT_REQUEST, REQUEST, opcode, status};
use couchbase_kv_server::{Fault, ServerConfig, TestServer};
use serde_json::Value;
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

    /// Authenticated, with the default bucket selected.
    async fn to_bucket(server: &TestServer) -> Raw {
        let mut raw = Raw::connect(server).await;
        assert_eq!(
            raw.plain("Administrator", "password").await,
            status::SUCCESS
        );
        let selected = raw.call(opcode::SELECT_BUCKET, &[], b"scaleout", b"", 0);
        assert_eq!(selected.await.status, status::SUCCESS);
        raw
    }

    async fn call(
        &mut self,
        opcode: u8,
        extras: &[u8],
        key: &[u8],
        value: &[u8],
        cas: u64,
    ) -> Answer {
        self.send(opcode, &[], extras, key, value, cas).await;
        self.receive().await
    }

    /// An alt request: `framing` extras (e.g. durability) first.
    async fn call_framed(
        &mut self,
        opcode: u8,
        framing: &[u8],
        extras: &[u8],
        key: &[u8],
        value: &[u8],
    ) -> Answer {
        self.send(opcode, framing, extras, key, value, 0).await;
        self.receive().await
    }

    async fn send(
        &mut self,
        opcode: u8,
        framing: &[u8],
        extras: &[u8],
        key: &[u8],
        value: &[u8],
        cas: u64,
    ) {
        let body = framing.len() + extras.len() + key.len() + value.len();
        let mut frame = if framing.is_empty() {
            let mut frame = vec![REQUEST, opcode];
            frame.extend_from_slice(&(key.len() as u16).to_be_bytes());
            frame
        } else {
            vec![ALT_REQUEST, opcode, framing.len() as u8, key.len() as u8]
        };
        frame.push(extras.len() as u8);
        frame.push(0);
        frame.extend_from_slice(&0u16.to_be_bytes());
        frame.extend_from_slice(&(body as u32).to_be_bytes());
        frame.extend_from_slice(&7u32.to_be_bytes());
        frame.extend_from_slice(&cas.to_be_bytes());
        frame.extend_from_slice(framing);
        frame.extend_from_slice(extras);
        frame.extend_from_slice(key);
        frame.extend_from_slice(value);
        self.0.write_all(&frame).await.unwrap();
    }

    async fn receive(&mut self) -> Answer {
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

const FLAGS_AND_EXPIRY: [u8; 8] = [0; 8];

#[tokio::test]
async fn the_error_map_marks_what_the_sdk_retries() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let mut raw = Raw::connect(&server).await;
    let answer = raw
        .call(opcode::GET_ERROR_MAP, &[], b"", &2u16.to_be_bytes(), 0)
        .await;
    assert_eq!(answer.status, status::SUCCESS);
    let map: Value = serde_json::from_slice(&answer.value).unwrap();
    assert_eq!(map["version"], 2);
    let entry = |code: &str| {
        let entry = &map["errors"][code];
        let attrs: Vec<&str> = entry["attrs"]
            .as_array()
            .unwrap_or_else(|| panic!("{code} has attrs"))
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        (entry["name"].as_str().unwrap(), attrs)
    };
    for (code, name, expected) in [
        ("1", "KEY_ENOENT", &["item-only"][..]),
        ("2", "KEY_EEXISTS", &["item-only"]),
        ("3", "E2BIG", &["invalid-input"]),
        ("7", "NOT_MY_VBUCKET", &["fetch-config"]),
        ("8", "NO_BUCKET", &["conn-state-invalidated"]),
        ("9", "LOCKED", &["item-locked", "retry-now"]),
        ("20", "AUTH_ERROR", &["auth", "conn-state-invalidated"]),
        ("82", "ENOMEM", &["temp", "retry-later"]),
        ("85", "EBUSY", &["temp", "retry-now"]),
        ("86", "ETMPFAIL", &["temp", "retry-later"]),
        ("a3", "SYNC_WRITE_AMBIGUOUS", &["item-only"]),
    ] {
        let (found, attrs) = entry(code);
        assert_eq!(found, name);
        for attr in expected {
            assert!(attrs.contains(attr), "{name} lacks {attr}: {attrs:?}");
        }
    }
    // Retried entries say how; permanent ones are never retried.
    assert_eq!(map["errors"]["86"]["retry"]["strategy"], "exponential");
    for permanent in ["1", "2", "3", "7", "a3"] {
        let (_, attrs) = entry(permanent);
        assert!(!attrs.iter().any(|a| a.starts_with("retry")), "{permanent}");
    }
}

#[tokio::test]
async fn durability_frames_are_checked_then_applied_like_plain_writes() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let mut raw = Raw::to_bucket(&server).await;
    let majority = [0x11, 0x01];
    let persist_with_timeout = [0x13, 0x03, 0x01, 0xf4];
    for framing in [&majority[..], &persist_with_timeout] {
        let set = raw
            .call_framed(opcode::SET, framing, &FLAGS_AND_EXPIRY, b"doc", b"{}")
            .await;
        assert_eq!(set.status, status::SUCCESS, "{framing:x?}");
    }
    let unknown_level = raw
        .call_framed(opcode::SET, &[0x11, 0x09], &FLAGS_AND_EXPIRY, b"doc", b"{}")
        .await;
    assert_eq!(unknown_level.status, status::DURABILITY_INVALID_LEVEL);
    let truncated = raw
        .call_framed(opcode::SET, &[0x12, 0x01], &FLAGS_AND_EXPIRY, b"doc", b"{}")
        .await;
    assert_eq!(truncated.status, status::INVALID_ARGUMENTS);
    let durable_read = raw
        .call_framed(opcode::GET, &majority, &[], b"doc", b"")
        .await;
    assert_eq!(durable_read.status, status::INVALID_ARGUMENTS);
    let removed = raw
        .call_framed(opcode::DELETE, &majority, &[], b"doc", b"")
        .await;
    assert_eq!(removed.status, status::SUCCESS);
}

#[tokio::test]
async fn data_operations_answer_tmpfail_while_the_handshake_still_works() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let mut raw = Raw::to_bucket(&server).await;
    server.faults().set(Fault::TemporaryFailure);
    for opcode in [
        opcode::GET,
        opcode::SET,
        opcode::ADD,
        opcode::REPLACE,
        opcode::DELETE,
    ] {
        let extras: &[u8] = if opcode::is_mutation(opcode) && opcode != opcode::DELETE {
            &FLAGS_AND_EXPIRY
        } else {
            &[]
        };
        let answer = raw.call(opcode, extras, b"doc", b"{}", 0).await;
        assert_eq!(answer.status, status::TMPFAIL, "opcode {opcode:#x}");
    }
    let config = raw.call(opcode::GET_CLUSTER_CONFIG, &[], b"", b"", 0).await;
    assert_eq!(config.status, status::SUCCESS);
    server.faults().clear();
    assert_eq!(
        raw.call(opcode::GET, &[], b"doc", b"", 0).await.status,
        status::KEY_ENOENT,
        "nothing was written"
    );
}

#[tokio::test]
async fn not_my_vbucket_carries_the_bumped_config_get_cluster_config_serves() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let mut raw = Raw::to_bucket(&server).await;
    let config = async |raw: &mut Raw| {
        let answer = raw.call(opcode::GET_CLUSTER_CONFIG, &[], b"", b"", 0).await;
        assert_eq!(answer.status, status::SUCCESS);
        answer.value
    };
    let first: Value = serde_json::from_slice(&config(&mut raw).await).unwrap();
    assert_eq!(first["rev"], 1);

    server.faults().set(Fault::NotMyVbucket);
    let refused = raw.call(opcode::GET, &[], b"doc", b"", 0).await;
    assert_eq!(refused.status, status::NOT_MY_VBUCKET);
    // The very config the SDK bootstraps from, one revision on, same bucket.
    let served = config(&mut raw).await;
    assert_eq!(refused.value, served);
    let bumped: Value = serde_json::from_slice(&served).unwrap();
    assert_eq!(bumped["rev"], 2);
    assert_eq!(bumped["uuid"], first["uuid"]);

    server.faults().clear();
    let answer = raw.call(opcode::GET, &[], b"doc", b"", 0).await;
    assert_eq!(answer.status, status::KEY_ENOENT);
    let settled: Value = serde_json::from_slice(&config(&mut raw).await).unwrap();
    assert_eq!(settled["rev"], 2, "a revision is never taken back");
}

#[tokio::test]
async fn a_frozen_server_answers_what_it_read_once_thawed() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    let mut raw = Raw::to_bucket(&server).await;
    server.faults().set(Fault::Freeze);
    raw.send(opcode::SET, &[], &FLAGS_AND_EXPIRY, b"doc", b"{}", 0)
        .await;
    raw.send(opcode::GET, &[], &[], b"doc", b"", 0).await;
    let mut byte = [0u8; 1];
    let silent = tokio::time::timeout(Duration::from_millis(300), raw.0.peek(&mut byte)).await;
    assert!(silent.is_err(), "a frozen server answers nothing");

    server.faults().clear();
    let late = async {
        let set = raw.receive().await;
        (set.status, raw.receive().await)
    };
    let (set, get) = tokio::time::timeout(Duration::from_secs(5), late)
        .await
        .expect("answered once thawed");
    assert_eq!((set, get.status), (status::SUCCESS, status::SUCCESS));
    assert_eq!(get.value, b"{}", "in order: the write, then the read");
}

#[tokio::test]
async fn a_write_dropped_mid_way_closes_the_connection_unanswered() {
    let server = TestServer::start(ServerConfig::default()).await.unwrap();
    for applied in [true, false] {
        let mut raw = Raw::to_bucket(&server).await;
        server.faults().set(Fault::DropMidWrite { applied });
        let key = format!("doc-{applied}");
        raw.send(
            opcode::ADD,
            &[],
            &FLAGS_AND_EXPIRY,
            key.as_bytes(),
            b"{}",
            0,
        )
        .await;
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), raw.0.read_to_end(&mut rest));
        assert_eq!(closed.await.expect("closed in time").ok(), Some(0));

        server.faults().clear();
        let mut raw = Raw::to_bucket(&server).await;
        let read = raw.call(opcode::GET, &[], key.as_bytes(), b"", 0).await;
        let expected = if applied {
            status::SUCCESS
        } else {
            status::KEY_ENOENT
        };
        assert_eq!(read.status, expected, "applied: {applied}");
    }
}
