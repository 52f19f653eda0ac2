//! `scaleout.v1.CommandService`: decode, call the kernel, map the error.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::status::Violations;
use crate::command::{Command, CommandHandler};
use crate::domain::values::{Amount, Author, CommentText, FileName, Id};
use crate::domain::{Aggregate, Counter, CounterCommand, File, FileCommand};
use crate::pb::{self, command_service_server::CommandServiceServer};
use crate::store::{AppendResult, ExpectedVersion, Fingerprint, RequestId, RequestKey};

/// The metadata key a caller may set to tie its commands together.
pub const CORRELATION_ID_HEADER: &str = "x-correlation-id";

/// The command service over a [`CommandHandler`].
#[derive(Debug, Clone)]
pub struct CommandApi {
    handler: Arc<CommandHandler>,
}

impl CommandApi {
    pub fn new(handler: Arc<CommandHandler>) -> Self {
        Self { handler }
    }

    /// The tonic service, with the given cap on a request's encoded size.
    pub fn into_service(self, max_message_bytes: usize) -> CommandServiceServer<Self> {
        CommandServiceServer::new(self).max_decoding_message_size(max_message_bytes)
    }

    async fn run<A: Aggregate>(
        &self,
        command: Command<A::Command>,
    ) -> Result<Option<pb::CommandResult>, Status> {
        let outcome = self.handler.execute::<A>(command).await?;
        Ok(Some(to_pb(outcome.into_result())))
    }
}

/// What every command request shares, read off the request before its body.
struct Envelope {
    correlation_id: Option<Uuid>,
}

fn envelope<T>(request: &Request<T>) -> Envelope {
    let correlation_id = request
        .metadata()
        .get(CORRELATION_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| Uuid::parse_str(value).ok());
    Envelope { correlation_id }
}

/// The request's idempotency key: its `request_id`, when set, and a
/// fingerprint of the whole request, so that the id reused for a different
/// request is refused instead of answered with the first one's result.
fn request_key<M: prost::Name>(body: &M, request_id: &str) -> Result<Option<RequestKey>, String> {
    if request_id.is_empty() {
        return Ok(None);
    }
    let id = Uuid::parse_str(request_id).map_err(|e| format!("must be a UUID: {e}"))?;
    Ok(Some(RequestKey {
        id: RequestId(id),
        fingerprint: Fingerprint::of(&M::full_name(), &body.encode_to_vec()),
    }))
}

/// `None` (unset or `any`) lets the server decide on the latest state.
fn parse_expected(value: Option<pb::ExpectedVersion>) -> Option<ExpectedVersion> {
    use pb::expected_version::Kind;
    match value?.kind? {
        Kind::Any(()) => None,
        Kind::NoStream(()) => Some(ExpectedVersion::NoStream),
        Kind::StreamExists(()) => Some(ExpectedVersion::StreamExists),
        Kind::Exact(version) => Some(ExpectedVersion::Exact(version)),
    }
}

fn to_pb(result: AppendResult) -> pb::CommandResult {
    pb::CommandResult {
        stream_id: result.stream_id,
        version: result.version,
        event_ids: result.event_ids.iter().map(Uuid::to_string).collect(),
    }
}

#[tonic::async_trait]
impl pb::command_service_server::CommandService for CommandApi {
    async fn create_file(
        &self,
        request: Request<pb::CreateFileRequest>,
    ) -> Result<Response<pb::CreateFileResponse>, Status> {
        let Envelope { correlation_id } = envelope(&request);
        let body = request.into_inner();
        let mut violations = Violations::default();
        let (Some(request_key), Some(file_id), Some(name), Some(folder_id)) = (
            violations.check("request_id", request_key(&body, &body.request_id)),
            violations.check("file_id", Id::parse(&body.file_id)),
            violations.check("name", FileName::parse(&body.name)),
            violations.check("folder_id", Id::parse(&body.folder_id)),
        ) else {
            return Err(violations.into_status());
        };
        let result = self
            .run::<File>(Command {
                aggregate_id: file_id,
                command: FileCommand::Create { name, folder_id },
                expected: None,
                request_key,
                correlation_id,
            })
            .await?;
        Ok(Response::new(pb::CreateFileResponse { result }))
    }

