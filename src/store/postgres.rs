//! The PostgreSQL event store: several processes can share one database.
//!
//! `writers` tasks (one unless configured), each with its own connection and
//! its own partition of the group commit queue (streams are spread over
//! them), commit each batch in one transaction. A batch locks the rows of
//! the streams it touches (in stream id order, so writers never deadlock on
//! them), loads their versions and the request ids it carries, asks `plan`
//! and writes. A stream or request id that another writer creates after those
//! reads is caught by a primary key; the batch then rolls back and is redone,
//! and this time it reads the winner's rows.
//!
//! Reads share one connection, on which tokio-postgres pipelines concurrent
//! queries.

use std::collections::BTreeMap;
use std::error::Error as _;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::{Mutex, Notify};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::tls::ServerCheck;
use uuid::Uuid;

use super::plan::{BatchState, Planned, plan};
use super::{
    AppendOutcome, AppendRequest, AppendResult, EventMetadata, EventStore, Fingerprint, LogFilter,
    LogPage, NewEvent, RecordedEvent, RecordedRequest, RequestId, Snapshot, StoreError,
    page_window,
};
use super::{Batches, Pending, Submitter, answer, answer_all, appends, submit, writes};
use crate::backoff::Backoff;
use crate::group_commit;

/// How long opening a connection (and preparing its statements) or a ping
/// may take before the server counts as unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts at a batch that keeps losing races with other writers.
const MAX_ATTEMPTS: u32 = 5;
/// Bounds of the pause between reconnection attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Pauses before redoing a batch that lost a race with another process.
const CONFLICT_BACKOFF: Backoff =
    Backoff::racing(Duration::from_millis(2), Duration::from_millis(50));
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Serializes migrations of processes starting at once ("scaleout" in ASCII).
const MIGRATION_LOCK: i64 = 0x7363_616c_656f_7574;
/// With the schema's hash, names the advisory lock its outbox relay holds
/// ("so" in ASCII: one lock per schema, so schemas in one database don't
/// compete).
const OUTBOX_LOCK: i32 = 0x736f;

/// The columns [`recorded`] reads, in this order, in `events` and in
/// `outbox JOIN events`.
const EVENT_COLUMNS: &str = "position, stream_id, version, stream_type, event_id, event_type, \
     payload, occurred_at, correlation_id, causation_id, request_id, actor, traceparent";

/// Where and how to connect.
///
/// The URL takes every libpq-style option tokio-postgres knows (`host`,
/// `user`, `password`, `dbname`, `options`, ...) and libpq's `sslmode`:
/// `disable`, `prefer` (TLS if the server offers it), `require` (TLS, the
/// certificate unchecked unless a CA is configured, then as `verify-ca`),
/// `verify-ca` (the chain to the CA) or `verify-full` (the chain and the
/// host name). Without `sslmode`, connections are plain, as before TLS was
/// supported (libpq would try TLS first). Tables live in their own schema,
/// set as each connection's `search_path`.
#[derive(Clone)]
pub struct PostgresConfig {
    url: String,
    schema: String,
    writers: usize,
    /// The CA that `verify-ca` and `verify-full` trust; the system's when `None`.
    ca: Option<PathBuf>,
}

impl PostgresConfig {
    /// Schema `scaleout`, one writer connection.
    ///
    /// One writer gathers every concurrent append into its batches, so each
    /// fsync carries the most. Measured on 2 cores against a local
    /// PostgreSQL, 16 clients appending to their own streams: 1 writer
    /// commits 2.3× as many appends as one transaction per append from 16
    /// connections, 2 writers 1.9×, 4 writers 1.1×, 16 writers 0.5×; more
    /// writers only split the same load into smaller batches.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            schema: "scaleout".to_owned(),
            writers: 1,
            ca: None,
        }
    }

    /// Trusts the CA in this PEM file for the server's certificate.
    pub fn with_ca(mut self, ca: Option<PathBuf>) -> Self {
        self.ca = ca;
        self
    }

    /// The schema holding the tables; only `a-z`, `0-9` and `_` are allowed.
    pub fn with_schema(mut self, schema: String) -> Self {
        self.schema = schema;
        self
    }

    /// How many batches commit at once, each on its own connection (at least 1).
    pub fn with_writers(mut self, writers: usize) -> Self {
        self.writers = writers.max(1);
        self
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("PostgresConfig");
        // The URL may hold a password; the parsed config's Debug redacts it.
        match self.url.parse::<tokio_postgres::Config>() {
            Ok(parsed) => debug.field("url", &parsed),
            Err(_) => debug.field("url", &"<invalid>"),
        };
        debug
            .field("schema", &self.schema)
            .field("writers", &self.writers)
            .field("ca", &self.ca)
            .finish()
    }
}

