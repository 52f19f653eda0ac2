//! The statuses gRPC documents for requests a server refuses before any
//! handler runs (too large, undecodable, out of time), and the limits on
//! what a refusal carries back.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use reference::pb;
use scaleout::config::ServerArgs;
use support::{CommandService, redb_store};
use tonic::Code;
use tonic_types::StatusExt;

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

/// The embedded platform on port 0 with `server`: a channel to it, what
/// stops it, and its data directory (kept until the test ends).
async fn platform(
    server: ServerArgs,
) -> (
    tonic::transport::Channel,
    tokio_util::sync::CancellationToken,
    tempfile::TempDir,
) {
    let data = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stopping = tokio_util::sync::CancellationToken::new();
    let platform = scaleout::app::Platform {
        app: std::sync::Arc::new(reference::Reference),
        data_dir: data.path().to_owned(),
        server,
        retry: Default::default(),
        snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
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
    (channel, stopping, data)
}

#[tokio::test]
async fn a_call_past_the_request_timeout_is_deadline_exceeded() {
    let (store, _dir) = redb_store();
    let args = ServerArgs {
        request_timeout: Duration::from_millis(300),
        ..ServerArgs::default()
    };
    let service = CommandService::start_with(store, args).await;
    let mut grpc = tonic::client::Grpc::new(service.channel().await);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/scaleout.v1.CommandService/CreateFile",
    );
    // A call whose message never comes: the handler waits for it until the
    // server gives up on the call.
    let call = grpc.client_streaming::<_, RawCreateFile, pb::CreateFileResponse, _>(
        tonic::Request::new(futures_util::stream::pending()),
        path,
        tonic_prost::ProstCodec::default(),
    );
    let refused = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the server ends the call at its request timeout")
        .unwrap_err();
    assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");
}

#[tokio::test]
async fn a_query_that_waits_past_the_request_timeout_answers_before_it() {
    let (channel, stopping, _data) = platform(ServerArgs {
        request_timeout: Duration::from_millis(300),
        ..ServerArgs::default()
    })
    .await;
    // A version nobody wrote: the query waits, for at most --max-wait (5 s)
    // and less than the request timeout, then says how far the view is.
    let mut queries = pb::query_service_client::QueryServiceClient::new(channel);
    let refused = queries
        .get_counter(pb::GetCounterRequest {
            counter_id: "c".into(),
            min_version: 9,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let info = refused.get_details_error_info().unwrap();
    assert_eq!(info.reason, "VIEW_NOT_CAUGHT_UP");
    assert_eq!(info.metadata.get("wanted").map(String::as_str), Some("9"));
    stopping.cancel();
}

#[tokio::test]
async fn health_and_reflection_keep_the_request_size_limit() {
    let (store, _dir) = redb_store();
    let args = ServerArgs {
        max_message_bytes: 1024,
        ..ServerArgs::default()
    };
    let service = CommandService::start_with(store, args).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(service.channel().await);
    let refused = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "x".repeat(2048),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            service.channel().await,
        );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "x".repeat(2048),
            ),
        ),
    };
    // tonic-reflection ends its stream when a request does not decode,
    // rather than answering with a status: what matters is that the
    // oversized request is never served.
    let answer = match reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
    {
        Ok(mut answers) => answers.get_mut().message().await,
        Err(status) => Err(status),
    };
    assert!(
        !matches!(answer, Ok(Some(_))),
        "an oversized reflection request was served: {answer:?}"
    );
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let (store, _dir) = redb_store();
    let args = ServerArgs {
        handshake_timeout: Duration::from_millis(300),
        ..ServerArgs::default()
    };
    let service = CommandService::start_with(store, args).await;
    let mut silent = tokio::net::TcpStream::connect(service.addr).await.unwrap();
    let mut buf = [0; 64];
    let closed = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await
    .expect("the server closes a silent connection");
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "expected the connection closed, read {closed:?}"
    );

    // A client that spoke keeps its connection past the handshake timeout.
    let mut client = service.client().await;
    let create = |file_id: &str| pb::CreateFileRequest {
        file_id: file_id.into(),
        name: "a.txt".into(),
        folder_id: "docs".into(),
        ..Default::default()
    };
    client.create_file(create("f1")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    client.create_file(create("f2")).await.unwrap();
}

