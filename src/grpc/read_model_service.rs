//! `scaleout.v1.ReadModelService`: verify, rebuild and switch read models.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, PreconditionViolation, StatusExt};

use super::status::{ERROR_DOMAIN, Violations, clip_marked, internal};
use crate::app::Application;
use crate::documents::DocumentStore;
use crate::log::EventLog;
use crate::pb::{self, read_model_service_server::ReadModelServiceServer};
use crate::projection::generation::{self, Generation, now_ms};
use crate::projection::rebuild::{self, RebuildError};
use crate::projection::verify::{VerifyError, verify};
use crate::projection::{AnyProjection, UnknownProjection, choose};

/// The read-model service of one application, over its document store and
/// the event log.
#[derive(Clone)]
pub struct ReadModelApi {
    app: Arc<dyn Application>,
    log: Arc<dyn EventLog>,
    documents: Arc<dyn DocumentStore>,
    /// One verification at a time: each holds up to
    /// [`MAX_FOLD_BYTES`](crate::projection::verify::MAX_FOLD_BYTES) and
    /// reads the whole log.
    verifying: Arc<Semaphore>,
}

impl std::fmt::Debug for ReadModelApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadModelApi")
            .field("documents", &self.documents)
            .finish_non_exhaustive()
    }
}

impl ReadModelApi {
    /// The one projection `name` names, or INVALID_ARGUMENT on `projection`.
    fn projection(&self, name: &str) -> Result<Box<dyn AnyProjection>, Status> {
        let mut violations = Violations::default();
        match violations.check(
            "projection",
            choose(self.app.projections(), &[name.to_owned()]),
        ) {
            Some(mut chosen) => Ok(chosen.remove(0)),
            None => Err(violations.into_status()),
        }
    }

    async fn read_model(&self, projection: &str) -> Result<pb::ReadModel, Status> {
        let (state, _) = generation::load(self.documents.as_ref(), projection).await?;
        let building = state.building.map(|build| {
            let lag = (build.head + 1).saturating_sub(build.next_position);
            pb::Build {
                generation: build.generation,
                position: build.next_position,
                head: build.head,
                lag,
                caught_up: build.caught_up,
                events_per_second: build.events_per_second,
                eta_seconds: lag as f64 / build.events_per_second.max(1.0),
                switch_when_ready: build.switch_when_ready,
                running: build.lease_until_ms > now_ms(),
                started_unix_ms: build.started_ms,
            }
        });
        Ok(pb::ReadModel {
            projection: projection.to_owned(),
            serving: state.serving.unwrap_or(0),
            previous: state.previous.unwrap_or(0),
            building,
        })
    }

    pub fn new(
        app: Arc<dyn Application>,
        log: Arc<dyn EventLog>,
        documents: Arc<dyn DocumentStore>,
    ) -> Self {
        Self {
            app,
            log,
            documents,
            verifying: Arc::new(Semaphore::new(1)),
        }
    }

    pub fn into_service(self, max_message_bytes: usize) -> ReadModelServiceServer<Self> {
        ReadModelServiceServer::new(self).max_decoding_message_size(max_message_bytes)
    }
}

