//! The cluster and bucket configurations the SDK bootstraps from. Every
//! field here is one couchbase-core reads; without `mgmt` in a node's
//! services the SDK panics, without `nodes` no node counts as a data node.

use serde_json::{Value, json};

/// vBuckets in the map, all on this one node.
const VBUCKETS: usize = 64;

/// The one port serves KV in plaintext or TLS, as the server was started;
/// it is named for both, so that a `couchbases://` client finds it too.
fn nodes_ext(port: u16) -> Value {
    json!([{
        "services": { "mgmt": 8091, "kv": port, "kvSSL": port },
        "thisNode": true,
        "hostname": "127.0.0.1",
    }])
}

fn capabilities() -> Value {
    json!({ "n1ql": ["enhancedPreparedStatements"] })
}

/// Asked with no bucket selected.
pub fn cluster(port: u16, rev: u64) -> Vec<u8> {
    json!({
        "rev": rev,
        "revEpoch": 1,
        "nodesExt": nodes_ext(port),
        "clusterCapabilitiesVer": [1, 0],
        "clusterCapabilities": capabilities(),
    })
    .to_string()
    .into_bytes()
}

/// Asked with `bucket` selected, and the body of NOT_MY_VBUCKET. `uuid`
/// must stay the same across revisions: it tells the SDK the bucket is the
/// same one.
pub fn bucket(port: u16, rev: u64, bucket: &str, uuid: &str) -> Vec<u8> {
    json!({
        "rev": rev,
        "revEpoch": 1,
        "name": bucket,
        "uuid": uuid,
        "bucketType": "membase",
        "nodeLocator": "vbucket",
        "nodes": [{ "hostname": format!("127.0.0.1:{port}"), "ports": { "direct": port } }],
        "nodesExt": nodes_ext(port),
        "vBucketServerMap": {
            "hashAlgorithm": "CRC",
            "numReplicas": 0,
            "serverList": [format!("127.0.0.1:{port}")],
            "vBucketMap": vec![[0]; VBUCKETS],
        },
        "bucketCapabilitiesVer": "",
        "bucketCapabilities": ["couchapi", "xattr", "dcp", "cbhello", "touch", "cccp", "nodesExt", "collections"],
        "clusterCapabilitiesVer": [1, 0],
        "clusterCapabilities": capabilities(),
    })
    .to_string()
    .into_bytes()
}
