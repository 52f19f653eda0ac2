//! Read models rebuilt from history: a new read model is built before it
//! serves; a rebuild under live load switches in one step, losing nothing
//! and never answering with an older view than before; bad requests are
//! refused with the documented statuses; a killed rebuild resumes.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reference::domain::values::{Amount, FileName, Id};
use reference::domain::{Counter, CounterCommand, File, FileCommand};
use reference::pb::{
    self, command_service_client::CommandServiceClient, query_service_client::QueryServiceClient,
    read_model_service_client::ReadModelServiceClient,
};
use scaleout::command::{Command, CommandHandler, RetryPolicy};
use scaleout::documents::DocumentStore;
use scaleout::documents::redb::RedbDocuments;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

fn command<C>(id: &str, command: C) -> Command<C> {
    Command {
        aggregate_id: Id::parse(id).unwrap(),
        command,
        expected: None,
        request_key: None,
        origin: Default::default(),
    }
}

async fn listener() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

fn lazy(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_lazy()
}

/// Waits (up to 30 s) until `projection`'s read model satisfies `done`.
async fn wait_for_read_model(
    client: &mut ReadModelServiceClient<Channel>,
    projection: &str,
    done: impl Fn(&pb::ReadModel) -> bool,
) -> pb::ReadModel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = client
            .list_read_models(pb::ListReadModelsRequest {})
            .await
            .map(|r| r.into_inner().read_models);
        let found = listed
            .as_ref()
            .ok()
            .and_then(|models| models.iter().find(|m| m.projection == projection));
        if let Some(model) = found.filter(|model| done(model)) {
            return model.clone();
        }
        assert!(Instant::now() < deadline, "{projection}: {listed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A deployment that ran before `file_history` existed gets it: built from
/// the log (through the projector's remote log, frozen here so the build
/// cannot finish yet) while queries for it say so, then serving what a
/// fold of the history gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_read_model_is_built_from_history_before_it_serves() {
    let (store, _dir) = support::redb_store();
    let handler = CommandHandler::new(Arc::clone(&store), RetryPolicy::default());
    let names = ["draft.txt", "review.txt", "final.txt", "final-2.txt"];
    let create = FileCommand::Create {
        name: FileName::parse(names[0]).unwrap(),
        folder_id: Id::parse("docs").unwrap(),
    };
    handler
        .execute::<File>(command("f1", create))
        .await
        .unwrap();
    for name in &names[1..] {
        let rename = FileCommand::Rename {
            new_name: FileName::parse(name).unwrap(),
        };
        handler
            .execute::<File>(command("f1", rename))
            .await
            .unwrap();
    }

    let views = tempfile::tempdir().unwrap();
    let documents: Arc<dyn DocumentStore> =
        Arc::new(RedbDocuments::open(views.path().join("views.redb")).unwrap());
    // What the previous version of the application registered.
    let before = r#"{"projections":["file_view","folder_listing","comment_thread","counter"]}"#;
    documents
        .insert("_read_models", before.as_bytes())
        .await
        .unwrap();

    let stopping = CancellationToken::new();
    let projector = support::ProxiedProjector::start(
        Arc::clone(&store),
        Arc::clone(&documents),
        stopping.clone(),
    )
    .await;
    // The build cannot read the log yet.
    projector.proxy.freeze();
    let (query_listener, query_url) = listener().await;
    let queries = scaleout::app::QueryService {
        app: Arc::new(reference::Reference),
        documents: Arc::clone(&documents),
        max_wait: Duration::from_secs(10),
        server: Default::default(),
    };
    tokio::spawn(scaleout::app::run_query_service(
        query_listener,
        queries,
        stopping.clone(),
    ));

    let mut admin = ReadModelServiceClient::new(lazy(&projector.url));
    let building = wait_for_read_model(&mut admin, "file_history", |m| m.building.is_some()).await;
    assert_eq!(building.serving, 0, "{building:?}");
    assert_eq!(building.building.as_ref().unwrap().generation, 1);
    let others = admin
        .list_read_models(pb::ListReadModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .read_models;
    assert!(
        others
            .iter()
            .filter(|m| m.projection != "file_history")
            .all(|m| m.serving == 1 && m.building.is_none()),
        "the registered read models serve as they are: {others:?}"
    );

    let mut query = QueryServiceClient::new(lazy(&query_url));
    // No deadline of the caller's: the read waits out the service's
    // `max_wait`, as long as the server's request timeout (both 10 s), and
    // still answers with the service's status, not the server's timeout.
    let refused = query
        .get_file_history(pb::GetFileHistoryRequest {
            file_id: "f1".into(),
            min_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("being built"),
        "{}",
        refused.message()
    );
    let info = tonic_types::StatusExt::get_details_error_info(&refused).unwrap();
    assert_eq!(info.reason, "READ_MODEL_BUILDING");

    projector.proxy.thaw();
    let mut read = tonic::Request::new(pb::GetFileHistoryRequest {
        file_id: "f1".into(),
        min_version: 4,
    });
    read.set_timeout(Duration::from_secs(30));
    let history = query.get_file_history(read).await.unwrap().into_inner();
    let folded: Vec<(&str, u64)> = names.iter().zip(1..).map(|(n, v)| (*n, v)).collect();
    let served: Vec<(&str, u64)> = history
        .names
        .iter()
        .map(|n| (n.name.as_str(), n.version))
        .collect();
    assert_eq!(served, folded);
    assert_eq!((history.version, history.earlier_names), (4, 0));
    let built = wait_for_read_model(&mut admin, "file_history", |m| m.building.is_none()).await;
    assert_eq!(built.serving, 1);
    stopping.cancel();
}

/// The embedded platform on `data`.
async fn platform(data: &std::path::Path) -> (Channel, CancellationToken) {
    let (listener, url) = listener().await;
    let stopping = CancellationToken::new();
    let platform = scaleout::app::Platform {
        app: Arc::new(reference::Reference),
        data_dir: data.to_owned(),
        server: Default::default(),
        retry: Default::default(),
        snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
        max_wait: Duration::from_secs(10),
    };
    tokio::spawn(scaleout::app::run_platform(
        listener,
        platform,
        stopping.clone(),
    ));
    (lazy(&url), stopping)
}

/// Counters incremented by 8 clients while `counter` is rebuilt, switched
/// and its old generation dropped: every acknowledged increment is in the
/// final views, and no read after the switch shows a lower count than a
/// read before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_under_live_load_switches_in_one_step_and_loses_nothing() {
    let data = tempfile::tempdir().unwrap();
    let (channel, stopping) = platform(data.path()).await;
    support::wait_for_health(
        channel.clone(),
        "",
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let counters: Vec<String> = (0..20).map(|n| format!("c{n}")).collect();
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let load_stopping = CancellationToken::new();
    let mut load = tokio::task::JoinSet::new();
    for client in 0..8 {
        let (channel, counters, acked, stopping) = (
            channel.clone(),
            counters.clone(),
            Arc::clone(&acked),
            load_stopping.clone(),
        );
        load.spawn(async move {
            let mut commands = CommandServiceClient::new(channel);
            let mut n = client;
            while !stopping.is_cancelled() {
                let counter_id = counters[n % counters.len()].clone();
                n += 3;
                let done = commands
                    .increment_counter(pb::IncrementCounterRequest {
                        counter_id: counter_id.clone(),
                        amount: Some(1),
                        ..Default::default()
                    })
                    .await
                    .expect("increment");
                let version = done.into_inner().result.unwrap().version;
                let mut acked = acked.lock().unwrap();
                let highest = acked.entry(counter_id).or_default();
                *highest = (*highest).max(version);
            }
        });
    }
    // Reads all along: a counter's count never goes down.
    let seen: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let reading = {
        let (channel, counters, seen, stopping) = (
            channel.clone(),
            counters.clone(),
            Arc::clone(&seen),
            load_stopping.clone(),
        );
        tokio::spawn(async move {
            let mut queries = QueryServiceClient::new(channel);
            let mut reads = 0u64;
            while !stopping.is_cancelled() {
                for counter_id in &counters {
                    let Ok(view) = queries
                        .get_counter(pb::GetCounterRequest {
                            counter_id: counter_id.clone(),
                            min_version: 0,
                        })
                        .await
                    else {
                        continue; // not created yet
                    };
                    let count = view.into_inner().count;
                    let mut seen = seen.lock().unwrap();
                    let before = seen.entry(counter_id.clone()).or_default();
                    assert!(
                        count >= *before,
                        "{counter_id} went back from {before} to {count}"
                    );
                    *before = count;
                    reads += 1;
                }
            }
            reads
        })
    };
    let mut admin = ReadModelServiceClient::new(channel.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let unknown = admin
        .rebuild(pb::RebuildRequest {
            projection: "nope".into(),
            switch_when_ready: false,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    let started = admin
        .rebuild(pb::RebuildRequest {
            projection: "counter".into(),
            switch_when_ready: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.generation, 2);
    let again = admin
        .rebuild(pb::RebuildRequest {
            projection: "counter".into(),
            switch_when_ready: false,
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    assert!(again.message().contains("already building generation 2"));
    // Its builder records progress only after its first second.
    let early = admin
        .switch(pb::SwitchRequest {
            projection: "counter".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition, "{early:?}");
    let serving = admin
        .drop_generation(pb::DropGenerationRequest {
            projection: "counter".into(),
            generation: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(serving.code(), Code::FailedPrecondition, "{serving:?}");

    let ready = wait_for_read_model(&mut admin, "counter", |m| {
        m.building.as_ref().is_some_and(|b| b.caught_up)
    })
    .await;
    assert_eq!(ready.serving, 1);
    let switched = admin
        .switch(pb::SwitchRequest {
            projection: "counter".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .read_model
        .unwrap();
    assert_eq!((switched.serving, switched.previous), (2, 1));
    // Load goes on through the handover, then the build ends.
    wait_for_read_model(&mut admin, "counter", |m| m.building.is_none()).await;
    load_stopping.cancel();
    while let Some(done) = load.join_next().await {
        done.unwrap();
    }
    assert!(reading.await.unwrap() > 0);

    let mut queries = QueryServiceClient::new(channel.clone());
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), counters.len());
    for (counter_id, version) in &acked {
        let mut read = tonic::Request::new(pb::GetCounterRequest {
            counter_id: counter_id.clone(),
            min_version: *version,
        });
        read.set_timeout(Duration::from_secs(10));
        let view = queries.get_counter(read).await.unwrap().into_inner();
        assert_eq!(
            view.count, view.version,
            "{counter_id}: each increment added 1"
        );
        assert!(view.version >= *version);
    }
    let removed = admin
        .drop_generation(pb::DropGenerationRequest {
            projection: "counter".into(),
            generation: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, counters.len() as u64);
    let verified = admin
        .verify(pb::VerifyRequest {
            projections: vec!["counter".into()],
            repair: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (verified.documents, verified.drifted),
        (counters.len() as u64, 0)
    );
    stopping.cancel();
}

/// `projector rebuild --switch` SIGKILLed twice at random moments, then run
/// to the end: the new generation serves and equals the fold of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rebuild_resumes_and_ends_equal_to_the_fold() {
    let (store, _dir) = support::redb_store();
    let handler = Arc::new(CommandHandler::new(
        Arc::clone(&store),
        RetryPolicy::default(),
    ));
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..8 {
        let handler = Arc::clone(&handler);
        writers.spawn(async move {
            for n in 0..250 {
                let increment = CounterCommand::Increment {
                    amount: Amount::parse(1 + n % 3).unwrap(),
                };
                let id = format!("c{}", (writer * 250 + n) % 50);
                handler
                    .execute::<Counter>(command(&id, increment))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    let log = support::CommandService::start(Arc::clone(&store)).await;
    let views = tempfile::tempdir().unwrap();
    let path = views.path().join("views.redb");
    let args = vec![
        "--event-log".to_owned(),
        log.url(),
        "--document-store".to_owned(),
        format!("redb:{}", path.display()),
        "rebuild".to_owned(),
        "--projection".to_owned(),
        "counter".to_owned(),
        "--switch".to_owned(),
    ];
    for _ in 0..2 {
        let mut rebuild = std::process::Command::new(support::workspace_binary("projector"))
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let after = Duration::from_millis(fastrand::u64(200..1500));
        tokio::time::sleep(after).await;
        rebuild.kill().unwrap(); // SIGKILL
        rebuild.wait().unwrap();
    }
    let finished = tokio::task::spawn_blocking(move || {
        std::process::Command::new(support::workspace_binary("projector"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        finished.status.success(),
        "{}",
        String::from_utf8_lossy(&finished.stderr)
    );

    let documents = RedbDocuments::open(&path).unwrap();
    let (state, _) = scaleout::projection::generation::load(&documents, "counter")
        .await
        .unwrap();
    assert_eq!(state.serving, Some(2), "{state:?}");
    assert!(state.building.is_none());
    let app = reference::Reference;
    let projections = scaleout::projection::choose(
        scaleout::app::Application::projections(&app),
        &["counter".to_owned()],
    )
    .unwrap();
    let verified = scaleout::projection::verify::verify(
        &scaleout::log::StoreLog(Arc::clone(&store)),
        &documents,
        &scaleout::app::Application::known_types(&app),
        &projections,
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        (verified.documents, verified.drifted),
        (50, 0),
        "{verified:?}"
    );
}