/// The PostgreSQL-backed [`EventStore`].
#[derive(Debug)]
pub struct PostgresStore {
    // Dropping the submitter ends every writer task, which closes its connection.
    submitter: Submitter,
    connector: Arc<Connector>,
    reader: Mutex<Arc<Reader>>,
    schema: String,
    /// The connection whose session holds the outbox lease, while held.
    lease: Mutex<Option<Client>>,
    appended: Arc<Notify>,
}

impl PostgresStore {
    /// Connects, creates the schema and its tables if missing, and starts the
    /// writers. Fails with [`StoreError::Unavailable`] when the server cannot
    /// be reached.
    pub async fn connect(config: PostgresConfig) -> Result<Self, StoreError> {
        let connector = Arc::new(Connector::new(&config)?);
        migrate(&connector, &config.schema).await?;
        let reader = Reader::open(&connector).await?;
        let (submitter, partitions) = group_commit::queue(config.writers);
        let appended = Arc::new(Notify::new());
        for batches in partitions {
            let writer = Writer::open(&connector).await?;
            tokio::spawn(write_loop(
                Arc::clone(&connector),
                batches,
                writer,
                Arc::clone(&appended),
            ));
        }
        Ok(Self {
            submitter,
            connector,
            reader: Mutex::new(Arc::new(reader)),
            schema: config.schema,
            lease: Mutex::new(None),
            appended,
        })
    }

    /// The read connection, replaced first if it has closed.
    async fn reader(&self) -> Result<Arc<Reader>, StoreError> {
        let mut reader = self.reader.lock().await;
        if reader.client.is_closed() {
            *reader = Arc::new(Reader::open(&self.connector).await?);
        }
        Ok(Arc::clone(&reader))
    }
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn append_chain(
        &self,
        chain: Vec<AppendRequest>,
    ) -> Vec<Result<AppendOutcome, StoreError>> {
        submit(&self.submitter, chain).await
    }

