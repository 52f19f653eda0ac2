//! A test double of Couchbase Server's KV (data) service, in memory, so that
//! the production path — the official `couchbase` SDK over TCP — runs in CI,
//! where no Couchbase Server can be installed.
//!
//! It speaks enough of the memcached binary protocol for the SDK to
//! bootstrap and do key-value CRUD: HELLO (datatype, JSON, xerror, select
//! bucket, alt requests, sync replication, collections — or none),
//! GET_ERROR_MAP (a version 2 map, so the SDK retries ENOMEM and EBUSY as it
//! would against Couchbase Server), SASL with real SCRAM-SHA512 verification
//! and PLAIN, SELECT_BUCKET, GET_CLUSTER_CONFIG for the cluster and a bucket,
//! and GET / SET / ADD / REPLACE / DELETE with true CAS semantics on the
//! default collection. A wrong password is refused with AUTH_ERROR and an
//! unknown bucket with EACCESS, as Couchbase Server does; an unknown opcode
//! gets UNKNOWN_COMMAND; a value above 20 MiB gets E2BIG. Durable writes
//! (a durability frame in an alt request) are checked and applied like
//! plain ones: the one node, with no replicas, meets every level at once.
//!
//! # Faults
//!
//! [`TestServer::faults`] switches a running server into failing, with the
//! SDK connected, and back. What the couchbase 1.1 SDK then surfaces (see
//! `tests/faults.rs`):
//!
//! | [`Fault`] | the SDK |
//! | --- | --- |
//! | `TemporaryFailure` (TMPFAIL) | retries reads and writes without end: a bounded call runs out of time; works again once cleared |
//! | `NotMyVbucket` (the answer carries the config at the bumped `rev`, as GET_CLUSTER_CONFIG serves it) | retries without end, as above |
//! | `Freeze` | waits, without retrying or reconnecting: a bounded call runs out of time. Once cleared, what the server read is answered late, in order: a write whose call timed out is applied then |
//! | `DropMidWrite` | fails the write at once with `OtherFailure("request cancelled: Closed in flight …")` whether or not it was applied, and reconnects |
//!
//! A value above 20 MiB fails at once with `ValueTooLarge`.
//! [`TestServer::requests`] counts requests per opcode, so tests can see
//! retries and reconnections, and [`TestServer::durable_requests`] the
//! writes that asked for durability. A process-level freeze is
//! SIGSTOP on the binary.
//!
//! With [`ServerConfig::tls`], every connection is TLS (what a
//! `couchbases://` client speaks), through OpenSSL as Couchbase Server's,
//! with PLAIN SASL over it as the SDK uses.
//!
//! It does not do: HTTP (management, N1QL, search), named collections,
//! expiry, replicas, subdocument operations, DCP or persistence. It is a
//! protocol peer for tests, not a database.

mod config;
mod connection;
mod faults;
pub mod protocol;
mod scram;
mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_native_tls::TlsAcceptor;

use connection::{Answer, Connection, Shared};
pub use faults::{Fault, Faults};

/// Who may log in, which buckets exist, and whether connections are TLS.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub username: String,
    pub password: String,
    pub buckets: Vec<String>,
    pub tls: Option<TlsIdentity>,
}

/// The certificate chain and private key (PEM) a TLS server presents.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    pub certificate_pem: String,
    pub key_pem: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            username: "Administrator".into(),
            password: "password".into(),
            buckets: vec!["scaleout".into()],
            tls: None,
        }
    }
}

fn acceptor(identity: &TlsIdentity) -> std::io::Result<TlsAcceptor> {
    let invalid = |e: native_tls::Error| std::io::Error::other(format!("TLS identity: {e}"));
    let identity = native_tls::Identity::from_pkcs8(
        identity.certificate_pem.as_bytes(),
        identity.key_pem.as_bytes(),
    )
    .map_err(invalid)?;
    let acceptor = native_tls::TlsAcceptor::new(identity).map_err(invalid)?;
    Ok(TlsAcceptor::from(acceptor))
}

