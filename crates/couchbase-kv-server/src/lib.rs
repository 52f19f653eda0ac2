//! A test double of Couchbase Server's KV (data) service, in memory, so that
//! the production path — the official `couchbase` SDK over TCP — runs in CI,
//! where no Couchbase Server can be installed.
//!
//! It speaks enough of the memcached binary protocol for the SDK to
//! bootstrap and do key-value CRUD: HELLO (datatype, JSON, xerror, select
//! bucket, collections — or none), GET_ERROR_MAP, SASL with real
//! SCRAM-SHA512 verification and PLAIN, SELECT_BUCKET, GET_CLUSTER_CONFIG for
//! the cluster and a bucket, and GET / SET / ADD / REPLACE / DELETE with true
//! CAS semantics on the default collection. A wrong password is refused with
//! AUTH_ERROR and an unknown bucket with EACCESS, as Couchbase Server does;
//! an unknown opcode gets UNKNOWN_COMMAND.
//!
//! It does not do: TLS, HTTP (management, N1QL, search), named collections,
//! expiry, replicas, durability, subdocument operations, DCP or persistence.
//! It is a protocol peer for tests, not a database.

mod config;
mod connection;
pub mod protocol;
mod scram;
mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Who may log in and which buckets exist.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub username: String,
    pub password: String,
    pub buckets: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            username: "Administrator".into(),
            password: "password".into(),
            buckets: vec!["scaleout".into()],
        }
    }
}

/// A running server; it stops (closing every connection) when dropped.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    _serving: JoinSet<()>,
}

impl TestServer {
    /// Serves on an ephemeral port of 127.0.0.1.
    pub async fn start(config: ServerConfig) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().expect("a valid address"), config).await
    }

    pub async fn start_on(addr: SocketAddr, config: ServerConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let store = store::Store::new(&config.buckets);
        let config = Arc::new(config);
        let mut serving = JoinSet::new();
        serving.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let connection =
                    connection::Connection::new(store.clone(), Arc::clone(&config), addr.port());
                connections.spawn(serve(stream, connection));
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            addr,
            _serving: serving,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the SDK connects with: KV only, on this port.
    pub fn connection_string(&self) -> String {
        format!("couchbase://{}:{}", self.addr.ip(), self.addr.port())
    }
}

/// Answers requests in order until the client goes away or sends garbage.
async fn serve(stream: TcpStream, mut connection: connection::Connection) {
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    let (mut reader, mut writer) = (BufReader::new(reader), BufWriter::new(writer));
    while let Ok(Some(request)) = protocol::read_request(&mut reader).await {
        let response = connection.handle(&request);
        if writer.write_all(&response.encode()).await.is_err() {
            return;
        }
        // Flush once nothing more is waiting: pipelined requests share a write.
        if reader.buffer().is_empty() && writer.flush().await.is_err() {
            return;
        }
    }
}