#[tokio::test]
async fn a_listing_waits_for_a_bounded_set_of_file_streams() {
    let (channel, stopping, _data) = platform(ServerArgs::default()).await;
    let mut queries = pb::query_service_client::QueryServiceClient::new(channel);
    let listing = |min_versions: HashMap<String, u64>| pb::ListFolderRequest {
        folder_id: "docs".into(),
        min_versions,
        ..Default::default()
    };
    let too_many = (0..101).map(|n| (format!("file-f{n}"), 1)).collect();
    let huge_key = HashMap::from([(format!("file-{}", "x".repeat(100_000)), 1)]);
    let not_a_file = HashMap::from([("counter-c1".to_owned(), 1)]);
    for asked in [too_many, huge_key, not_a_file] {
        let refused = queries.list_folder(listing(asked)).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().len() < 200, "{}", refused.message());
        let violation = &refused.get_details_bad_request().unwrap().field_violations[0];
        assert_eq!(violation.field, "min_versions");
    }
    stopping.cancel();
}

/// Sends one raw HTTP/2 request to `path` with `content_type` and `body`.
async fn raw_call(
    service: &CommandService,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    use tonic::codegen::Service;
    let mut channel = service.channel().await;
    let request = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("http://{}{path}", service.addr))
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(tonic::body::Body::new(
            String::from_utf8_lossy(&body).into_owned(),
        ))
        .unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .unwrap();
    channel.call(request).await.unwrap()
}

fn grpc_status(response: &tonic::codegen::http::Response<tonic::body::Body>) -> Option<Code> {
    let status = response.headers().get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(status.parse().ok()?))
}

#[tokio::test]
async fn a_request_that_is_not_grpc_is_unsupported_media_type() {
    let (store, _dir) = redb_store();
    let service = CommandService::start(store).await;
    let path = "/scaleout.v1.CommandService/CreateFile";
    let json = raw_call(&service, path, "application/json", b"{}".to_vec()).await;
    assert_eq!(json.status().as_u16(), 415);
    let proto = raw_call(
        &service,
        path,
        "application/grpc+proto",
        vec![0, 0, 0, 0, 0],
    )
    .await;
    assert_eq!(proto.status().as_u16(), 200);
    assert_eq!(
        grpc_status(&proto),
        Some(Code::InvalidArgument),
        "{proto:?}"
    );

    let page = support::http_get(&service.addr.to_string(), "/metrics").await;
    assert!(
        page.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{page}"
    );
}

#[tokio::test]
async fn a_message_cut_short_or_missing_is_an_invalid_argument() {
    let (store, _dir) = redb_store();
    let service = CommandService::start(store).await;
    let path = "/scaleout.v1.CommandService/CreateFile";
    // A frame header promising 100 bytes, followed by 2; and no frame at all.
    for body in [vec![0, 0, 0, 0, 100, 1, 2], vec![]] {
        let response = raw_call(&service, path, "application/grpc", body.clone()).await;
        assert_eq!(
            grpc_status(&response),
            Some(Code::InvalidArgument),
            "{body:?}: {response:?}"
        );
    }
}

#[tokio::test]
async fn a_refusal_quoting_a_long_input_fits_the_headers_clients_accept() {
    use scaleout::pb::read_model_service_client::ReadModelServiceClient;
    use scaleout::pb::read_service_client::ReadServiceClient;

    let (channel, stopping, _data) = platform(ServerArgs::default()).await;
    // Under 8 KiB, the smallest limit on a response's headers among the
    // common gRPC clients; the status and its details both travel there.
    // And the names it would have taken survive the cut.
    let fits = |refused: &tonic::Status, known: &str| {
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        let description = &refused
            .get_details_bad_request()
            .expect("BadRequest")
            .field_violations[0]
            .description;
        assert!(description.ends_with('…'), "{description:?}");
        assert!(description.contains(known), "{description:?}");
        assert!(refused.message().len() + description.len() < 4096);
    };

    let unknown_types = (0..500).map(|i| format!("{i}{}", "t".repeat(1000)));
    let refused = ReadServiceClient::new(channel.clone())
        .read_all(scaleout::pb::ReadAllRequest {
            filter: Some(scaleout::pb::LogFilter {
                stream_types: unknown_types.collect(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    fits(&refused, "known: file, counter");

    let refused = ReadModelServiceClient::new(channel)
        .rebuild(scaleout::pb::RebuildRequest {
            projection: "p".repeat(500_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    fits(&refused, "expected some of file_view, folder_listing");
    stopping.cancel();
}
