//! Flags with environment fallbacks, parsed and validated once by clap.
//!
//! Binaries flatten these groups into their own `Parser`; the kernel receives
//! the typed values and never reads the environment itself.

use std::time::Duration;

/// Limits and shutdown behaviour shared by every gRPC server.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Longest a request may run before it fails with DEADLINE_EXCEEDED
    /// (e.g. `10s`, `500ms`).
    #[arg(long, env = "SCALEOUT_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Largest request accepted, in bytes; larger ones fail with RESOURCE_EXHAUSTED.
    #[arg(long, env = "SCALEOUT_MAX_MESSAGE_BYTES", default_value_t = 1 << 20)]
    pub max_message_bytes: usize,
    /// Most requests served at once on one connection.
    #[arg(long, env = "SCALEOUT_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    pub max_concurrent_requests: usize,
    /// How long to report NOT_SERVING before closing the listener on shutdown,
    /// so that load balancers stop routing here first.
    #[arg(long, env = "SCALEOUT_SHUTDOWN_GRACE", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// A connection that sends no byte this long after it is accepted (not
    /// even the HTTP/2 preface) is closed.
    #[arg(long, env = "SCALEOUT_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// A connection whose peer then sends nothing for this long is closed. A
    /// live HTTP/2 client answers the server's keepalive PING every 30 s, so
    /// only dead, stuck or idle HTTP/1 peers reach it.
    #[arg(long, env = "SCALEOUT_IDLE_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// How often dependencies are probed for health reporting.
    #[arg(long, env = "SCALEOUT_HEALTH_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub health_interval: Duration,
    /// Instead of serving: ask the server already listening on `--listen`
    /// for its gRPC health and exit 0 if SERVING, 1 if not (a container
    /// health check that needs no extra tool). It speaks TLS when the
    /// server does (given the same flags).
    #[arg(long)]
    pub check_health: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
}

/// Bearer-token authentication on a gRPC server; none without a key source.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// Require a bearer token (a JWT) on every call, verified with the
    /// RS256 and ES256 keys of this JWKS file (re-read when it changes).
    #[arg(
        long,
        env = "SCALEOUT_AUTH_JWKS",
        requires = "auth_audience",
        conflicts_with_all = ["auth_public_key", "auth_hs256_secret_file"]
    )]
    pub auth_jwks: Option<std::path::PathBuf>,
    /// Require a bearer token verified with this PEM public key (RSA for
    /// RS256, P-256 for ES256).
    #[arg(
        long,
        env = "SCALEOUT_AUTH_PUBLIC_KEY",
        requires = "auth_audience",
        conflicts_with = "auth_hs256_secret_file"
    )]
    pub auth_public_key: Option<std::path::PathBuf>,
    /// Require a bearer token signed with the HS256 secret in this file (at
    /// least 32 bytes): for development, as whoever can verify can also sign.
    #[arg(
        long,
        env = "SCALEOUT_AUTH_HS256_SECRET_FILE",
        requires = "auth_audience"
    )]
    pub auth_hs256_secret_file: Option<std::path::PathBuf>,
    /// The audience a token must name (`aud`).
    #[arg(long, env = "SCALEOUT_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,
    /// The issuer a token must name (`iss`); any when unset.
    #[arg(long, env = "SCALEOUT_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,
    /// What needs a token too (comma-separated): health, reflection,
    /// metrics. They are open by default, for probes, tools and scrapers.
    #[arg(long, env = "SCALEOUT_AUTH_PROTECT", value_delimiter = ',', value_enum)]
    pub auth_protect: Vec<Unprotected>,
}

/// What a server with authentication leaves open unless protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Unprotected {
    Health,
    Reflection,
    Metrics,
}

impl ServerArgs {
    /// How grpcurl reaches a server at `address`, for the line a binary logs
    /// when it starts serving.
    pub fn grpcurl_target(&self, address: std::net::SocketAddr) -> String {
        match (&self.tls.tls_cert, &self.tls.tls_client_ca) {
            (None, _) => format!("-plaintext {address}"),
            (Some(_), None) => format!("-cacert YOUR_CA.crt {address}"),
            (Some(_), Some(_)) => {
                format!("-cacert YOUR_CA.crt -cert CLIENT.crt -key CLIENT.key {address}")
            }
        }
    }
}

/// TLS on a gRPC server; plaintext without `--tls-cert`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Serve TLS with this PEM certificate chain (the server's first). Both
    /// files are re-read when they change, so a renewed certificate takes
    /// effect without a restart.
    #[arg(long, env = "SCALEOUT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The certificate's PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "SCALEOUT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Mutual TLS: accept only clients presenting a certificate issued by a
    /// CA in this PEM file. `--check-health` presents the server's own
    /// certificate, which then needs the clientAuth usage from that CA too.
    #[arg(long, env = "SCALEOUT_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
}