    async fn read_stream(
        &self,
        stream_id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let reader = self.reader().await?;
        // Past bigint's range no version exists, so reading from its top reads nothing.
        let from_version = saturating_i64(from_version);
        let limit = saturating_i64(limit as u64);
        let rows = reader
            .client
            .query(&reader.read_stream, &[&stream_id, &from_version, &limit])
            .await
            .map_err(StoreError::from)?;
        Ok(rows.iter().map(recorded).collect::<Result<_, _>>()?)
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<LogPage, StoreError> {
        let reader = self.reader().await?;
        // Everything up to the head read here has committed (see the module
        // doc), so the page below cannot miss an event in its range.
        let head_row = reader
            .client
            .query_one(&reader.head, &[])
            .await
            .map_err(StoreError::from)?;
        let head = to_u64(head_row.try_get(0).map_err(StoreError::from)?)?;
        // A tight range keeps the plan an index range scan, even before the
        // table has statistics.
        let (from, window) = page_window(from_position, limit, filter, head);
        let mut page = LogPage {
            events: Vec::new(),
            next_position: from,
            head,
        };
        let Some(window) = window else {
            return Ok(page);
        };
        let last = *window.end();
        let params: [Param; 5] = [
            &saturating_i64(from),
            &saturating_i64(last),
            &filter.stream_types,
            &filter.event_types,
            &saturating_i64(limit as u64),
        ];
        let rows = reader
            .client
            .query(&reader.read_all, &params)
            .await
            .map_err(StoreError::from)?;
        page.events = rows.iter().map(recorded).collect::<Result<_, _>>()?;
        page.next_position = match page.events.last() {
            Some(event) if page.events.len() == limit => event.position + 1,
            _ => last + 1,
        };
        Ok(page)
    }

    async fn find_request(
        &self,
        request_id: RequestId,
    ) -> Result<Option<RecordedRequest>, StoreError> {
        let reader = self.reader().await?;
        let row = reader
            .client
            .query_opt(&reader.find_request, &[&request_id.0])
            .await
            .map_err(StoreError::from)?;
        Ok(row.as_ref().map(recorded_request).transpose()?)
    }

    async fn read_outbox(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let reader = self.reader().await?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = reader
            .client
            .query(&reader.read_outbox, &[&after, &limit])
            .await
            .map_err(StoreError::from)?;
        Ok(rows.iter().map(recorded).collect::<Result<_, _>>()?)
    }

    async fn lease_outbox(&self) -> Result<bool, StoreError> {
        let mut lease = self.lease.lock().await;
        if lease.as_ref().is_some_and(|client| !client.is_closed()) {
            return Ok(true);
        }
        // A session-level advisory lock: held until this connection ends, so
        // a relay that dies hands the outbox over with its connection.
        let client = within_timeout(self.connector.connect()).await?;
        let row = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&OUTBOX_LOCK, &self.schema],
            )
            .await
            .map_err(StoreError::from)?;
        let held: bool = row.get(0);
        *lease = held.then_some(client);
        Ok(held)
    }

    async fn delete_outbox(&self, positions: &[u64]) -> Result<(), StoreError> {
        let positions = positions
            .iter()
            .map(|&p| i64::try_from(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| StoreError::backend("outbox position out of range"))?;
        let reader = self.reader().await?;
        reader
            .client
            .execute(&reader.delete_outbox, &[&positions])
            .await
            .map_err(StoreError::from)?;
        Ok(())
    }

    fn appended(&self) -> &Notify {
        &self.appended
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let reader = self.reader().await?;
        tokio::time::timeout(CONNECT_TIMEOUT, reader.client.batch_execute("SELECT 1"))
            .await
            .map_err(|_| StoreError::unavailable("PostgreSQL did not answer a ping"))?
            .map_err(StoreError::from)?;
        Ok(())
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        let reader = self.reader().await?;
        let params: [Param; 4] = [
            &snapshot.stream_id,
            &to_i64(snapshot.version)?,
            &i64::from(snapshot.shape),
            &snapshot.state,
        ];
        reader
            .client
            .execute(&reader.save_snapshot, &params)
            .await
            .map_err(StoreError::from)?;
        Ok(())
    }

    async fn load_snapshot(&self, stream_id: &str) -> Result<Option<Snapshot>, StoreError> {
        let reader = self.reader().await?;
        let Some(row) = reader
            .client
            .query_opt(&reader.load_snapshot, &[&stream_id])
            .await
            .map_err(StoreError::from)?
        else {
            return Ok(None);
        };
        let shape: i64 = row.try_get(1).map_err(StoreError::from)?;
        Ok(Some(Snapshot {
            stream_id: stream_id.to_owned(),
            version: to_u64(row.try_get(0).map_err(StoreError::from)?)?,
            shape: u32::try_from(shape)
                .map_err(|_| StoreError::backend(format!("snapshot shape {shape}")))?,
            state: row.try_get(2).map_err(StoreError::from)?,
        }))
    }
}

/// Opens connections whose `search_path` is the store's schema, over TLS
/// as the URL's `sslmode` says.
struct Connector {
    pg: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("pg", &self.pg)
            .finish_non_exhaustive()
    }
}

impl Connector {
    fn new(config: &PostgresConfig) -> Result<Self, StoreError> {
        let schema = &config.schema;
        let valid = !schema.is_empty()
            && schema.len() <= 63
            && schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(StoreError::backend(format!(
                "invalid PostgreSQL schema {schema:?}: use 1 to 63 of a-z, 0-9 and _"
            )));
        }
        // tokio-postgres knows `require` at most: how much is checked is
        // the TLS configuration's business.
        let (url, check) = if config.url.contains("sslmode=verify-full") {
            let url = config.url.replace("sslmode=verify-full", "sslmode=require");
            (url, ServerCheck::ChainAndName)
        } else if config.url.contains("sslmode=verify-ca") || config.ca.is_some() {
            let url = config.url.replace("sslmode=verify-ca", "sslmode=require");
            (url, ServerCheck::Chain)
        } else {
            (config.url.clone(), ServerCheck::Nothing)
        };
        let mut pg: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::backend(format!("invalid PostgreSQL URL: {}", describe(&e)))
        })?;
        if !url.contains("sslmode=") {
            pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        let tls = crate::tls::client_config(check, config.ca.as_deref())
            .map_err(|e| StoreError::backend(format!("PostgreSQL TLS: {e}")))?;
        // Appended last, so it wins over a search_path the URL's options may set.
        let search_path = format!("-c search_path={schema}");
        let options = match pg.get_options() {
            Some(options) => format!("{options} {search_path}"),
            None => search_path,
        };
        pg.options(options);
        Ok(Self {
            pg,
            tls: MakeRustlsConnect::new(tls),
        })
    }

    /// A new connection, its I/O driven by a task of its own.
    async fn connect(&self) -> Result<Client, StoreError> {
        let (client, connection) = self
            .pg
            .connect(self.tls.clone())
            .await
            .map_err(|e| StoreError::unavailable(describe(&e)).caused_by(e))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(error = %describe(&error), "PostgreSQL connection lost");
            }
        });
        Ok(client)
    }
}

