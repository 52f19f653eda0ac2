//! The embedded platform over real gRPC: every part in one process, reads
//! of one's own writes with `min_version`, and data kept across restarts.

mod support;

use std::time::Duration;

use reference::pb::{
    self, command_service_client::CommandServiceClient, query_service_client::QueryServiceClient,
};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

struct Running {
    url: String,
    stopping: CancellationToken,
    served: tokio::task::JoinHandle<Result<(), scaleout::app::PlatformError>>,
}

async fn start(data_dir: &std::path::Path) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stopping = CancellationToken::new();
    let platform = scaleout::app::Platform {
        app: std::sync::Arc::new(reference::Reference),
        data_dir: data_dir.to_owned(),
        server: Default::default(),
        retry: Default::default(),
        snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
        max_wait: Duration::from_secs(5),
    };
    let served = tokio::spawn(scaleout::app::run_platform(
        listener,
        platform,
        stopping.clone(),
    ));
    Running {
        url,
        stopping,
        served,
    }
}

impl Running {
    async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.stopping.cancel();
        self.served.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_platform_reads_its_writes_and_keeps_them_across_restarts() {
    let data = tempfile::tempdir().unwrap();
    let platform = start(data.path()).await;
    let channel = platform.channel().await;
    let mut commands = CommandServiceClient::new(channel.clone());
    let mut queries = QueryServiceClient::new(channel);

    let created = commands
        .create_file(pb::CreateFileRequest {
            file_id: "f1".into(),
            name: "plan.txt".into(),
            folder_id: "docs".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut commands = commands.clone();
        tasks.spawn(async move {
            commands
                .add_comment(pb::AddCommentRequest {
                    file_id: "f1".into(),
                    author: format!("user{i}"),
                    text: "hi".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .result
                .unwrap()
                .version
        });
    }
    let mut last = created.version;
    while let Some(version) = tasks.join_next().await {
        last = last.max(version.unwrap());
    }
    let mut increments = 0;
    let mut counter_version = 0;
    for _ in 0..30 {
        let result = commands
            .increment_counter(pb::IncrementCounterRequest {
                counter_id: "visits".into(),
                amount: Some(2),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .result
            .unwrap();
        increments += 2;
        counter_version = result.version;
    }

    // Read your writes: the first read with min_version is exact.
    let file = queries
        .get_file(pb::GetFileRequest {
            file_id: "f1".into(),
            min_version: last,
        })
        .await
        .unwrap()
        .into_inner()
        .file
        .unwrap();
    assert_eq!(
        (file.name.as_str(), file.version, file.comment_count),
        ("plan.txt", 21, 20)
    );
    let counter = queries
        .get_counter(pb::GetCounterRequest {
            counter_id: "visits".into(),
            min_version: counter_version,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(counter.count, increments);
    let comments = queries
        .list_comments(pb::ListCommentsRequest {
            file_id: "f1".into(),
            min_version: last,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(comments.comments.len(), 20);
    let folder = queries
        .list_folder(pb::ListFolderRequest {
            folder_id: "docs".into(),
            min_versions: [("file-f1".to_owned(), 1)].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(folder.files.len(), 1);

    // A version nobody wrote yet: a clear, retryable answer at the deadline.
    let mut behind = pb::GetCounterRequest {
        counter_id: "visits".into(),
        min_version: counter_version + 5,
    };
    let mut request = tonic::Request::new(behind.clone());
    request.set_timeout(Duration::from_millis(300));
    let status = queries.get_counter(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let missing = queries
        .get_file(pb::GetFileRequest {
            file_id: "nope".into(),
            min_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    platform.stop().await;
    let platform = start(data.path()).await;
    let channel = platform.channel().await;
    let mut commands = CommandServiceClient::new(channel.clone());
    let mut queries = QueryServiceClient::new(channel);
    let again = commands
        .increment_counter(pb::IncrementCounterRequest {
            counter_id: "visits".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(
        again.version,
        counter_version + 1,
        "the event store kept its streams"
    );
    behind.min_version = again.version;
    let counter = queries.get_counter(behind).await.unwrap().into_inner();
    assert_eq!(counter.count, increments + 1, "the read models kept theirs");
    platform.stop().await;
}

/// A long thread comes in pages: 50 by default, and never more than 1 MiB
/// of comments whatever the page size, so that default clients (4 MiB) can
/// read it; following the tokens yields every comment once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_comment_thread_is_paged_and_bounded_in_bytes() {
    use prost::Message;
    let data = tempfile::tempdir().unwrap();
    let platform = start(data.path()).await;
    let channel = platform.channel().await;
    let mut commands = CommandServiceClient::new(channel.clone());
    let mut queries = QueryServiceClient::new(channel);
    commands
        .create_file(pb::CreateFileRequest {
            file_id: "long".into(),
            name: "long.txt".into(),
            folder_id: "docs".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut version = 0;
    for n in 0..300 {
        version = commands
            .add_comment(pb::AddCommentRequest {
                file_id: "long".into(),
                author: "ann".into(),
                text: format!("{n:04} {}", "x".repeat(3995)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .result
            .unwrap()
            .version;
    }
    let first = queries
        .list_comments(pb::ListCommentsRequest {
            file_id: "long".into(),
            min_version: version,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.comments.len(), 50, "the default page size");

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = queries
            .list_comments(pb::ListCommentsRequest {
                file_id: "long".into(),
                min_version: version,
                page_size: 500,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            page.encoded_len() <= (1 << 20) + 64 * 1024,
            "{} bytes",
            page.encoded_len()
        );
        seen.extend(page.comments.iter().map(|c| c.text[..4].to_owned()));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let expected: Vec<String> = (0..300).map(|n| format!("{n:04}")).collect();
    assert_eq!(seen, expected);
    let forged = queries
        .list_comments(pb::ListCommentsRequest {
            file_id: "long".into(),
            page_token: "not-a-token!".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::InvalidArgument);
    platform.stop().await;
}
