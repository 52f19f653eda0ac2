//! The statuses gRPC documents for requests a server refuses before any
//! handler runs: too large, undecodable, and out of time.

mod support;

use std::time::Duration;

use scaleout::config::ServerArgs;
use scaleout::pb;
use support::{CommandService, redb_store};
use tonic::Code;

/// `CreateFileRequest` as raw bytes on the wire: whatever `file_id` holds,
/// valid UTF-8 or not.
#[derive(Clone, PartialEq, prost::Message)]
struct RawCreateFile {
    #[prost(bytes = "vec", tag = "1")]
    file_id: Vec<u8>,
}

#[tokio::test]
async fn a_request_over_the_size_limit_is_resource_exhausted() {
    let (store, _dir) = redb_store();
    let args = ServerArgs {
        max_message_bytes: 1024,
        ..ServerArgs::default()
    };
    let service = CommandService::start_with(store, args).await;
    let refused = service
        .client()
        .await
        .create_file(pb::CreateFileRequest {
            file_id: "f1".into(),
            name: "x".repeat(2048),
            folder_id: "docs".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
}

#[tokio::test]
async fn a_string_that_is_not_utf8_is_an_invalid_argument() {
    let (store, _dir) = redb_store();
    let service = CommandService::start(store).await;
    let mut grpc = tonic::client::Grpc::new(service.channel().await);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/scaleout.v1.CommandService/CreateFile",
    );
    let refused = grpc
        .unary::<_, pb::CreateFileResponse, _>(
            tonic::Request::new(RawCreateFile {
                file_id: vec![0x66, 0xff, 0xfe],
            }),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
}

#[tokio::test]
async fn a_call_past_the_request_timeout_is_deadline_exceeded() {
    let data = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stopping = tokio_util::sync::CancellationToken::new();
    let platform = scaleout::app::Platform {
        data_dir: data.path().to_owned(),
        server: ServerArgs {
            request_timeout: Duration::from_millis(300),
            ..ServerArgs::default()
        },
        retry: Default::default(),
        max_wait: Duration::from_secs(5),
    };
    tokio::spawn(scaleout::app::run_platform(
        listener,
        platform,
        stopping.clone(),
    ));
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect_lazy();
    // A version nobody wrote: the query would wait up to --max-wait (5 s).
    let mut queries = pb::query_service_client::QueryServiceClient::new(channel);
    let refused = queries
        .get_counter(pb::GetCounterRequest {
            counter_id: "c".into(),
            min_version: 9,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");
    stopping.cancel();
}