/// Runs `open` within [`CONNECT_TIMEOUT`].
async fn within_timeout<T>(
    open: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| {
            StoreError::unavailable(format!(
                "no connection to PostgreSQL within {CONNECT_TIMEOUT:?}"
            ))
        })?
}

/// Creates the schema and tables if missing, once even when several processes
/// start together: the advisory lock makes the others wait for the first.
async fn migrate(connector: &Connector, schema: &str) -> Result<(), StoreError> {
    let mut client = within_timeout(connector.connect()).await?;
    let txn = client.transaction().await.map_err(StoreError::from)?;
    txn.batch_execute(&format!(
        r#"
        SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
        CREATE SCHEMA IF NOT EXISTS "{schema}";
        CREATE TABLE IF NOT EXISTS "{schema}".streams (
            stream_id   text PRIMARY KEY,
            stream_type text NOT NULL,
            version     bigint NOT NULL CHECK (version > 0)
        );
        CREATE TABLE IF NOT EXISTS "{schema}".events (
            position       bigint UNIQUE NOT NULL,
            stream_id      text,
            version        bigint CHECK (version > 0),
            stream_type    text NOT NULL,
            event_id       uuid UNIQUE NOT NULL,
            event_type     text NOT NULL,
            payload        bytea NOT NULL,
            occurred_at    timestamptz NOT NULL,
            correlation_id uuid NOT NULL,
            causation_id   uuid NOT NULL,
            request_id     uuid NULL,
            PRIMARY KEY (stream_id, version)
        );
        CREATE TABLE IF NOT EXISTS "{schema}".outbox (
            position bigint PRIMARY KEY REFERENCES "{schema}".events (position)
        );
        CREATE TABLE IF NOT EXISTS "{schema}".log (
            one  boolean PRIMARY KEY DEFAULT true CHECK (one),
            head bigint NOT NULL
        );
        INSERT INTO "{schema}".log (head)
            SELECT coalesce(max(position), 0) FROM "{schema}".events
            ON CONFLICT DO NOTHING;
        CREATE TABLE IF NOT EXISTS "{schema}".requests (
            request_id uuid PRIMARY KEY,
            stream_id  text NOT NULL,
            version    bigint NOT NULL,
            event_ids  uuid[] NOT NULL
        );
        CREATE TABLE IF NOT EXISTS "{schema}".snapshots (
            stream_id text PRIMARY KEY,
            version   bigint NOT NULL,
            shape     bigint NOT NULL,
            state     bytea NOT NULL
        );
        -- NULL for requests recorded before fingerprints were kept.
        ALTER TABLE "{schema}".requests ADD COLUMN IF NOT EXISTS fingerprint bytea NULL;
        -- Who sent the command; NULL where nobody was authenticated.
        ALTER TABLE "{schema}".events ADD COLUMN IF NOT EXISTS actor text NULL;
        -- The W3C trace context of the append; NULL where none was known.
        ALTER TABLE "{schema}".events ADD COLUMN IF NOT EXISTS traceparent text NULL;
        "#
    ))
    .await
    .map_err(StoreError::from)?;
    txn.commit().await.map_err(StoreError::from)?;
    Ok(())
}

