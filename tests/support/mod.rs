//! What integration tests share: a real command-svc on port 0.

#![allow(dead_code)] // each test binary uses its own subset

pub mod bus;
pub mod certificates;
pub mod documents;
pub mod naive;
pub mod projection;

use std::net::SocketAddr;
use std::sync::Arc;

use reference::pb::command_service_client::CommandServiceClient;
use scaleout::command::RetryPolicy;
use scaleout::config::ServerArgs;
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
            app: std::sync::Arc::new(reference::Reference),
            store,
            bus: None,
            server: args,
            retry: RetryPolicy::default(),
            snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
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

/// Removes what a test made on the shared servers when it ends, passed or
/// failed: its PostgreSQL schema and its RabbitMQ exchanges and queues.
#[derive(Default)]
pub struct Cleanup {
    pub schema: Option<String>,
    pub rabbit: Option<scaleout::bus::rabbitmq::RabbitConfig>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (schema, rabbit) = (self.schema.take(), self.rabbit.take());
        // Drop may run inside the test's runtime, which cannot block: clean
        // up from a thread with a runtime of its own.
        let cleaning = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Some(schema) = schema {
                    drop_schema(&schema).await;
                }
                if let Some(rabbit) = rabbit {
                    bus::delete_topology(&rabbit).await;
                }
            });
        });
        let _ = cleaning.join();
    }
}

/// Forwards connections on `addr` to `upstream` until dropped; dropping it
/// closes the listener and every forwarded connection: a server going away,
/// for this test only. [`Proxy::freeze`] keeps the connections open but
/// forwards nothing: a server that hangs.
pub struct Proxy {
    frozen: tokio::sync::watch::Sender<bool>,
    _forwarding: tokio::task::JoinSet<()>,
}

impl Proxy {
    pub async fn start(addr: SocketAddr, upstream: &'static str) -> Proxy {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (frozen, gate) = tokio::sync::watch::channel(false);
        let mut forwarding = tokio::task::JoinSet::new();
        forwarding.spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let gate = gate.clone();
                connections.spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, gate.clone()),
                        pump(server_read, client_write, gate),
                    );
                });
            }
        });
        Proxy {
            frozen,
            _forwarding: forwarding,
        }
    }

    /// Stops forwarding (what arrives meanwhile is held) until [`Proxy::thaw`].
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// A free port to proxy on.
    pub async fn free_addr() -> SocketAddr {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    }
}

/// Copies `from` to `to`, holding what it read while `gate` says frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if gate.wait_for(|frozen| !*frozen).await.is_err()
            || to.write_all(&buffer[..read]).await.is_err()
        {
            return;
        }
    }
}

/// Waits (up to 30 s) until `service`'s health on `channel` is `wanted`.
pub async fn wait_for_health(
    channel: Channel,
    service: &str,
    wanted: tonic_health::pb::health_check_response::ServingStatus,
) {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut health = HealthClient::new(channel);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()
            .map(|r| r.into_inner().status());
        if status == Some(wanted) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service:?} is {status:?}, waiting for {wanted:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A binary of this workspace, built beside the test binaries (every
/// `cargo test --workspace` builds them all before running any test).
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let deps = std::env::current_exe().unwrap();
    let path = deps
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap()
        .join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` first",
        path.display()
    );
    path
}

/// A child process of this workspace that logs `address=HOST:PORT` when it
/// serves; killed when dropped.
pub struct Process {
    pub child: std::process::Child,
    pub addr: String,
    binary: String,
    /// The last lines it logged, for the failure message of a process that
    /// would not stop.
    last_lines: Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
}

/// Lines of a process's log kept for a failure message.
const KEPT_LINES: usize = 40;

impl Process {
    pub fn start(binary: &str, args: &[String]) -> Process {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(workspace_binary(binary))
            .args(args)
            .env("SCALEOUT_LOG_FORMAT", "text")
            .env(
                "RUST_LOG",
                "warn,command_svc=info,projector=info,query_svc=info,scaleout=info",
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("{binary} exited before saying where it serves"))
                .unwrap();
            if let Some(rest) = line.split("address=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        let last_lines = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let kept = Arc::clone(&last_lines);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut kept = kept.lock().unwrap();
                if kept.len() == KEPT_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        Process {
            child,
            addr,
            binary: binary.to_owned(),
            last_lines,
        }
    }

    /// SIGTERM, then waits (up to 20 s) for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() >= deadline {
                let lines = self.last_lines.lock().unwrap();
                let log: Vec<&str> = lines.iter().map(String::as_str).collect();
                panic!(
                    "{} (pid {pid}) on {} ignored SIGTERM for 20 s; its last lines:\n{}",
                    self.binary,
                    self.addr,
                    log.join("\n")
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// SIGKILL, and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A plain HTTP GET of `path` on the process's address.
    pub async fn http_get(&self, path: &str) -> String {
        http_get(&self.addr, path).await
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain HTTP/1.1 GET of `path` on `addr`: the whole response, headers included.
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// A projector served in this process with no bus traffic (an in-process
/// bus nobody publishes to) and no sweep (nothing in a test is an hour
/// old), reading `store`'s log through a [`Proxy`] the test can freeze: the
/// read-model service's builds and verifications then only read the log.
pub struct ProxiedProjector {
    /// Where it serves (gRPC: health, ReadModelService).
    pub url: String,
    pub proxy: Proxy,
    _log: CommandService,
}

impl ProxiedProjector {
    pub async fn start(
        store: Arc<dyn EventStore>,
        documents: Arc<dyn scaleout::documents::DocumentStore>,
        stopping: tokio_util::sync::CancellationToken,
    ) -> Self {
        let log = CommandService::start(store).await;
        let upstream = log.url().trim_start_matches("http://").to_owned();
        let proxy_addr = Proxy::free_addr().await;
        let proxy = Proxy::start(proxy_addr, Box::leak(upstream.into_boxed_str())).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let remote = scaleout::grpc::RemoteLog::new(
            &format!("http://{proxy_addr}"),
            std::time::Duration::from_secs(60),
            &Default::default(),
        )
        .unwrap();
        let service = scaleout::app::ProjectorService {
            app: Arc::new(reference::Reference),
            bus: Arc::new(scaleout::bus::memory::MemoryBus::new()),
            documents,
            log: Arc::new(remote),
            sweep_delay: std::time::Duration::from_secs(3600),
            subscription: scaleout::bus::Subscription {
                service_type: "projector".into(),
                bindings: vec!["#".into()],
                prefetch: 10,
                max_attempts: 5,
            },
            projections: Vec::new(),
            workers: 1,
            config: Default::default(),
            server: Default::default(),
        };
        tokio::spawn(scaleout::app::run_projector(listener, service, stopping));
        Self {
            url,
            proxy,
            _log: log,
        }
    }
}