impl Default for ServerArgs {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            max_message_bytes: 1 << 20,
            max_concurrent_requests: 1024,
            shutdown_grace: Duration::ZERO,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            health_interval: Duration::from_secs(2),
            check_health: false,
            tls: TlsArgs::default(),
            auth: AuthArgs::default(),
        }
    }
}

/// Where read models live.
#[derive(Debug, Clone, clap::Args)]
pub struct DocumentStoreArgs {
    /// `redb:PATH` (embedded, a file) or a `couchbase://HOST[:PORT]`
    /// (`couchbases://` for TLS) connection string.
    #[arg(
        long,
        env = "SCALEOUT_DOCUMENT_STORE",
        default_value = "redb:data/views.redb"
    )]
    pub document_store: String,
    /// Couchbase user (with a `couchbase://` store).
    #[arg(
        long,
        env = "SCALEOUT_COUCHBASE_USERNAME",
        default_value = "Administrator"
    )]
    pub couchbase_username: String,
    /// Couchbase password.
    #[arg(
        long,
        env = "SCALEOUT_COUCHBASE_PASSWORD",
        default_value = "password",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub couchbase_password: String,
    #[arg(long, env = "SCALEOUT_COUCHBASE_BUCKET", default_value = "scaleout")]
    pub couchbase_bucket: String,
    #[arg(long, env = "SCALEOUT_COUCHBASE_SCOPE", default_value = "_default")]
    pub couchbase_scope: String,
    #[arg(
        long,
        env = "SCALEOUT_COUCHBASE_COLLECTION",
        default_value = "_default"
    )]
    pub couchbase_collection: String,
    /// Bound on every Couchbase call (the SDK itself retries forever).
    #[arg(long, env = "SCALEOUT_COUCHBASE_TIMEOUT", default_value = "2500ms", value_parser = parse_duration)]
    pub couchbase_timeout: Duration,
    /// The PEM CA a `couchbases://` cluster's certificate must chain to
    /// (required with `couchbases://`).
    #[arg(long, env = "SCALEOUT_COUCHBASE_CA")]
    pub couchbase_ca: Option<std::path::PathBuf>,
    /// When Couchbase acknowledges a read-model write. `none`: once the
    /// active node has it in memory — a failover can promote a replica that
    /// never saw it, and views silently go back in time. `majority`: once a
    /// majority of the copies have it in memory. `persist_to_majority`: once
    /// a majority have it on disk. On a one-node cluster the bucket must be
    /// created with `--bucket-replica 0` (then every level is met by that
    /// node); with replicas configured but no nodes to hold them, `majority`
    /// and `persist_to_majority` are impossible and every write fails with
    /// DurabilityImpossible (a permanent error, not "unavailable").
    #[arg(
        long,
        env = "SCALEOUT_COUCHBASE_DURABILITY",
        default_value = "none",
        value_enum
    )]
    pub couchbase_durability: CouchbaseDurability,
}

/// Values of `--couchbase-durability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum CouchbaseDurability {
    None,
    Majority,
    PersistToMajority,
}

impl std::fmt::Display for DocumentStoreArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact(&self.document_store))
    }
}

/// Logging and traces.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// `text` for people, `json` for log pipelines.
    #[arg(long, env = "SCALEOUT_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `scaleout=debug,info`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
    /// Export traces over OTLP/gRPC to this collector, e.g.
    /// `http://127.0.0.1:4317`; unset, no spans are recorded at all.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The share of traces started here that are recorded (0 to 1); a
    /// trace a caller or an upstream service started follows its sampling.
    #[arg(long, env = "SCALEOUT_TRACE_SAMPLE_RATIO", default_value_t = 1.0, value_parser = parse_ratio)]
    pub trace_sample_ratio: f64,
}

fn parse_ratio(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("{value:?} is not a ratio from 0 to 1")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parses `250ms`, `10s`, `2m` or a bare number of seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a duration like 250ms, 10s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "" | "s" => Ok(Duration::from_secs(number)),
        "m" => number
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{value:?} is too long")),
        _ => Err(format!("{value:?}: unknown unit {unit:?} (use ms, s or m)")),
    }
}

/// A connection string with its password replaced, safe to log.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn passwords_never_reach_the_log() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact("postgres://db/x"), "postgres://db/x");
        assert_eq!(redact("redb:data/events.redb"), "redb:data/events.redb");
    }
}