/// The shared read connection and its statements.
#[derive(Debug)]
struct Reader {
    client: Client,
    read_stream: Statement,
    head: Statement,
    read_all: Statement,
    find_request: Statement,
    read_outbox: Statement,
    delete_outbox: Statement,
    save_snapshot: Statement,
    load_snapshot: Statement,
}

impl Reader {
    async fn open(connector: &Connector) -> Result<Self, StoreError> {
        within_timeout(async {
            let client = connector.connect().await?;
            // This connection writes only what a crash may lose with nothing
            // lost: outbox rows of events the broker has confirmed (relayed
            // again at worst, and consumers drop repeats) and snapshots (a
            // cache of the stream). Its commits need not wait for their own
            // WAL flush; the next durable append flushes them anyway.
            client.batch_execute("SET synchronous_commit = off").await?;
            let read_stream = client
                .prepare(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events \
                     WHERE stream_id = $1 AND version >= $2 ORDER BY version LIMIT $3"
                ))
                .await?;
            let head = client.prepare("SELECT head FROM log").await?;
            let read_all = client
                .prepare(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events \
                     WHERE position BETWEEN $1 AND $2 \
                       AND (cardinality($3::text[]) = 0 OR stream_type = ANY($3)) \
                       AND (cardinality($4::text[]) = 0 OR event_type = ANY($4)) \
                     ORDER BY position LIMIT $5"
                ))
                .await?;
            let find_request = client
                .prepare(
                    "SELECT stream_id, version, event_ids, fingerprint FROM requests \
                     WHERE request_id = $1",
                )
                .await?;
            let read_outbox = client
                .prepare(&format!(
                    "SELECT {EVENT_COLUMNS} FROM outbox JOIN events USING (position) \
                     WHERE position > $1 ORDER BY position LIMIT $2"
                ))
                .await?;
            let delete_outbox = client
                .prepare("DELETE FROM outbox WHERE position = ANY($1)")
                .await?;
            // Only a later version replaces a kept snapshot.
            let save_snapshot = client
                .prepare(
                    "INSERT INTO snapshots (stream_id, version, shape, state) \
                     VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (stream_id) DO UPDATE \
                     SET version = excluded.version, shape = excluded.shape, \
                         state = excluded.state \
                     WHERE snapshots.version < excluded.version",
                )
                .await?;
            let load_snapshot = client
                .prepare("SELECT version, shape, state FROM snapshots WHERE stream_id = $1")
                .await?;
            Ok(Self {
                client,
                read_stream,
                head,
                read_all,
                find_request,
                read_outbox,
                delete_outbox,
                save_snapshot,
                load_snapshot,
            })
        })
        .await
    }
}

/// A writer task's connection and its statements.
#[derive(Debug)]
struct Writer {
    client: Client,
    statements: WriteStatements,
}

#[derive(Debug)]
struct WriteStatements {
    lock_streams: Statement,
    find_requests: Statement,
    /// Inserts the events, their outbox rows and the requests they answer.
    insert_events: Statement,
    upsert_streams: Statement,
}

