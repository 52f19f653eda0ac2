//! What integration tests share: a real command-svc on port 0.

#![allow(dead_code)] // each test binary uses its own subset

pub mod bus;

use std::net::SocketAddr;
use std::sync::Arc;

use scaleout::command::RetryPolicy;
use scaleout::config::ServerArgs;
use scaleout::pb::command_service_client::CommandServiceClient;
use scaleout::store::EventStore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A command-svc serving on an ephemeral port until dropped or stopped.
pub struct CommandService {
    pub addr: SocketAddr,
    pub stopping: CancellationToken,
    pub served: JoinHandle<Result<(), scaleout::app::ServeError>>,
}

impl CommandService {
    pub async fn start(store: Arc<dyn EventStore>) -> Self {
        Self::start_with(store, ServerArgs::default()).await
    }

    pub async fn start_with(store: Arc<dyn EventStore>, args: ServerArgs) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stopping = CancellationToken::new();
        let service = scaleout::app::CommandService {
            store,
            bus: None,
            server: args,
            retry: RetryPolicy::default(),
            relay: Default::default(),
        };
        Self::start_service(listener, service, stopping).await
    }

    /// Serves a fully described command-svc on an ephemeral port.
    pub async fn start_full(service: scaleout::app::CommandService) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_service(listener, service, CancellationToken::new()).await
    }

    async fn start_service(
        listener: tokio::net::TcpListener,
        service: scaleout::app::CommandService,
        stopping: CancellationToken,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(scaleout::app::run_command_service(
            listener,
            service,
            stopping.clone(),
        ));
        Self {
            addr,
            stopping,
            served,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client on its own connection.
    pub async fn client(&self) -> CommandServiceClient<Channel> {
        CommandServiceClient::connect(self.url()).await.unwrap()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

impl Drop for CommandService {
    fn drop(&mut self) {
        self.stopping.cancel();
    }
}

/// A redb event store in a fresh temporary directory (kept alive with it).
pub fn redb_store() -> (Arc<dyn EventStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = scaleout::store::redb::RedbStore::open(dir.path().join("events.redb")).unwrap();
    (Arc::new(store), dir)
}

/// The PostgreSQL the tests use (`scripts/test.sh` makes it).
pub fn postgres_url() -> String {
    std::env::var("SCALEOUT_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://scaleout:scaleout@127.0.0.1:5432/scaleout".into())
}

/// A schema name no other test or run uses.
pub fn unique_schema(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

pub async fn drop_schema(schema: &str) {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .unwrap();
}
