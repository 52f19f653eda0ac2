//! The bank end to end: the kernel's embedded platform runs it, grpcurl
//! drives it as a user would (reflection, JSON in and out), and the balance
//! read model follows the account's events.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// `grpcurl -plaintext [-d DATA] ADDRESS METHOD`: its JSON answer, or the
/// error text it printed.
fn grpcurl(address: &str, method: &str, data: Option<Value>) -> Result<Value, String> {
    let mut command = Command::new("grpcurl");
    command.arg("-plaintext");
    if let Some(data) = data {
        command.args(["-d", &data.to_string()]);
    }
    let done = command
        .args([address, method])
        .output()
        .expect("grpcurl must be on PATH (scripts/test.sh puts it there)");
    let stdout = String::from_utf8_lossy(&done.stdout).into_owned();
    if done.status.success() {
        Ok(if method == "list" {
            Value::String(stdout)
        } else {
            serde_json::from_str(&stdout).unwrap_or(Value::Null)
        })
    } else {
        Err(stdout + &String::from_utf8_lossy(&done.stderr))
    }
}

async fn start(data: &std::path::Path) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let stopping = CancellationToken::new();
    let platform = scaleout::app::Platform {
        app: std::sync::Arc::new(bank::Bank),
        data_dir: data.to_owned(),
        server: Default::default(),
        retry: Default::default(),
        snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
        max_wait: Duration::from_secs(5),
    };
    tokio::spawn(scaleout::app::run_platform(
        listener,
        platform,
        stopping.clone(),
    ));
    (address, stopping)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_through_the_platform_with_grpcurl() {
    let data = tempfile::tempdir().unwrap();
    let (address, stopping) = start(data.path()).await;
    let call = |method: &str, data: Value| grpcurl(&address, method, Some(data));

    // Wait on reflection, which answers once the server serves.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let listed = loop {
        match grpcurl(&address, "list", None) {
            Ok(listed) => break listed.as_str().unwrap().to_owned(),
            Err(error) => assert!(std::time::Instant::now() < deadline, "{error}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for service in [
        "bank.v1.BankService",
        "bank.v1.BankQueryService",
        "scaleout.v1.ReadService",
    ] {
        assert!(listed.contains(service), "{listed}");
    }
    assert!(!listed.contains("scaleout.v1.CommandService"), "{listed}");

    call(
        "bank.v1.BankService/OpenAccount",
        json!({"account_id": "acc-1", "owner": "Ada"}),
    )
    .unwrap();
    let deposit = json!({
        "request_id": "0b6f4ae8-3c42-4a0f-9c1e-5d0c8f1b2a30",
        "account_id": "acc-1",
        "amount": "500",
    });
    let first = call("bank.v1.BankService/Deposit", deposit.clone()).unwrap();
    let again = call("bank.v1.BankService/Deposit", deposit.clone()).unwrap();
    assert_eq!(first, again, "a repeated request is answered, not redone");
    let reused = call(
        "bank.v1.BankService/Deposit",
        json!({"request_id": deposit["request_id"], "account_id": "acc-1", "amount": "900"}),
    )
    .unwrap_err();
    assert!(reused.contains("InvalidArgument"), "{reused}");

    let withdrawn = call(
        "bank.v1.BankService/Withdraw",
        json!({"account_id": "acc-1", "amount": "200"}),
    )
    .unwrap();
    let short = call(
        "bank.v1.BankService/Withdraw",
        json!({"account_id": "acc-1", "amount": "1000"}),
    )
    .unwrap_err();
    assert!(
        short.contains("FailedPrecondition") && short.contains("INSUFFICIENT_FUNDS"),
        "{short}"
    );
    let unknown = call(
        "bank.v1.BankService/Deposit",
        json!({"account_id": "nobody", "amount": "1"}),
    )
    .unwrap_err();
    assert!(unknown.contains("NotFound"), "{unknown}");

    let version = withdrawn["result"]["version"].as_str().unwrap().to_owned();
    let balance = call(
        "bank.v1.BankQueryService/GetBalance",
        json!({"account_id": "acc-1", "min_version": version}),
    )
    .unwrap();
    assert_eq!(
        balance,
        json!({"accountId": "acc-1", "owner": "Ada", "balance": "300", "version": "3"})
    );
    stopping.cancel();
}