impl Writer {
    async fn open(connector: &Connector) -> Result<Self, StoreError> {
        within_timeout(async {
            let client = connector.connect().await?;
            let statements = WriteStatements {
                lock_streams: client
                    .prepare(
                        "SELECT stream_id, version FROM streams WHERE stream_id = ANY($1) \
                         ORDER BY stream_id FOR UPDATE",
                    )
                    .await?,
                find_requests: client
                    .prepare(
                        "SELECT stream_id, version, event_ids, fingerprint, request_id \
                         FROM requests WHERE request_id = ANY($1)",
                    )
                    .await?,
                // Numbers the events from the log head, which it advances and
                // holds locked until COMMIT (see the module doc); sent last.
                insert_events: client
                    .prepare(
                        "WITH input AS (
                            SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[],
                                $4::uuid[], $5::text[], $6::bytea[], $7::timestamptz[],
                                $8::uuid[], $9::uuid[], $10::uuid[], $11::bytea[], $12::text[],
                                $13::text[])
                                WITH ORDINALITY AS e(stream_id, version, stream_type, event_id,
                                    event_type, payload, occurred_at, correlation_id,
                                    causation_id, request_id, fingerprint, actor, traceparent, n)
                        ), head AS (
                            UPDATE log SET head = head + cardinality($1::text[])
                            RETURNING head - cardinality($1::text[]) AS base
                        ), written AS (
                            INSERT INTO events (position, stream_id, version, stream_type,
                                event_id, event_type, payload, occurred_at, correlation_id,
                                causation_id, request_id, actor, traceparent)
                            SELECT head.base + n, stream_id, version, stream_type, event_id,
                                event_type, payload, occurred_at, correlation_id, causation_id,
                                request_id, actor, traceparent
                            FROM head, input
                            RETURNING position
                        ), outboxed AS (
                            INSERT INTO outbox (position) SELECT position FROM written
                        )
                        INSERT INTO requests (request_id, stream_id, version, event_ids,
                            fingerprint)
                        SELECT request_id, stream_id, max(version),
                            array_agg(event_id ORDER BY version), fingerprint
                        FROM input WHERE request_id IS NOT NULL
                        GROUP BY request_id, stream_id, fingerprint",
                    )
                    .await?,
                upsert_streams: client
                    .prepare(
                        "INSERT INTO streams (stream_id, stream_type, version)
                         SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
                         ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version",
                    )
                    .await?,
            };
            Ok(Self { client, statements })
        })
        .await
    }

    /// Commits a batch, redoing it while it loses races with other writers.
    async fn commit(&mut self, batch: &[Pending]) -> Result<Vec<Planned>, StoreError> {
        let mut attempt = 1;
        loop {
            match self.try_commit(batch).await {
                Err(lost @ StoreError::Contended { .. }) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(error = %lost, attempt, "batch lost a race, redoing it");
                    // Jittered, so that two writers that collided do not collide again.
                    tokio::time::sleep(CONFLICT_BACKOFF.pause(attempt - 1)).await;
                    attempt += 1;
                }
                Err(StoreError::Contended { context, cause }) => {
                    return Err(StoreError::Contended {
                        context: format!(
                            "still losing races after {MAX_ATTEMPTS} attempts: {context}"
                        ),
                        cause,
                    });
                }
                outcome => return outcome,
            }
        }
    }

    /// One transaction in two round trips (and PostgreSQL's flush): lock
    /// and load, then plan, write and commit. A failed statement rolls the
    /// transaction back.
    async fn try_commit(&mut self, batch: &[Pending]) -> Result<Vec<Planned>, StoreError> {
        let requests = || appends(batch);
        let statements = &self.statements;
        let stream_ids: Vec<&str> = requests().map(|r| r.stream_id.as_str()).collect();
        let request_ids: Vec<Uuid> = requests()
            .filter_map(|r| r.request_key)
            .map(|key| key.id.0)
            .collect();

        let client = &self.client;
        // Pipelined, and run in this order: BEGIN goes out with the first
        // statements, and the requests are read once the stream locks are
        // held, so they include what their last holder wrote.
        let (lock_params, find_params): ([Param; 1], [Param; 1]) = ([&stream_ids], [&request_ids]);
        let (begun, streams, found) = tokio::join!(
            biased;
            client.batch_execute("BEGIN"),
            client.query(&statements.lock_streams, &lock_params),
            client.query(&statements.find_requests, &find_params),
        );
        let loaded = (|| {
            begun?;
            batch_state(&streams?, &found?)
        })();
        let state = match loaded {
            Ok(state) => state,
            Err(error) => return rolled_back(client, error).await,
        };
        let planned = plan(batch.iter().map(|p| p.write.as_slice()), state);

        let columns = (|| {
            let mut events = EventColumns::default();
            let mut streams = BTreeMap::new();
            for (request, first_version, result) in writes(batch, &planned) {
                for (version, event) in (first_version..).zip(request.events.as_slice()) {
                    events.push(request, to_i64(version)?, event);
                }
                streams.insert(
                    request.stream_id.as_str(),
                    (request.stream_type.as_str(), to_i64(result.version)?),
                );
            }
            Ok((events, streams))
        })();
        let (events, streams) = match columns {
            Ok(columns) => columns,
            Err(error) => return rolled_back(client, error).await,
        };
        if streams.is_empty() {
            client.batch_execute("COMMIT").await?;
            return Ok(planned);
        }
        let (ids, (types, versions)): (Vec<&str>, (Vec<&str>, Vec<i64>)) =
            streams.into_iter().unzip();
        // Pipelined, and run in this order: a stream another writer has just
        // created collides on the events' primary key, before the upsert
        // could overwrite its version. COMMIT goes out with them: after a
        // failed statement PostgreSQL rolls the transaction back instead.
        let event_params = events.params();
        let stream_params: [Param; 3] = [&ids, &types, &versions];
        let (inserted, upserted, committed) = tokio::join!(
            biased;
            client.execute(&statements.insert_events, &event_params),
            client.execute(&statements.upsert_streams, &stream_params),
            client.batch_execute("COMMIT"),
        );
        inserted?;
        upserted?;
        committed?;
        Ok(planned)
    }
}

