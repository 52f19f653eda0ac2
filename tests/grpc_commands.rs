//! The command service over real gRPC: conflicts, retries, validation,
//! idempotency, health and reflection.

mod support;

use std::collections::BTreeSet;

use reference::pb::{self, expected_version::Kind};
use support::{CommandService, redb_store};
use tonic::Code;
use tonic_types::StatusExt;

fn exact(version: u64) -> Option<pb::ExpectedVersion> {
    Some(pb::ExpectedVersion {
        kind: Some(Kind::Exact(version)),
    })
}

async fn create_file(service: &CommandService, file_id: &str) -> pb::CommandResult {
    service
        .client()
        .await
        .create_file(pb::CreateFileRequest {
            file_id: file_id.into(),
            name: "plan.txt".into(),
            folder_id: "docs".into(),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .result
        .expect("a result")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_renaming_one_file_at_the_same_version_one_wins_one_is_aborted() {
    let (store, _dir) = redb_store();
    let service = CommandService::start(store).await;
    let created = create_file(&service, "f1").await;
    assert_eq!(created.version, 1);

    let (mut alice, mut bob) = (service.client().await, service.client().await);
    let rename = |name: &str| pb::RenameFileRequest {
        file_id: "f1".into(),
        new_name: name.into(),
        expected_version: exact(created.version),
        ..Default::default()
    };
    let (a, b) = tokio::join!(
        alice.rename_file(rename("alice.txt")),
        bob.rename_file(rename("bob.txt"))
    );
    let (won, lost) = match (a, b) {
        (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won.into_inner(), lost),
        other => panic!("expected exactly one winner, got {other:?}"),
    };
    assert_eq!(won.result.unwrap().version, 2);
    assert_eq!(lost.code(), Code::Aborted, "{lost:?}");
    let info = lost.get_details_error_info().expect("ErrorInfo detail");
    assert_eq!(info.reason, "WRONG_EXPECTED_VERSION");
    assert_eq!(info.metadata["stream"], "file-f1");
    assert_eq!(info.metadata["expected"], "1");
    assert_eq!(info.metadata["actual"], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_comments_all_succeed_with_contiguous_versions() {
    let (store, _dir) = redb_store();
    let service = CommandService::start(store).await;
    create_file(&service, "f1").await;

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..50 {
        let mut client = service.client().await;
        calls.spawn(async move {
            client
                .add_comment(pb::AddCommentRequest {
                    file_id: "f1".into(),
                    author: format!("user{i}"),
                    text: format!("comment {i}"),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().result.unwrap().version)
        });
    }
    let mut versions = BTreeSet::new();
    while let Some(joined) = calls.join_next().await {
        let version = joined.unwrap().expect("every comment succeeds");
        assert!(versions.insert(version), "version {version} given twice");
    }
    assert_eq!(versions, (2..=51).collect());
}

#[tokio::test]
async fn invalid_input_is_invalid_argument_naming_each_field() {
    let (store, _dir) = redb_store();
    let service = CommandService::start(store).await;
    let mut client = service.client().await;

    let bad_fields = |status: tonic::Status| -> Vec<String> {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        status
            .get_details_bad_request()
            .expect("BadRequest detail")
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect()
    };

    let status = client
        .create_file(pb::CreateFileRequest {
            request_id: "not-a-uuid".into(),
            file_id: "has space".into(),
            name: "a/b".into(),
            folder_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(status),
        ["request_id", "file_id", "name", "folder_id"]
    );

    let status = client
        .increment_counter(pb::IncrementCounterRequest {
            request_id: "00000000-0000-0000-0000-000000000000".into(),
            counter_id: "c1".into(),
            amount: Some(1),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(status), ["request_id"], "the nil UUID");

    for name in ["", "..", &"x".repeat(256), "tab\tname"] {
        let status = client
            .create_file(pb::CreateFileRequest {
                file_id: "f1".into(),
                name: name.into(),
                folder_id: "docs".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(bad_fields(status), ["name"], "name {name:?}");
    }

    let status = client
        .add_comment(pb::AddCommentRequest {
            file_id: "f1".into(),
            author: "ann".into(),
            text: "x".repeat(4001),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(status), ["text"]);

    let status = client
        .increment_counter(pb::IncrementCounterRequest {
            counter_id: "c".into(),
            amount: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(status), ["amount"]);
}

#[tokio::test]
async fn state_errors_have_their_own_codes() {
    let (store, _dir) = redb_store();
    let service = CommandService::start(store).await;
    let mut client = service.client().await;

    let missing = client
        .delete_file(pb::DeleteFileRequest {
            file_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    create_file(&service, "f1").await;
    let duplicate = client
        .create_file(pb::CreateFileRequest {
            file_id: "f1".into(),
            name: "again.txt".into(),
            folder_id: "docs".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);

    let same_folder = client
        .move_file(pb::MoveFileRequest {
            file_id: "f1".into(),
            to_folder_id: "docs".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(same_folder.code(), Code::FailedPrecondition);

    client
        .delete_file(pb::DeleteFileRequest {
            file_id: "f1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let deleted = client
        .rename_file(pb::RenameFileRequest {
            file_id: "f1".into(),
            new_name: "b.txt".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(deleted.code(), Code::FailedPrecondition);
    let violation = &deleted
        .get_details_precondition_failure()
        .unwrap()
        .violations[0];
    assert_eq!(violation.r#type, "FILE_DELETED");
}

#[tokio::test]
async fn a_repeated_request_id_returns_the_first_response_and_writes_once() {
    let (store, _dir) = redb_store();
    let service = CommandService::start(store.clone()).await;
    let mut client = service.client().await;
    let request = pb::IncrementCounterRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        counter_id: "c1".into(),
        amount: Some(5),
        ..Default::default()
    };
    let first = client
        .increment_counter(request.clone())
        .await
        .unwrap()
        .into_inner();
    let again = client
        .increment_counter(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, again);
    assert_eq!(
        store
            .read_stream("counter-c1", 1, usize::MAX)
            .await
            .unwrap()
            .len(),
        1
    );

    // The same id on another counter is a client bug, not a retry.
    let reused = client
        .increment_counter(pb::IncrementCounterRequest {
            counter_id: "c2".into(),
            ..request
        })
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument);
}

/// A RenameFile that reuses a CreateFile's id must not be answered with the
/// creation's result while the rename silently never happens.
#[tokio::test]
async fn a_request_id_reused_for_a_different_request_is_refused_and_writes_nothing() {
    let (store, _dir) = redb_store();
    let service = CommandService::start(store.clone()).await;
    let mut client = service.client().await;
    let request_id = uuid::Uuid::new_v4().to_string();
    client
        .create_file(pb::CreateFileRequest {
            request_id: request_id.clone(),
            file_id: "f1".into(),
            name: "a.txt".into(),
            folder_id: "root".into(),
        })
        .await
        .unwrap();
    let rename = pb::RenameFileRequest {
        request_id: request_id.clone(),
        file_id: "f1".into(),
        new_name: "b.txt".into(),
        ..Default::default()
    };
    let reused = client.rename_file(rename.clone()).await.unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument, "{reused:?}");
    let violation = &reused.get_details_bad_request().unwrap().field_violations[0];
    assert_eq!(violation.field, "request_id");
    assert!(
        violation.description.contains("different request"),
        "{violation:?}"
    );

    // Same method, same file, other content: also a different request.
    let other_name = client
        .create_file(pb::CreateFileRequest {
            request_id,
            file_id: "f1".into(),
            name: "other.txt".into(),
            folder_id: "root".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(other_name.code(), Code::InvalidArgument);
    assert_eq!(
        store
            .read_stream("file-f1", 1, usize::MAX)
            .await
            .unwrap()
            .len(),
        1
    );

    // With its own id the rename goes through.
    client
        .rename_file(pb::RenameFileRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            ..rename
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn health_reports_serving_and_reflection_v1_lists_the_services() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let (store, _dir) = redb_store();
    let service = CommandService::start(store).await;
    let mut health = HealthClient::new(service.channel().await);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: "scaleout.v1.CommandService".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        if status == ServingStatus::Serving {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {status:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let mut reflection = ServerReflectionClient::new(service.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected answer {answer:?}");
    };
    let names: BTreeSet<_> = list.service.into_iter().map(|s| s.name).collect();
    let expected = BTreeSet::from([
        "scaleout.v1.CommandService".to_owned(),
        "scaleout.v1.ReadService".to_owned(),
        "scaleout.v1.AdminService".to_owned(),
        "grpc.health.v1.Health".to_owned(),
        "grpc.reflection.v1.ServerReflection".to_owned(),
    ]);
    assert_eq!(
        names, expected,
        "exactly what this server serves (no QueryService; AdminService for contention even without a bus)"
    );
}

#[tokio::test]
async fn shutdown_reports_not_serving_before_closing() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let (store, _dir) = redb_store();
    let args = scaleout::config::ServerArgs {
        shutdown_grace: std::time::Duration::from_secs(2),
        ..Default::default()
    };
    let service = CommandService::start_with(store, args).await;
    let mut health = HealthClient::new(service.channel().await);
    service.stopping.cancel();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let status = health
            .check(HealthCheckRequest::default())
            .await
            .expect("the server still answers during the grace period")
            .into_inner()
            .status();
        if status == ServingStatus::NotServing {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {status:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn metrics_count_requests_by_method_and_status() {
    let (store, _dir) = redb_store();
    let service = CommandService::start(store).await;
    create_file(&service, "f1").await;
    let stale = pb::RenameFileRequest {
        file_id: "f1".into(),
        new_name: "b.txt".into(),
        expected_version: exact(9),
        ..Default::default()
    };
    service.client().await.rename_file(stale).await.unwrap_err();

    let page = support::http_get(&service.addr.to_string(), "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for line in [
        r#"scaleout_grpc_requests_total{method="/scaleout.v1.CommandService/CreateFile",code="Ok"} 1"#,
        r#"scaleout_grpc_requests_total{method="/scaleout.v1.CommandService/RenameFile",code="Aborted"} 1"#,
    ] {
        assert!(page.contains(line), "{line} missing from:\n{page}");
    }
}
