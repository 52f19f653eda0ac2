//! Faults on real processes under load, each ending with the invariant: for
//! every stream, the log holds every acknowledged version, and the view
//! equals the fold of the log (read back through the read API).

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reference::pb::command_service_client::CommandServiceClient;
use reference::pb::query_service_client::QueryServiceClient;
use reference::pb::read_service_client::ReadServiceClient;
use reference::pb::{self};
use scaleout::store::RecordedEvent;
use support::Process;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

const COUNTERS: usize = 20;
const CLIENTS: usize = 16;
const PATIENCE: Duration = Duration::from_secs(60);

fn lazy_channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// Clients incrementing counters in a loop, keeping the highest version
/// each stream was acknowledged at. Calls that fail (the server is dead or
/// restarting) are not acknowledged and are simply tried again.
struct Load {
    acked: Arc<Mutex<HashMap<String, u64>>>,
    stopping: CancellationToken,
    clients: JoinSet<u64>,
}

impl Load {
    fn start(addr: &str) -> Self {
        let acked = Arc::new(Mutex::new(HashMap::new()));
        let stopping = CancellationToken::new();
        let mut clients = JoinSet::new();
        for client in 0..CLIENTS {
            let mut commands = CommandServiceClient::new(lazy_channel(addr));
            let (acked, stopping) = (Arc::clone(&acked), stopping.clone());
            clients.spawn(async move {
                let mut done = 0;
                let mut n = client;
                while !stopping.is_cancelled() {
                    n += 1;
                    let request = pb::IncrementCounterRequest {
                        counter_id: format!("c{}", n % COUNTERS),
                        amount: Some(1),
                        ..Default::default()
                    };
                    match commands.increment_counter(request).await {
                        Ok(response) => {
                            let result = response.into_inner().result.unwrap();
                            let mut acked = acked.lock().unwrap();
                            let version = acked.entry(result.stream_id).or_insert(0);
                            *version = (*version).max(result.version);
                            done += 1;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                done
            });
        }
        Self {
            acked,
            stopping,
            clients,
        }
    }

    /// Acknowledged commands so far.
    fn acknowledged(&self) -> usize {
        self.acked.lock().unwrap().values().sum::<u64>() as usize
    }

    async fn stop(mut self) -> HashMap<String, u64> {
        self.stopping.cancel();
        while self.clients.join_next().await.is_some() {}
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// Waits until `load` has had `n` more commands acknowledged.
async fn wait_for_acks(load: &Load, n: usize) {
    let target = load.acknowledged() + n;
    let started = std::time::Instant::now();
    while load.acknowledged() < target {
        assert!(started.elapsed() < PATIENCE, "the load made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The whole log, through the read API.
async fn read_log(addr: &str) -> Vec<RecordedEvent> {
    let mut reader = ReadServiceClient::new(lazy_channel(addr));
    let mut events = Vec::new();
    let mut from = 0;
    loop {
        let page = reader
            .read_all(pb::ReadAllRequest {
                from_position: from,
                limit: 1000,
                filter: None,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for logged in page.events {
            let envelope = logged.event.unwrap();
            events.push(RecordedEvent::from_envelope(logged.position, envelope).unwrap());
        }
        from = page.next_position;
        if from > page.head_position {
            return events;
        }
    }
}

/// The invariant: every acknowledged version is in the log, and every
/// counter view (read through the query API, waiting for the log's
/// version) equals the fold of the log.
async fn assert_views_equal_the_log(
    log_addr: &str,
    query_addr: &str,
    acked: &HashMap<String, u64>,
) {
    let log = read_log(log_addr).await;
    let positions: Vec<u64> = log.iter().map(|e| e.position).collect();
    assert_eq!(
        positions,
        (1..=log.len() as u64).collect::<Vec<_>>(),
        "the log is dense"
    );
    let mut versions: HashMap<&str, u64> = HashMap::new();
    for event in &log {
        versions.insert(&event.stream_id, event.version);
    }
    for (stream, version) in acked {
        let logged = versions.get(stream.as_str()).copied().unwrap_or(0);
        assert!(
            logged >= *version,
            "{stream}: acknowledged {version}, the log has {logged}"
        );
    }
    let expected = support::projection::fold_log(&log);
    let mut queries = QueryServiceClient::new(lazy_channel(query_addr));
    for (stream, version) in versions {
        let counter_id = stream.strip_prefix("counter-").unwrap().to_owned();
        let mut request = tonic::Request::new(pb::GetCounterRequest {
            counter_id: counter_id.clone(),
            min_version: version,
        });
        request.set_timeout(PATIENCE);
        let view = queries
            .get_counter(request)
            .await
            .unwrap_or_else(|status| panic!("{stream} never reached version {version}: {status:?}"))
            .into_inner();
        let folded = &expected[&format!("counter::{counter_id}")];
        assert_eq!(
            (view.count, view.version),
            (
                folded["count"].as_u64().unwrap(),
                folded["version"].as_u64().unwrap()
            ),
            "{stream}: the view is not the fold of the log"
        );
    }
}

fn platform(addr: &str, data: &std::path::Path) -> Process {
    let args = [
        "--listen".to_owned(),
        addr.to_owned(),
        "--data-dir".to_owned(),
        data.display().to_string(),
    ];
    Process::start("scaleout", &args)
}

/// The embedded platform SIGKILLed twice at random moments under load:
/// after each restart it picks up at its checkpoint, and in the end every
/// acknowledged increment shows in its view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_platform_killed_twice_under_load_loses_nothing() {
    let seed = fastrand::u64(..);
    println!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let data = tempfile::tempdir().unwrap();
    let addr = support::Proxy::free_addr().await.to_string();
    let mut running = platform(&addr, data.path());
    let load = Load::start(&addr);
    for _ in 0..2 {
        wait_for_acks(&load, 200).await;
        tokio::time::sleep(Duration::from_millis(rng.u64(0..1000))).await;
        drop(running); // SIGKILL, mid-whatever
        running = platform(&addr, data.path());
    }
    wait_for_acks(&load, 200).await;
    let acked = load.stop().await;
    assert_views_equal_the_log(&addr, &addr, &acked).await;
    assert!(running.stop().success());
}

/// Heavy process tests run one at a time: on two cores, two of them at once
/// would mostly measure each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The split deployment as processes: command-svc (PostgreSQL, RabbitMQ)
/// on a fixed address so it can be restarted there, two projectors and
/// query-svc on Couchbase through the KV test server, which runs in this
/// test so that its faults can be switched. RabbitMQ and PostgreSQL are
/// reached through proxies this test can cut.
struct Split {
    couchbase: couchbase_kv_server::TestServer,
    command_addr: String,
    command_args: Vec<String>,
    command: Process,
    projector_args: Vec<String>,
    projectors: Vec<Process>,
    query: Process,
    rabbit_proxy: (std::net::SocketAddr, Option<support::Proxy>),
    postgres_proxy: (std::net::SocketAddr, Option<support::Proxy>),
    _cleanup: support::Cleanup,
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

impl Split {
    async fn start() -> Self {
        let couchbase = couchbase_kv_server::TestServer::start(Default::default())
            .await
            .unwrap();
        let rabbit = support::bus::rabbit_config();
        let schema = support::unique_schema("faults");
        let cleanup = support::Cleanup {
            schema: Some(schema.clone()),
            rabbit: Some(rabbit.clone()),
        };
        let rabbit_addr = support::Proxy::free_addr().await;
        let postgres_addr = support::Proxy::free_addr().await;
        let rabbit_proxy = support::Proxy::start(rabbit_addr, "127.0.0.1:5672").await;
        let postgres_proxy = support::Proxy::start(postgres_addr, "127.0.0.1:5432").await;
        let amqp = format!("amqp://guest:guest@{rabbit_addr}/%2f");
        let postgres =
            support::postgres_url().replace("127.0.0.1:5432", &postgres_addr.to_string());
        let command_addr = support::Proxy::free_addr().await.to_string();
        let command_args = strings(&[
            "--listen",
            &command_addr,
            "--event-store",
            &postgres,
            "--postgres-schema",
            &schema,
            "--event-bus",
            &amqp,
            "--event-bus-prefix",
            rabbit.prefix(),
            "--health-interval",
            "500ms",
        ]);
        let command = Process::start("command-svc", &command_args);
        let documents = couchbase.connection_string();
        let projector_args = strings(&[
            "--listen",
            "127.0.0.1:0",
            "--event-bus",
            &amqp,
            "--event-bus-prefix",
            rabbit.prefix(),
            "--event-log",
            &format!("http://{command_addr}"),
            "--document-store",
            &documents,
            "--couchbase-timeout",
            "1s",
            "--sweep-delay",
            "2s",
            "--health-interval",
            "500ms",
        ]);
        let projectors = (0..2)
            .map(|_| Process::start("projector", &projector_args))
            .collect();
        let query = Process::start(
            "query-svc",
            &strings(&[
                "--listen",
                "127.0.0.1:0",
                "--document-store",
                &documents,
                "--couchbase-timeout",
                "1s",
            ]),
        );
        Self {
            couchbase,
            command_addr,
            command_args,
            command,
            projector_args,
            projectors,
            query,
            rabbit_proxy: (rabbit_addr, Some(rabbit_proxy)),
            postgres_proxy: (postgres_addr, Some(postgres_proxy)),
            _cleanup: cleanup,
        }
    }

    fn kill_and_restart_command_svc(&mut self) {
        self.command.kill();
        self.command = Process::start("command-svc", &self.command_args);
    }

    fn kill_and_restart_projector(&mut self, index: usize) {
        self.projectors[index].kill();
        self.projectors[index] = Process::start("projector", &self.projector_args);
    }

    /// Deliveries each projector has handled so far.
    async fn handled(&self) -> Vec<u64> {
        let mut handled = Vec::new();
        for projector in &self.projectors {
            let metrics = projector.http_get("/metrics").await;
            let count = metrics
                .lines()
                .find_map(|line| line.strip_prefix("scaleout_projector_handled_total "))
                .and_then(|n| n.trim().parse().ok())
                .expect("scaleout_projector_handled_total on /metrics");
            handled.push(count);
        }
        handled
    }

    /// The invariant, and nothing parked.
    async fn assert_whole(&self, acked: &HashMap<String, u64>) {
        let started = std::time::Instant::now();
        assert_views_equal_the_log(&self.command_addr, &self.query.addr, acked).await;
        println!(
            "views equal the log {:?} after the load stopped",
            started.elapsed()
        );
        let mut admin = reference::pb::admin_service_client::AdminServiceClient::new(lazy_channel(
            &self.command_addr,
        ));
        let parked = admin
            .list_dead_letters(pb::ListDeadLettersRequest {
                service_type: "projector".into(),
                limit: 10,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .dead_letters;
        assert!(parked.is_empty(), "good events were parked: {parked:?}");
    }

    async fn stop(self) {
        for process in [self.query, self.command]
            .into_iter()
            .chain(self.projectors)
        {
            assert!(process.stop().success());
        }
    }
}

/// A fault's length, from the load's point of view: `duration` of load.
async fn hold(duration: Duration) {
    tokio::time::sleep(duration).await;
}

fn rng() -> fastrand::Rng {
    let seed = fastrand::u64(..);
    println!("seed {seed}");
    fastrand::Rng::with_seed(seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_svc_killed_twice_under_load_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut rng = rng();
    let mut split = Split::start().await;
    let load = Load::start(&split.command_addr);
    for _ in 0..2 {
        wait_for_acks(&load, 300).await;
        tokio::time::sleep(Duration::from_millis(rng.u64(0..1000))).await;
        split.kill_and_restart_command_svc();
    }
    wait_for_acks(&load, 300).await;
    let acked = load.stop().await;
    split.assert_whole(&acked).await;
    split.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_twice_under_load_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut rng = rng();
    let mut split = Split::start().await;
    let load = Load::start(&split.command_addr);
    for _ in 0..2 {
        wait_for_acks(&load, 300).await;
        tokio::time::sleep(Duration::from_millis(rng.u64(0..1000))).await;
        split.kill_and_restart_projector(rng.usize(0..2));
    }
    wait_for_acks(&load, 300).await;
    let acked = load.stop().await;
    split.assert_whole(&acked).await;
    split.stop().await;
}

/// The document store freezes (accepts, never answers) for `freeze` under
/// load: commands go on, projectors pause (health NOT_SERVING) without
/// parking anything, and catch up once it answers.
async fn document_store_frozen(freeze: Duration) {
    use couchbase_kv_server::Fault;
    use tonic_health::pb::health_check_response::ServingStatus;
    let _one = ONE_AT_A_TIME.lock().await;
    let split = Split::start().await;
    let load = Load::start(&split.command_addr);
    wait_for_acks(&load, 300).await;
    split.couchbase.faults().set(Fault::Freeze);
    let projector = lazy_channel(&split.projectors[0].addr);
    support::wait_for_health(projector.clone(), "", ServingStatus::NotServing).await;
    hold(freeze).await;
    let during = load.acknowledged();
    split.couchbase.faults().clear();
    let thawed = std::time::Instant::now();
    wait_for_acks(&load, 300).await;
    let acked = load.stop().await;
    println!("{during} commands acknowledged by the end of a {freeze:?} freeze");
    split.assert_whole(&acked).await;
    println!("caught up {:?} after the freeze ended", thawed.elapsed());
    support::wait_for_health(projector, "", ServingStatus::Serving).await;
    split.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_store_frozen_20_s_is_waited_out() {
    document_store_frozen(Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_store_frozen_60_s_is_waited_out() {
    document_store_frozen(Duration::from_secs(60)).await;
}

/// TMPFAIL for 10 s, then NOT_MY_VBUCKET (with a new config) for 10 s,
/// then connections dropped mid-write, the write applied or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_store_answering_wrongly_is_waited_out() {
    use couchbase_kv_server::Fault;
    let _one = ONE_AT_A_TIME.lock().await;
    let split = Split::start().await;
    let load = Load::start(&split.command_addr);
    for fault in [
        Fault::TemporaryFailure,
        Fault::NotMyVbucket,
        Fault::DropMidWrite { applied: true },
        Fault::DropMidWrite { applied: false },
    ] {
        wait_for_acks(&load, 200).await;
        let lasts = match fault {
            Fault::DropMidWrite { .. } => Duration::from_secs(2),
            _ => Duration::from_secs(10),
        };
        split.couchbase.faults().set(fault);
        hold(lasts).await;
        split.couchbase.faults().clear();
    }
    wait_for_acks(&load, 300).await;
    let acked = load.stop().await;
    split.assert_whole(&acked).await;
    split.stop().await;
}

/// RabbitMQ, then PostgreSQL, unreachable for 10 s each (their proxies
/// cut: the servers themselves are shared with other tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_and_the_database_unreachable_are_waited_out() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut split = Split::start().await;
    let load = Load::start(&split.command_addr);
    wait_for_acks(&load, 300).await;
    split.rabbit_proxy.1 = None;
    hold(Duration::from_secs(10)).await;
    split.rabbit_proxy.1 =
        Some(support::Proxy::start(split.rabbit_proxy.0, "127.0.0.1:5672").await);
    wait_for_acks(&load, 300).await;
    // Every projector consumes again: a worker whose connection died under
    // it must not sit there healthy and idle while the log sweep hides it.
    let before = split.handled().await;
    let started = std::time::Instant::now();
    loop {
        let now = split.handled().await;
        if now.iter().zip(&before).all(|(now, before)| now > before) {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "a projector stopped consuming after the broker came back: {before:?} → {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    split.postgres_proxy.1 = None;
    hold(Duration::from_secs(10)).await;
    split.postgres_proxy.1 =
        Some(support::Proxy::start(split.postgres_proxy.0, "127.0.0.1:5432").await);
    wait_for_acks(&load, 300).await;
    let acked = load.stop().await;
    split.assert_whole(&acked).await;
    split.stop().await;
}
