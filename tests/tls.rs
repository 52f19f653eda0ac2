//! TLS on a gRPC server, as clients meet it: a client that trusts the
//! server's CA is served; a wrong CA, plaintext, and (under mutual TLS) no
//! client certificate, one from another CA or an expired one are refused;
//! a renewed certificate is served without a restart, a broken one is not
//! taken; a handshake that never finishes is cut off; `--check-health`
//! speaks TLS. Certificates are made here with rcgen.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reference::pb::{self, command_service_client::CommandServiceClient};
use scaleout::config::{ServerArgs, TlsArgs};
use scaleout::grpc::tls::TlsFiles;
use support::CommandService;
use support::certificates::{Authority, Issued};
use tokio::io::AsyncReadExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    // Written beside and renamed, as certificate managers do, so the
    // server never reads half a file.
    let partial = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, contents).unwrap();
    std::fs::rename(&partial, &path).unwrap();
    path
}

/// A command-svc serving TLS with `server`'s files in `dir`, and its store's directory.
async fn serve(
    dir: &Path,
    server: &Issued,
    client_ca: Option<&Authority>,
) -> (CommandService, tempfile::TempDir) {
    let tls = TlsArgs {
        tls_cert: Some(write(dir, "server.crt", &server.cert)),
        tls_key: Some(write(dir, "server.key", &server.key)),
        tls_client_ca: client_ca.map(|ca| write(dir, "client-ca.crt", &ca.pem)),
    };
    let args = ServerArgs {
        handshake_timeout: Duration::from_millis(500),
        tls,
        ..ServerArgs::default()
    };
    let (store, data) = support::redb_store();
    (CommandService::start_with(store, args).await, data)
}

/// A client trusting `ca`, presenting `identity`.
async fn client(
    service: &CommandService,
    ca: &Authority,
    identity: Option<&Issued>,
) -> Result<CommandServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some(issued) = identity {
        tls = tls.identity(Identity::from_pem(&issued.cert, &issued.key));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", service.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(CommandServiceClient::new(channel))
}

/// One command through `client`: the counter's new version, or why not.
async fn increment(
    client: Result<CommandServiceClient<Channel>, tonic::transport::Error>,
) -> Result<u64, String> {
    let mut client = client.map_err(|e| format!("{e:?}"))?;
    let answer = client
        .increment_counter(pb::IncrementCounterRequest {
            counter_id: "tls".into(),
            ..Default::default()
        })
        .await
        .map_err(|status| format!("{status:?}"))?;
    Ok(answer.into_inner().result.unwrap().version)
}

