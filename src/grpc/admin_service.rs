//! `scaleout.v1.AdminService`: list and replay dead-lettered messages; the
//! contention report.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as TOKEN;
use tonic::{Request, Response, Status};

use super::page::{MAX_PAGE_BYTES, within_bytes};
use super::status::{Violations, clip};
use crate::bus::DeadLetter;
use crate::bus::EventBus;
use crate::contention::{Contention, Hot, WINDOW};
use crate::domain::values::Id;
use crate::pb::{self, admin_service_server::AdminServiceServer};

/// Most dead letters one list call returns.
const MAX_LIMIT: u32 = 1000;
const DEFAULT_LIMIT: u32 = 100;
/// Most keys of each kind one contention report lists.
const MAX_HOT: u32 = 100;
const DEFAULT_HOT: u32 = 10;
/// How deep paging reaches into a dead-letter queue: each page re-reads the
/// messages before it (a queue has no random access), so the depth bounds
/// the work of one call.
const MAX_REACH: usize = 10_000;
/// Longest reason, routing key or id shown: they come from message headers,
/// which anyone who can publish sets.
const MAX_TEXT_BYTES: usize = 1024;

/// How many messages the page starts after.
fn page_start(token: &str) -> Result<usize, &'static str> {
    if token.is_empty() {
        return Ok(0);
    }
    TOKEN
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.parse::<usize>().ok())
        .filter(|start| *start < MAX_REACH)
        .ok_or("is not a token this service returned")
}

/// The admin service: dead letters over a server's [`EventBus`] (if it has
/// one), and its process's [`Contention`].
#[derive(Debug, Clone)]
pub struct AdminApi {
    bus: Option<Arc<dyn EventBus>>,
    contention: Arc<Contention>,
}

impl AdminApi {
    pub fn new(bus: Option<Arc<dyn EventBus>>, contention: Arc<Contention>) -> Self {
        Self { bus, contention }
    }

    /// The bus, or why dead letters cannot be asked for here.
    fn bus(&self) -> Result<&Arc<dyn EventBus>, Status> {
        self.bus.as_ref().ok_or_else(super::status::no_event_bus)
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
        let (Some(service_type), Some(limit), Some(start)) = (
            violations.check("service_type", Id::parse(&body.service_type)),
            violations.check("limit", limit),
            violations.check("page_token", page_start(&body.page_token)),
        ) else {
            return Err(violations.into_status());
        };
        let limit = (limit as usize).min(MAX_REACH - start);
        let page = self
            .bus()?
            .dead_letters(service_type.as_str(), start, limit)
            .await?;
        // A longer body is cut to a page's bound (its size is kept).
        let size =
            |dead: &DeadLetter| dead.message.body.len().min(MAX_PAGE_BYTES) + 4 * MAX_TEXT_BYTES;
        let dead_letters: Vec<pb::DeadLetter> = within_bytes(page.dead_letters, size)
            .map(|dead| {
                let body_bytes = dead.message.body.len() as u64;
                let mut body = dead.message.body;
                body.truncate(MAX_PAGE_BYTES);
                pb::DeadLetter {
                    message_id: clip(dead.message.message_id, MAX_TEXT_BYTES),
                    event_type: clip(dead.message.event_type, MAX_TEXT_BYTES),
                    routing_key: clip(dead.message.routing_key, MAX_TEXT_BYTES),
                    reason: clip(dead.reason, MAX_TEXT_BYTES),
                    attempts: dead.attempts,
                    body,
                    body_bytes,
                }
            })
            .collect();
        let next = start + dead_letters.len();
        let next_page_token = if next < page.parked.min(MAX_REACH) {
            TOKEN.encode(next.to_string())
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters,
            next_page_token,
            parked: page.parked as u64,
        }))
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
        let replayed = self
            .bus()?
            .replay_dead_letters(service_type.as_str())
            .await?;
        Ok(Response::new(pb::ReplayDeadLettersResponse {
            replayed: u32::try_from(replayed).unwrap_or(u32::MAX),
        }))
    }

    async fn get_contention(
        &self,
        request: Request<pb::GetContentionRequest>,
    ) -> Result<Response<pb::GetContentionResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => Ok(DEFAULT_HOT),
            n if n <= MAX_HOT => Ok(n),
            n => Err(format!("must be at most {MAX_HOT}, got {n}")),
        };
        let mut violations = Violations::default();
        let Some(limit) = violations.check("limit", limit) else {
            return Err(violations.into_status());
        };
        let listed = |hot: Vec<Hot>| {
            hot.into_iter()
                .map(|Hot { key, lost }| pb::ContendedKey {
                    key,
                    lost_races: lost,
                })
                .collect()
        };
        let limit = limit as usize;
        Ok(Response::new(pb::GetContentionResponse {
            window_seconds: u32::try_from(WINDOW.as_secs()).unwrap_or(u32::MAX),
            streams: listed(self.contention.hot_streams(limit)),
            documents: listed(self.contention.hot_documents(limit)),
        }))
    }
}