/// A running server; it stops (closing every connection) when dropped.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    faults: Faults,
    requests: Arc<Requests>,
    tls: bool,
    _serving: JoinSet<()>,
}

impl TestServer {
    /// Serves on an ephemeral port of 127.0.0.1.
    pub async fn start(config: ServerConfig) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().expect("a valid address"), config).await
    }

    pub async fn start_on(addr: SocketAddr, config: ServerConfig) -> std::io::Result<Self> {
        let tls = config.tls.as_ref().map(acceptor).transpose()?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Shared {
            store: store::Store::new(&config.buckets),
            config: Arc::new(config),
            port: addr.port(),
            faults: Faults::new(),
            bucket_uuid: format!("{:032x}", fastrand::u128(..)).into(),
        };
        let (faults, requests) = (shared.faults.clone(), Arc::new(Requests::default()));
        let tls_served = tls.is_some();
        let mut serving = JoinSet::new();
        let counting = Arc::clone(&requests);
        serving.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let (shared, counting, tls) = (shared.clone(), Arc::clone(&counting), tls.clone());
                connections.spawn(async move {
                    match tls {
                        None => serve(stream, shared, counting).await,
                        // A client that does not finish the handshake is
                        // simply not served.
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                serve(stream, shared, counting).await;
                            }
                        }
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            addr,
            faults,
            requests,
            tls: tls_served,
            _serving: serving,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the SDK connects with: KV only, on this port
    /// (`couchbases://` for a TLS server).
    pub fn connection_string(&self) -> String {
        let scheme = if self.tls { "couchbases" } else { "couchbase" };
        format!("{scheme}://{}:{}", self.addr.ip(), self.addr.port())
    }

    /// Switches this server's failures on and off, also while clients are
    /// connected.
    pub fn faults(&self) -> Faults {
        self.faults.clone()
    }

    /// How many requests with `opcode` the server has read (answered or
    /// not), on all connections.
    pub fn requests(&self, opcode: u8) -> u64 {
        self.requests.by_opcode[usize::from(opcode)].load(Ordering::SeqCst)
    }

    /// How many of those were mutations that asked for durability.
    pub fn durable_requests(&self) -> u64 {
        self.requests.durable.load(Ordering::SeqCst)
    }
}

/// Requests read.
#[derive(Debug)]
struct Requests {
    by_opcode: [AtomicU64; 256],
    durable: AtomicU64,
}

impl Requests {
    fn count(&self, request: &protocol::Request) {
        self.by_opcode[usize::from(request.opcode)].fetch_add(1, Ordering::SeqCst);
        if protocol::opcode::is_mutation(request.opcode)
            && matches!(protocol::durability(&request.framing), Ok(Some(_)))
        {
            self.durable.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Default for Requests {
    fn default() -> Self {
        Self {
            by_opcode: std::array::from_fn(|_| AtomicU64::new(0)),
            durable: AtomicU64::new(0),
        }
    }
}

/// Answers requests in order until the client goes away, sends garbage or
/// a fault hangs up.
async fn serve<S>(stream: S, shared: Shared, requests: Arc<Requests>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let faults = shared.faults.clone();
    let mut connection = Connection::new(shared);
    let (reader, writer) = tokio::io::split(stream);
    let (mut reader, mut writer) = (BufReader::new(reader), BufWriter::new(writer));
    while let Ok(Some(request)) = protocol::read_request(&mut reader).await {
        requests.count(&request);
        if faults.active() == Some(Fault::Freeze) {
            // What was answered before the freeze still goes out.
            if writer.flush().await.is_err() {
                return;
            }
            faults.thawed().await;
        }
        let response = match connection.handle(&request) {
            Answer::Reply(response) => response,
            Answer::HangUp => {
                let _ = writer.flush().await;
                return;
            }
        };
        if writer.write_all(&response.encode()).await.is_err() {
            return;
        }
        // Flush once nothing more is waiting: pipelined requests share a write.
        if reader.buffer().is_empty() && writer.flush().await.is_err() {
            return;
        }
    }
}
