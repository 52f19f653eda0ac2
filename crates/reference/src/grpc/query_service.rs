//! `scaleout.v1.QueryService`: decode, read the view (waiting for a version
//! if asked, within the call's deadline), map the error.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as TOKEN;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use scaleout::grpc::Violations;
use scaleout::grpc::page::within_bytes;
use scaleout::grpc::query_request::wait_deadline;

use crate::domain::values::Id;
use crate::pb::{self, query_service_server::QueryServiceServer};
use crate::queries::ReferenceQueries;

const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 500;

fn page_size(asked: u32) -> Result<u32, String> {
    match asked {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n <= MAX_PAGE_SIZE => Ok(n),
        n => Err(format!("must be at most {MAX_PAGE_SIZE}, got {n}")),
    }
}

/// Most streams one listing may wait for: each is checked on every read of
/// the document, and a refusal names one in its trailers.
const MAX_MIN_VERSIONS: usize = 100;

/// A listing's `min_versions`, each key the stream of a file (`file-<id>`):
/// the only streams a folder reflects.
fn min_versions(asked: HashMap<String, u64>) -> Result<BTreeMap<String, u64>, String> {
    if asked.len() > MAX_MIN_VERSIONS {
        return Err(format!(
            "at most {MAX_MIN_VERSIONS} streams, got {}",
            asked.len()
        ));
    }
    asked
        .into_iter()
        .map(|(stream, version)| {
            let file_id = stream
                .strip_prefix("file-")
                .ok_or("keys must be file streams, `file-<file id>`")?;
            Id::parse(file_id).map_err(|e| format!("a key's file id {e}"))?;
            Ok((stream, version))
        })
        .collect()
}

/// What a page token says to continue after; `None` for the first page.
fn page_token(token: &str) -> Result<Option<String>, &'static str> {
    match token {
        "" => Ok(None),
        token => TOKEN
            .decode(token)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .map(Some)
            .ok_or("is not a token this service returned"),
    }
}

/// The query service over the reference read models.
#[derive(Debug, Clone)]
pub struct QueryApi {
    queries: ReferenceQueries,
    /// The longest a read waits for a version, whatever the caller's deadline.
    max_wait: Duration,
}

impl QueryApi {
    pub fn new(queries: ReferenceQueries, max_wait: Duration) -> Self {
        Self { queries, max_wait }
    }

    pub fn into_service(self, max_message_bytes: usize) -> QueryServiceServer<Self> {
        QueryServiceServer::new(self).max_decoding_message_size(max_message_bytes)
    }

    fn deadline<T>(&self, request: &Request<T>) -> Instant {
        wait_deadline(request, self.max_wait)
    }
}

#[tonic::async_trait]
impl pb::query_service_server::QueryService for QueryApi {
    async fn get_file(
        &self,
        request: Request<pb::GetFileRequest>,
    ) -> Result<Response<pb::GetFileResponse>, Status> {
        let deadline = self.deadline(&request);
        let body = request.into_inner();
        let mut violations = Violations::default();
        let Some(file_id) = violations.check("file_id", Id::parse(&body.file_id)) else {
            return Err(violations.into_status());
        };
        let view = self
            .queries
            .file(file_id.as_str(), body.min_version, deadline)
            .await?;
        Ok(Response::new(pb::GetFileResponse {
            file: Some(pb::FileView {
                file_id: view.file_id,
                name: view.name,
                folder_id: view.folder_id,
                version: view.version,
                comment_count: view.comment_count,
                deleted: view.deleted,
            }),
        }))
    }