#[tonic::async_trait]
impl pb::read_model_service_server::ReadModelService for ReadModelApi {
    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let body = request.into_inner();
        let mut violations = Violations::default();
        let Some(projections) = violations.check(
            "projections",
            choose(self.app.projections(), &body.projections),
        ) else {
            return Err(violations.into_status());
        };
        let Ok(_turn) = self.verifying.try_acquire() else {
            return Err(busy());
        };
        let report = verify(
            self.log.as_ref(),
            self.documents.as_ref(),
            &self.app.known_types(),
            &projections,
            body.repair,
        )
        .await
        .map_err(Status::from)?;
        let drifts = report
            .examples
            .into_iter()
            .map(|drift| pb::DocumentDrift {
                key: drift.key,
                expected_json: drift.expected.to_string(),
                missing: drift.actual.is_none(),
                stored_json: drift.actual.map(|a| a.to_string()).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::VerifyResponse {
            events: report.events,
            documents: report.documents as u64,
            drifted: report.drifted as u64,
            repaired: report.repaired as u64,
            moved_on: report.moved_on as u64,
            unreadable: report.unreadable,
            drifts,
            unreadable_reasons: report.unreadable_examples,
        }))
    }
    async fn rebuild(
        &self,
        request: Request<pb::RebuildRequest>,
    ) -> Result<Response<pb::RebuildResponse>, Status> {
        let body = request.into_inner();
        let projection = self.projection(&body.projection)?;
        let generation = rebuild::start(
            self.documents.as_ref(),
            projection.name(),
            body.switch_when_ready,
        )
        .await?;
        tracing::info!(
            projection = projection.name(),
            generation,
            "rebuild requested"
        );
        Ok(Response::new(pb::RebuildResponse { generation }))
    }

    async fn switch(
        &self,
        request: Request<pb::SwitchRequest>,
    ) -> Result<Response<pb::SwitchResponse>, Status> {
        let projection = self.projection(&request.into_inner().projection)?;
        rebuild::switch(self.documents.as_ref(), projection.name()).await?;
        Ok(Response::new(pb::SwitchResponse {
            read_model: Some(self.read_model(projection.name()).await?),
        }))
    }

    async fn drop_generation(
        &self,
        request: Request<pb::DropGenerationRequest>,
    ) -> Result<Response<pb::DropGenerationResponse>, Status> {
        let body = request.into_inner();
        let projection = self.projection(&body.projection)?;
        let removed = rebuild::drop_generation(
            self.log.as_ref(),
            self.documents.as_ref(),
            self.app.as_ref(),
            projection.name(),
            body.generation as Generation,
        )
        .await?;
        Ok(Response::new(pb::DropGenerationResponse { removed }))
    }

    async fn list_read_models(
        &self,
        _request: Request<pb::ListReadModelsRequest>,
    ) -> Result<Response<pb::ListReadModelsResponse>, Status> {
        let mut read_models = Vec::new();
        for projection in self.app.projections() {
            read_models.push(self.read_model(projection.name()).await?);
        }
        Ok(Response::new(pb::ListReadModelsResponse { read_models }))
    }
}

fn busy() -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        "a verification is already running on this server; try again when it ends",
        ErrorDetails::with_error_info("VERIFY_RUNNING", ERROR_DOMAIN, HashMap::new()),
    )
}

impl From<RebuildError> for Status {
    fn from(error: RebuildError) -> Self {
        // Every call checks the name first, so an unknown one is not
        // expected here; if one comes, it is the caller's, of any length.
        let message = clip_marked(error.to_string());
        let refused = |kind: &str, subject: &str| {
            Status::with_error_details(
                Code::FailedPrecondition,
                message.clone(),
                ErrorDetails::with_precondition_failure(vec![PreconditionViolation::new(
                    kind,
                    subject,
                    message.clone(),
                )]),
            )
        };
        match error {
            RebuildError::Unknown(UnknownProjection { .. }) => Status::with_error_details(
                Code::InvalidArgument,
                message.clone(),
                ErrorDetails::with_bad_request_violation("projection", message.clone()),
            ),
            RebuildError::AlreadyBuilding { projection, .. } => {
                refused("REBUILD_RUNNING", &projection)
            }
            RebuildError::NotBuilding { projection } => refused("NOT_BUILDING", &projection),
            RebuildError::NotCaughtUp { projection, .. } => refused("NOT_CAUGHT_UP", &projection),
            RebuildError::InUse { projection, .. } => refused("GENERATION_IN_USE", &projection),
            RebuildError::Document(error) => error.into(),
            RebuildError::Log(error) => error.into(),
        }
    }
}

impl From<VerifyError> for Status {
    fn from(error: VerifyError) -> Self {
        match error {
            VerifyError::Log(error) => error.into(),
            VerifyError::Document(error) => error.into(),
            error @ VerifyError::TooLarge { .. } => Status::with_error_details(
                Code::ResourceExhausted,
                error.to_string(),
                ErrorDetails::with_error_info("TOO_LARGE_TO_VERIFY", ERROR_DOMAIN, HashMap::new()),
            ),
            error @ VerifyError::Fold { .. } => internal(&error),
        }
    }
}