/// Ends the batch's open transaction (if it began) after `error`, so that
/// the connection is ready for the next batch.
async fn rolled_back<T>(client: &Client, error: StoreError) -> Result<T, StoreError> {
    let _ = client.batch_execute("ROLLBACK").await;
    Err(error)
}

/// What a batch plans on: its streams' versions (rows of `lock_streams`)
/// and the requests already answered (rows of `find_requests`).
fn batch_state(
    streams: &[tokio_postgres::Row],
    found: &[tokio_postgres::Row],
) -> Result<BatchState, StoreError> {
    let mut state = BatchState::default();
    for row in streams {
        state
            .versions
            .insert(row.try_get("stream_id")?, to_u64(row.try_get("version")?)?);
    }
    for row in found {
        let request_id = RequestId(row.try_get("request_id")?);
        state.requests.insert(request_id, recorded_request(row)?);
    }
    Ok(state)
}

/// A statement parameter.
type Param<'a> = &'a (dyn ToSql + Sync);

/// The events a batch writes, column by column, for `unnest`.
#[derive(Default)]
struct EventColumns<'a> {
    stream_id: Vec<&'a str>,
    version: Vec<i64>,
    stream_type: Vec<&'a str>,
    event_id: Vec<Uuid>,
    event_type: Vec<&'a str>,
    payload: Vec<&'a [u8]>,
    occurred_at: Vec<SystemTime>,
    correlation_id: Vec<Uuid>,
    causation_id: Vec<Uuid>,
    request_id: Vec<Option<Uuid>>,
    fingerprint: Vec<Option<&'a [u8]>>,
    actor: Vec<Option<&'a str>>,
    traceparent: Vec<Option<String>>,
}

impl<'a> EventColumns<'a> {
    fn push(&mut self, request: &'a AppendRequest, version: i64, event: &'a NewEvent) {
        self.stream_id.push(&request.stream_id);
        self.version.push(version);
        self.stream_type.push(&request.stream_type);
        self.event_id.push(event.event_id);
        self.event_type.push(&event.event_type);
        self.payload.push(&event.payload);
        self.occurred_at.push(request.metadata.occurred_at);
        self.correlation_id.push(request.metadata.correlation_id);
        self.causation_id.push(request.metadata.causation_id);
        let key = request.request_key.as_ref();
        self.request_id.push(key.map(|key| key.id.0));
        self.fingerprint
            .push(key.map(|key| key.fingerprint.0.as_slice()));
        self.actor.push(request.metadata.actor.as_deref());
        self.traceparent
            .push(request.metadata.trace.map(|trace| trace.to_string()));
    }

    fn params(&self) -> [Param<'_>; 13] {
        [
            &self.stream_id,
            &self.version,
            &self.stream_type,
            &self.event_id,
            &self.event_type,
            &self.payload,
            &self.occurred_at,
            &self.correlation_id,
            &self.causation_id,
            &self.request_id,
            &self.fingerprint,
            &self.actor,
            &self.traceparent,
        ]
    }
}

/// A writer task: commits batches until the store is dropped. A lost
/// connection fails the batch at hand and is reopened for the next one, with
/// a growing pause after each failed attempt.
async fn write_loop(
    connector: Arc<Connector>,
    mut batches: Batches,
    writer: Writer,
    appended: Arc<Notify>,
) {
    let mut writer = Some(writer);
    let mut failed_connects = 0;
    loop {
        let Some(batch) = batches.next().await else {
            return;
        };
        let mut current = match writer.take().filter(|w| !w.client.is_closed()) {
            Some(current) => current,
            None => match Writer::open(&connector).await {
                Ok(reopened) => {
                    failed_connects = 0;
                    reopened
                }
                Err(failure) => {
                    tracing::warn!(error = %failure, "cannot reconnect to PostgreSQL");
                    answer_all(batch, &failure);
                    tokio::time::sleep(reconnect_pause(failed_connects)).await;
                    failed_connects += 1;
                    continue;
                }
            },
        };
        match current.commit(&batch).await {
            Ok(planned) => {
                if planned.iter().any(|p| matches!(p, Planned::Write { .. })) {
                    appended.notify_waiters();
                }
                answer(batch, planned);
                writer = Some(current);
            }
            Err(failure) => {
                tracing::error!(error = %failure, appends = batch.len(), "PostgreSQL commit failed");
                answer_all(batch, &failure);
                if !matches!(failure, StoreError::Unavailable { .. }) {
                    writer = Some(current);
                }
            }
        }
    }
}