    async fn list_folder(
        &self,
        request: Request<pb::ListFolderRequest>,
    ) -> Result<Response<pb::ListFolderResponse>, Status> {
        let deadline = self.deadline(&request);
        let body = request.into_inner();
        let mut violations = Violations::default();
        let (Some(folder_id), Some(page_size), Some(after), Some(min_versions)) = (
            violations.check("folder_id", Id::parse(&body.folder_id)),
            violations.check("page_size", page_size(body.page_size)),
            violations.check("page_token", page_token(&body.page_token)),
            violations.check("min_versions", min_versions(body.min_versions)),
        ) else {
            return Err(violations.into_status());
        };
        let listing = self
            .queries
            .folder(folder_id.as_str(), &min_versions, deadline)
            .await?;
        let range = match &after {
            Some(after) => listing
                .files
                .range::<String, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => listing.files.range::<String, _>(..),
        };
        let mut files: Vec<pb::FolderEntry> = range
            .take(page_size as usize + 1)
            .map(|(file_id, name)| pb::FolderEntry {
                file_id: file_id.clone(),
                name: name.clone(),
            })
            .collect();
        let next_page_token = if files.len() > page_size as usize {
            files.truncate(page_size as usize);
            files
                .last()
                .map(|last| TOKEN.encode(&last.file_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListFolderResponse {
            files,
            next_page_token,
        }))
    }

    async fn list_comments(
        &self,
        request: Request<pb::ListCommentsRequest>,
    ) -> Result<Response<pb::ListCommentsResponse>, Status> {
        let deadline = self.deadline(&request);
        let body = request.into_inner();
        let mut violations = Violations::default();
        let skip = page_token(&body.page_token).and_then(|after| {
            after.map_or(Ok(0), |after| {
                after
                    .parse::<usize>()
                    .map_err(|_| "is not a token this service returned")
            })
        });
        let (Some(file_id), Some(page_size), Some(skip)) = (
            violations.check("file_id", Id::parse(&body.file_id)),
            violations.check("page_size", page_size(body.page_size)),
            violations.check("page_token", skip),
        ) else {
            return Err(violations.into_status());
        };
        let thread = self
            .queries
            .comments(file_id.as_str(), body.min_version, deadline)
            .await?;
        // Comments are only ever appended, so a position in the thread is a
        // stable place to continue from.
        let total = thread.comments.len();
        // A comment may hold 4,000 characters: a page of them ends in time.
        let comments: Vec<pb::Comment> = within_bytes(
            thread
                .comments
                .into_iter()
                .skip(skip)
                .take(page_size as usize),
            |c| c.text.len() + c.author.len() + c.comment_id.len() + 16,
        )
        .map(|c| pb::Comment {
            comment_id: c.comment_id,
            author: c.author,
            text: c.text,
            posted_at_ms: c.posted_at_ms,
        })
        .collect();
        let next = skip + comments.len();
        let next_page_token = if next < total {
            TOKEN.encode(next.to_string())
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListCommentsResponse {
            comments,
            version: thread.version,
            next_page_token,
        }))
    }

    async fn get_counter(
        &self,
        request: Request<pb::GetCounterRequest>,
    ) -> Result<Response<pb::GetCounterResponse>, Status> {
        let deadline = self.deadline(&request);
        let body = request.into_inner();
        let mut violations = Violations::default();
        let Some(counter_id) = violations.check("counter_id", Id::parse(&body.counter_id)) else {
            return Err(violations.into_status());
        };
        let view = self
            .queries
            .counter(counter_id.as_str(), body.min_version, deadline)
            .await?;
        Ok(Response::new(pb::GetCounterResponse {
            counter_id: view.counter_id,
            count: view.count,
            version: view.version,
        }))
    }

    async fn get_file_history(
        &self,
        request: Request<pb::GetFileHistoryRequest>,
    ) -> Result<Response<pb::GetFileHistoryResponse>, Status> {
        let deadline = self.deadline(&request);
        let body = request.into_inner();
        let mut violations = Violations::default();
        let Some(file_id) = violations.check("file_id", Id::parse(&body.file_id)) else {
            return Err(violations.into_status());
        };
        let view = self
            .queries
            .history(file_id.as_str(), body.min_version, deadline)
            .await?;
        Ok(Response::new(pb::GetFileHistoryResponse {
            file_id: view.file_id,
            names: view
                .names
                .into_iter()
                .map(|change| pb::FileName {
                    name: change.name,
                    version: change.version,
                    named_at_ms: change.named_at_ms,
                })
                .collect(),
            version: view.version,
            earlier_names: view.earlier,
        }))
    }
}
