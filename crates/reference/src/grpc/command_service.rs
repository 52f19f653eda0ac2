//! `scaleout.v1.CommandService`: decode, call the kernel, map the error.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use scaleout::command::{Command, CommandHandler};
use scaleout::domain::Aggregate;
use scaleout::grpc::Violations;
use scaleout::grpc::command_request::{command_result, expected_version, origin, request_key};

use crate::domain::values::{Amount, Author, CommentText, FileName, Id};
use crate::domain::{Counter, CounterCommand, File, FileCommand};
use crate::pb::{self, command_service_server::CommandServiceServer};

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
        Ok(Some(command_result(outcome.into_result())))
    }
}

#[tonic::async_trait]
impl pb::command_service_server::CommandService for CommandApi {
    async fn create_file(
        &self,
        request: Request<pb::CreateFileRequest>,
    ) -> Result<Response<pb::CreateFileResponse>, Status> {
        let origin = origin(&request);
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
                origin,
            })
            .await?;
        Ok(Response::new(pb::CreateFileResponse { result }))
    }

    async fn rename_file(
        &self,
        request: Request<pb::RenameFileRequest>,
    ) -> Result<Response<pb::RenameFileResponse>, Status> {
        let origin = origin(&request);
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
                expected: expected_version(body.expected_version),
                request_key,
                origin,
            })
            .await?;
        Ok(Response::new(pb::RenameFileResponse { result }))
    }

    async fn move_file(
        &self,
        request: Request<pb::MoveFileRequest>,
    ) -> Result<Response<pb::MoveFileResponse>, Status> {
        let origin = origin(&request);
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
                expected: expected_version(body.expected_version),
                request_key,
                origin,
            })
            .await?;
        Ok(Response::new(pb::MoveFileResponse { result }))
    }

    async fn delete_file(
        &self,
        request: Request<pb::DeleteFileRequest>,
    ) -> Result<Response<pb::DeleteFileResponse>, Status> {
        let origin = origin(&request);
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
                expected: expected_version(body.expected_version),
                request_key,
                origin,
            })
            .await?;
        Ok(Response::new(pb::DeleteFileResponse { result }))
    }

    async fn add_comment(
        &self,
        request: Request<pb::AddCommentRequest>,
    ) -> Result<Response<pb::AddCommentResponse>, Status> {
        let origin = origin(&request);
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
                expected: expected_version(body.expected_version),
                request_key,
                origin,
            })
            .await?;
        Ok(Response::new(pb::AddCommentResponse { result }))
    }

    async fn increment_counter(
        &self,
        request: Request<pb::IncrementCounterRequest>,
    ) -> Result<Response<pb::IncrementCounterResponse>, Status> {
        let origin = origin(&request);
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
                expected: expected_version(body.expected_version),
                request_key,
                origin,
            })
            .await?;
        Ok(Response::new(pb::IncrementCounterResponse { result }))
    }
}