fn files(dir: &Path, client_ca: bool) -> TlsFiles {
    TlsFiles {
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        client_ca: client_ca.then(|| dir.join("client-ca.crt")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_trusts_the_servers_ca_is_served_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (
        Authority::new("scaleout test CA"),
        Authority::new("another CA"),
    );
    let (service, _data) = serve(dir.path(), &ca.issue(false), None).await;

    assert_eq!(increment(client(&service, &ca, None).await).await, Ok(1));
    let wrong_ca = increment(client(&service, &other, None).await).await;
    assert!(
        wrong_ca.is_err(),
        "a server its CA did not issue: {wrong_ca:?}"
    );
    let plaintext =
        increment(CommandServiceClient::connect(format!("http://{}", service.addr)).await).await;
    assert!(plaintext.is_err(), "plaintext to a TLS port: {plaintext:?}");

    let healthy = scaleout::grpc::check_health(
        service.addr,
        Duration::from_secs(5),
        Some(&files(dir.path(), false)),
    )
    .await;
    assert_eq!(healthy, Ok(true));
    // Nothing was written by the refused clients.
    assert_eq!(increment(client(&service, &ca, None).await).await, Ok(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_is_refused_by_clients() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new("scaleout test CA");
    let (service, _data) = serve(dir.path(), &ca.issue(true), None).await;
    let expired = increment(client(&service, &ca, None).await).await;
    assert!(expired.is_err(), "{expired:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_serves_only_clients_with_a_current_certificate_from_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (
        Authority::new("scaleout test CA"),
        Authority::new("another CA"),
    );
    let (service, _data) = serve(dir.path(), &ca.issue(false), Some(&ca)).await;

    for (why, identity) in [
        ("no client certificate", None),
        (
            "a client certificate from another CA",
            Some(other.issue(false)),
        ),
        ("an expired client certificate", Some(ca.issue(true))),
    ] {
        let refused = increment(client(&service, &ca, identity.as_ref()).await).await;
        assert!(refused.is_err(), "{why} was served: {refused:?}");
    }
    let good = ca.issue(false);
    assert_eq!(
        increment(client(&service, &ca, Some(&good)).await).await,
        Ok(1)
    );
    // The health check presents the server's own certificate.
    let healthy = scaleout::grpc::check_health(
        service.addr,
        Duration::from_secs(5),
        Some(&files(dir.path(), true)),
    )
    .await;
    assert_eq!(healthy, Ok(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Authority::new("old CA"), Authority::new("new CA"));
    let (service, _data) = serve(dir.path(), &old_ca.issue(false), None).await;
    assert_eq!(
        increment(client(&service, &old_ca, None).await).await,
        Ok(1)
    );

    let renewed = new_ca.issue(false);
    write(dir.path(), "server.key", &renewed.key);
    write(dir.path(), "server.crt", &renewed.cert);
    let deadline = Instant::now() + Duration::from_secs(20);
    while increment(client(&service, &new_ca, None).await)
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A key that does not match its certificate is not taken: the renewed
    // certificate is still served after the server has seen the change
    // (it checks every 2 s), and a good pair after it is.
    write(dir.path(), "server.key", &old_ca.issue(false).key);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        increment(client(&service, &new_ca, None).await)
            .await
            .is_ok()
    );
    let again = old_ca.issue(false);
    write(dir.path(), "server.crt", &again.cert);
    write(dir.path(), "server.key", &again.key);
    let deadline = Instant::now() + Duration::from_secs(20);
    while increment(client(&service, &old_ca, None).await)
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "a good pair after a broken one was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_finishes_is_cut_off_without_holding_up_others() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new("scaleout test CA");
    let (service, _data) = serve(dir.path(), &ca.issue(false), None).await;
    // Connected, and silent: no ClientHello ever comes.
    let mut silent = tokio::net::TcpStream::connect(service.addr).await.unwrap();
    // Meanwhile another client is served.
    assert_eq!(increment(client(&service, &ca, None).await).await, Ok(1));
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buffer))
        .await
        .expect("the server kept a silent connection open for 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_reads_the_log_over_mutual_tls() {
    use scaleout::grpc::tls::ClientTls;
    use scaleout::log::EventLog;
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new("scaleout test CA");
    let (service, _data) = serve(dir.path(), &ca.issue(false), Some(&ca)).await;
    assert_eq!(
        increment(client(&service, &ca, Some(&ca.issue(false))).await).await,
        Ok(1)
    );

    let url = format!("https://localhost:{}", service.addr.port());
    let ca_file = write(dir.path(), "ca.crt", &ca.pem);
    let identity = ca.issue(false);
    let identity = (
        write(dir.path(), "projector.crt", &identity.cert),
        write(dir.path(), "projector.key", &identity.key),
    );
    let log = |identity| {
        let credentials = scaleout::grpc::Credentials {
            tls: ClientTls {
                ca: Some(ca_file.clone()),
                identity,
            },
            token_file: None,
        };
        scaleout::grpc::RemoteLog::new(&url, Duration::from_secs(5), &credentials).unwrap()
    };
    let page = log(Some(identity))
        .read_all(0, 10, &Default::default())
        .await
        .unwrap();
    assert_eq!(page.events.len(), 1);
    let refused = log(None).read_all(0, 10, &Default::default()).await;
    assert!(
        refused.is_err(),
        "read without a client certificate: {refused:?}"
    );
}

/// A certificate that cannot be read ends a binary before it binds: it
/// never says it serves, and the error names the file.
#[test]
fn a_binary_with_an_unreadable_certificate_refuses_to_start_before_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let key = Authority::new("a CA").issue(false).key;
    let key = write(dir.path(), "server.key", &key);
    let output = std::process::Command::new(support::workspace_binary("command-svc"))
        .args(["--listen", "127.0.0.1:0", "--event-store"])
        .arg(format!("redb:{}", dir.path().join("events.redb").display()))
        .args(["--tls-cert", "/nonexistent/server.crt", "--tls-key"])
        .arg(&key)
        .env("SCALEOUT_LOG_FORMAT", "text")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(!stdout.contains("address="), "it said it serves: {stdout}");
    assert!(stderr.contains("/nonexistent/server.crt"), "{stderr}");
}