/// Exponential from [`RECONNECT_MIN`] up to [`RECONNECT_MAX`], jittered so
/// that writers do not reconnect in lockstep.
fn reconnect_pause(failed_connects: u32) -> Duration {
    Backoff::waiting(RECONNECT_MIN, RECONNECT_MAX).pause(failed_connects)
}

/// An event from a row of [`EVENT_COLUMNS`], read by index: by name, each
/// column is a search, which costs as much as the rest of the row.
fn recorded(row: &Row) -> Result<RecordedEvent, StoreError> {
    Ok(RecordedEvent {
        position: to_u64(row.try_get(0)?)?,
        stream_id: row.try_get(1)?,
        version: to_u64(row.try_get(2)?)?,
        stream_type: row.try_get(3)?,
        event_id: row.try_get(4)?,
        event_type: row.try_get(5)?,
        payload: row.try_get(6)?,
        metadata: EventMetadata {
            occurred_at: row.try_get(7)?,
            correlation_id: row.try_get(8)?,
            causation_id: row.try_get(9)?,
            actor: row.try_get(11)?,
            // A hint for observers, never a reason to refuse the event.
            trace: row
                .try_get::<_, Option<&str>>(12)?
                .and_then(|text| text.parse().ok()),
        },
        request_id: row.try_get::<_, Option<Uuid>>(10)?.map(RequestId),
    })
}

fn recorded_request(row: &Row) -> Result<RecordedRequest, StoreError> {
    let fingerprint = match row.try_get::<_, Option<&[u8]>>("fingerprint")? {
        None => None,
        Some(bytes) => Some(Fingerprint(bytes.try_into().map_err(|_| {
            StoreError::backend(format!("a request fingerprint of {} bytes", bytes.len()))
        })?)),
    };
    Ok(RecordedRequest {
        result: AppendResult {
            stream_id: row.try_get("stream_id")?,
            version: to_u64(row.try_get("version")?)?,
            event_ids: row.try_get("event_ids")?,
        },
        fingerprint,
    })
}

/// A count or position as a bigint; past its range nothing exists anyway.
fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::backend(format!("negative version or position {n}")))
}

fn to_i64(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::backend(format!("version {n} exceeds bigint")))
}

/// What a transaction that lost a race fails with: a unique key another
/// writer took first, or a serialization failure or deadlock.
const RACES: [&SqlState; 3] = [
    &SqlState::UNIQUE_VIOLATION,
    &SqlState::T_R_SERIALIZATION_FAILURE,
    &SqlState::T_R_DEADLOCK_DETECTED,
];

/// A failed database call, sorted by what to do about it: a lost race is
/// [`StoreError::Contended`] (the batch is redone), a connection that is gone
/// or a server going away [`StoreError::Unavailable`] (a commit in flight may
/// or may not have happened), anything else [`StoreError::Backend`].
impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> Self {
        let context = describe(&error);
        let failure = match error.code() {
            Some(code) if RACES.contains(&code) => Self::Contended {
                context,
                cause: None,
            },
            // Class 08 is connection exceptions, 57P the server shutting down.
            Some(code) if code.code().starts_with("08") || code.code().starts_with("57P") => {
                Self::unavailable(context)
            }
            Some(_) => Self::backend(context),
            None if error.is_closed()
                || error.source().is_some_and(|e| e.is::<std::io::Error>()) =>
            {
                Self::unavailable(context)
            }
            None => Self::backend(context),
        };
        failure.caused_by(error)
    }
}

/// The error with its cause: tokio-postgres' own message only names its kind.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.source() {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}
