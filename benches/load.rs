//! Cold load of a long aggregate: the first command on a file with 100,000
//! events, by a command handler that has never seen it (a restart, another
//! instance), with snapshots every 100 events beside folding the whole
//! stream, on redb and on PostgreSQL.
//!
//! `cargo bench --bench load` (needs PostgreSQL; `scripts/test.sh` starts it).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::report::{Report, Sample};
use reference::domain::values::{FileName, Id};
use reference::domain::{File, FileCommand, FileEvent};
use reference::pb;
use scaleout::command::{Command, CommandHandler, RetryPolicy};
use scaleout::domain::DomainEvent;
use scaleout::store::postgres::{PostgresConfig, PostgresStore};
use scaleout::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent};
use uuid::Uuid;

/// Events in the file's stream before the measured command.
const EVENTS: u64 = 100_000;
const SNAPSHOT_EVERY: u64 = 100;
/// Events written per append while filling.
const BATCH: u64 = 500;

fn rename(name: &str) -> FileCommand {
    FileCommand::Rename {
        new_name: FileName::parse(name).unwrap(),
    }
}

fn command(id: &str, command: FileCommand) -> Command<FileCommand> {
    Command {
        aggregate_id: Id::parse(id).unwrap(),
        command,
        expected: None,
        request_key: None,
        origin: Default::default(),
    }
}

/// A file whose stream holds [`EVENTS`] events, the last [`SNAPSHOT_EVERY`]
/// of them through a command handler that snapshots, so a snapshot at
/// version [`EVENTS`] is stored as the handler would leave it.
async fn long_file(store: &Arc<dyn EventStore>) -> String {
    let id = format!("f{}", Uuid::now_v7().simple());
    let stream_id = format!("file-{id}");
    let direct = EVENTS - SNAPSHOT_EVERY;
    for first in (0..direct).step_by(BATCH as usize) {
        let events: Vec<NewEvent> = (first..(first + BATCH).min(direct))
            .map(|n| {
                let event = if n == 0 {
                    FileEvent::Created(pb::FileCreated {
                        file_id: id.clone(),
                        name: "name-0.txt".into(),
                        folder_id: "docs".into(),
                    })
                } else {
                    FileEvent::Renamed(pb::FileRenamed {
                        file_id: id.clone(),
                        old_name: format!("name-{}.txt", n - 1),
                        new_name: format!("name-{n}.txt"),
                        folder_id: "docs".into(),
                    })
                };
                NewEvent {
                    event_id: Uuid::now_v7(),
                    event_type: event.event_type(),
                    payload: event.encode(),
                }
            })
            .collect();
        store
            .append(AppendRequest {
                stream_id: stream_id.clone(),
                stream_type: "file".into(),
                expected: match first {
                    0 => ExpectedVersion::NoStream,
                    version => ExpectedVersion::Exact(version),
                },
                events: events.try_into().unwrap(),
                request_key: None,
                metadata: common::metadata(),
            })
            .await
            .unwrap();
    }
    let handler = CommandHandler::new(Arc::clone(store), RetryPolicy::default())
        .with_snapshots_every(SNAPSHOT_EVERY);
    for n in direct..EVENTS {
        handler
            .execute::<File>(command(&id, rename(&format!("name-{n}.txt"))))
            .await
            .unwrap();
    }
    // The snapshot is saved in the background: wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while store
        .load_snapshot(&stream_id)
        .await
        .unwrap()
        .is_none_or(|snapshot| snapshot.version < EVENTS)
    {
        assert!(Instant::now() < deadline, "no snapshot at version {EVENTS}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    id
}

/// The first command on `id` by a new handler: a cold load, then the
/// decision and its append.
async fn cold_command(store: &Arc<dyn EventStore>, id: &str, snapshot_every: u64) -> Sample {
    let handler = CommandHandler::new(Arc::clone(store), RetryPolicy::default())
        .with_snapshots_every(snapshot_every);
    let started = Instant::now();
    handler
        .execute::<File>(command(id, rename(&format!("{}.txt", Uuid::now_v7()))))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    Sample::latencies(vec![elapsed], elapsed)
}

async fn compare(report: &mut Report, name: &str, store: Arc<dyn EventStore>) {
    let id = long_file(&store).await;
    report
        .compare(
            &format!(
                "{name}: first command on a {EVENTS}-event file, snapshots every {SNAPSHOT_EVERY}"
            ),
            "the same, folding the whole stream",
            async || cold_command(&store, &id, 0).await,
            async || cold_command(&store, &id, SNAPSHOT_EVERY).await,
        )
        .await;
}

#[tokio::main]
async fn main() {
    let mut report = Report::start(
        "load",
        "a command handler's cold load of a long stream, with and without snapshots",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.redb");
    compare(&mut report, "redb", common::open_redb(path).await).await;

    let schema = format!("bench_load_{}", Uuid::now_v7().simple());
    let config = PostgresConfig::new(&common::postgres_url()).with_schema(schema.clone());
    let postgres = PostgresStore::connect(config).await.unwrap();
    compare(&mut report, "PostgreSQL", Arc::new(postgres)).await;
    report.finish();
    common::drop_schema(&schema).await;
}