    async fn rename_file(
        &self,
        request: Request<pb::RenameFileRequest>,
    ) -> Result<Response<pb::RenameFileResponse>, Status> {
        let Envelope { correlation_id } = envelope(&request);
        let body = request.into_inner();
        let mut violations = Violations::default();
        let (Some(request_key), Some(file_id), Some(new_name)) = (
            violations.check("request_id", request_key(&body, &body.request_id)),
            violations.check("file_id", Id::parse(&body.file_id)),
            violations.check("new_name", FileName::parse(&body.new_name)),
        ) else {
            return Err(violations.into_status());
        };
        let result = self
            .run::<File>(Command {
                aggregate_id: file_id,
                command: FileCommand::Rename { new_name },
                expected: parse_expected(body.expected_version),
                request_key,
                correlation_id,
            })
            .await?;
        Ok(Response::new(pb::RenameFileResponse { result }))
    }

    async fn move_file(
        &self,
        request: Request<pb::MoveFileRequest>,
    ) -> Result<Response<pb::MoveFileResponse>, Status> {
        let Envelope { correlation_id } = envelope(&request);
        let body = request.into_inner();
        let mut violations = Violations::default();
        let (Some(request_key), Some(file_id), Some(to_folder_id)) = (
            violations.check("request_id", request_key(&body, &body.request_id)),
            violations.check("file_id", Id::parse(&body.file_id)),
            violations.check("to_folder_id", Id::parse(&body.to_folder_id)),
        ) else {
            return Err(violations.into_status());
        };
        let result = self
            .run::<File>(Command {
                aggregate_id: file_id,
                command: FileCommand::Move { to_folder_id },
                expected: parse_expected(body.expected_version),
                request_key,
                correlation_id,
            })
            .await?;
        Ok(Response::new(pb::MoveFileResponse { result }))
    }

    async fn delete_file(
        &self,
        request: Request<pb::DeleteFileRequest>,
    ) -> Result<Response<pb::DeleteFileResponse>, Status> {
        let Envelope { correlation_id } = envelope(&request);
        let body = request.into_inner();
        let mut violations = Violations::default();
        let (Some(request_key), Some(file_id)) = (
            violations.check("request_id", request_key(&body, &body.request_id)),
            violations.check("file_id", Id::parse(&body.file_id)),
        ) else {
            return Err(violations.into_status());
        };
        let result = self
            .run::<File>(Command {
                aggregate_id: file_id,
                command: FileCommand::Delete,
                expected: parse_expected(body.expected_version),
                request_key,
                correlation_id,
            })
            .await?;
        Ok(Response::new(pb::DeleteFileResponse { result }))
    }

    async fn add_comment(
        &self,
        request: Request<pb::AddCommentRequest>,
    ) -> Result<Response<pb::AddCommentResponse>, Status> {
        let Envelope { correlation_id } = envelope(&request);
        let body = request.into_inner();
        let mut violations = Violations::default();
        let (Some(request_key), Some(file_id), Some(author), Some(text)) = (
            violations.check("request_id", request_key(&body, &body.request_id)),
            violations.check("file_id", Id::parse(&body.file_id)),
            violations.check("author", Author::parse(&body.author)),
            violations.check("text", CommentText::parse(&body.text)),
        ) else {
            return Err(violations.into_status());
        };
        let result = self
            .run::<File>(Command {
                aggregate_id: file_id,
                command: FileCommand::AddComment { author, text },
                expected: parse_expected(body.expected_version),
                request_key,
                correlation_id,
            })
            .await?;
        Ok(Response::new(pb::AddCommentResponse { result }))
    }

    async fn increment_counter(
        &self,
        request: Request<pb::IncrementCounterRequest>,
    ) -> Result<Response<pb::IncrementCounterResponse>, Status> {
        let Envelope { correlation_id } = envelope(&request);
        let body = request.into_inner();
        let mut violations = Violations::default();
        let (Some(request_key), Some(counter_id), Some(amount)) = (
            violations.check("request_id", request_key(&body, &body.request_id)),
            violations.check("counter_id", Id::parse(&body.counter_id)),
            violations.check("amount", Amount::parse(body.amount.unwrap_or(1))),
        ) else {
            return Err(violations.into_status());
        };
        let result = self
            .run::<Counter>(Command {
                aggregate_id: counter_id,
                command: CounterCommand::Increment { amount },
                expected: parse_expected(body.expected_version),
                request_key,
                correlation_id,
            })
            .await?;
        Ok(Response::new(pb::IncrementCounterResponse { result }))
    }
}
