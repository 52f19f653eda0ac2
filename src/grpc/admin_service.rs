//! `scaleout.v1.AdminService`: list and replay dead-lettered messages.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::status::Violations;
use crate::bus::EventBus;
use crate::domain::values::Id;
use crate::pb::{self, admin_service_server::AdminServiceServer};

/// Most dead letters one list call returns.
const MAX_LIMIT: u32 = 1000;
const DEFAULT_LIMIT: u32 = 100;

/// The admin service over an [`EventBus`].
#[derive(Debug, Clone)]
pub struct AdminApi {
    bus: Arc<dyn EventBus>,
}

impl AdminApi {
    pub fn new(bus: Arc<dyn EventBus>) -> Self {
        Self { bus }
    }

    pub fn into_service(self, max_message_bytes: usize) -> AdminServiceServer<Self> {
        AdminServiceServer::new(self).max_decoding_message_size(max_message_bytes)
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let body = request.into_inner();
        let mut violations = Violations::default();
        let limit = match body.limit {
            0 => Ok(DEFAULT_LIMIT),
            n if n <= MAX_LIMIT => Ok(n),
            n => Err(format!("must be at most {MAX_LIMIT}, got {n}")),
        };
        let (Some(service_type), Some(limit)) = (
            violations.check("service_type", Id::parse(&body.service_type)),
            violations.check("limit", limit),
        ) else {
            return Err(violations.into_status());
        };
        let parked = self
            .bus
            .dead_letters(service_type.as_str(), limit as usize)
            .await?;
        let dead_letters = parked
            .into_iter()
            .map(|dead| pb::DeadLetter {
                message_id: dead.message.message_id,
                event_type: dead.message.event_type,
                routing_key: dead.message.routing_key,
                reason: dead.reason,
                attempts: dead.attempts,
                body: dead.message.body,
            })
            .collect();
        Ok(Response::new(pb::ListDeadLettersResponse { dead_letters }))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<pb::ReplayDeadLettersRequest>,
    ) -> Result<Response<pb::ReplayDeadLettersResponse>, Status> {
        let body = request.into_inner();
        let mut violations = Violations::default();
        let Some(service_type) = violations.check("service_type", Id::parse(&body.service_type))
        else {
            return Err(violations.into_status());
        };
        let replayed = self.bus.replay_dead_letters(service_type.as_str()).await?;
        Ok(Response::new(pb::ReplayDeadLettersResponse {
            replayed: u32::try_from(replayed).unwrap_or(u32::MAX),
        }))
    }
}
