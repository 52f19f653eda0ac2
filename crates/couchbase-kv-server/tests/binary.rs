//! The server as a process, the way multi-process tests run it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[tokio::test]
async fn the_binary_says_where_it_listens_and_the_sdk_connects() {
    use couchbase::authenticator::PasswordAuthenticator;
    use couchbase::cluster::Cluster;
    use couchbase::options::cluster_options::ClusterOptions;

    let mut child = Command::new(env!("CARGO_BIN_EXE_couchbase-kv-server"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("the listening line")
        .to_owned();

    let options =
        ClusterOptions::new(PasswordAuthenticator::new("Administrator", "password").into());
    let round_trip = async {
        let cluster = Cluster::connect(format!("couchbase://{addr}"), options)
            .await
            .unwrap();
        let collection = cluster.bucket("scaleout").default_collection();
        collection
            .upsert("doc", serde_json::json!({"n": 1}), None)
            .await
            .unwrap();
        let got: serde_json::Value = collection
            .get("doc", None)
            .await
            .unwrap()
            .content_as()
            .unwrap();
        got
    };
    let got = tokio::time::timeout(std::time::Duration::from_secs(20), round_trip)
        .await
        .expect("in time");
    assert_eq!(got, serde_json::json!({"n": 1}));
    child.kill().unwrap();
    child.wait().unwrap();
}
