//! `scaleout.v1.ReadService`: the event log over gRPC — one stream, the whole
//! log in pages, and subscriptions that catch up and then follow.
//!
//! A subscription runs as its own task that feeds a bounded buffer; the
//! client's reading (HTTP/2 flow control) drains it. A client that stops
//! reading fills the buffer, and once it has stayed full for
//! [`ReadConfig::slow_subscriber`] the subscription ends with
//! RESOURCE_EXHAUSTED: it never holds up anything but itself.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::page;
use super::status::{self, Violations};
use crate::domain::{KnownTypes, part_id};
use crate::log::{EventLog, Follower, StoreLog};
use crate::pb::{self, read_service_server::ReadServiceServer};
use crate::store::{EventStore, LogFilter, RecordedEvent};

/// Most events one page returns; a larger `limit` is refused, not trimmed.
pub const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;

/// How subscriptions are bounded.
#[derive(Debug, Clone, Copy)]
pub struct ReadConfig {
    /// Messages buffered per subscription for a client that reads slower
    /// than the log is read.
    pub buffer: usize,
    /// How long a full buffer is tolerated before the subscription ends.
    pub slow_subscriber: Duration,
    /// Subscriptions open at once; each holds a task and a buffer.
    pub max_subscriptions: usize,
    /// How often a subscription at the head looks for other processes' commits.
    pub poll: Duration,
}

impl Default for ReadConfig {
    fn default() -> Self {
        Self {
            buffer: 1024,
            slow_subscriber: Duration::from_secs(30),
            max_subscriptions: 256,
            poll: Duration::from_millis(250),
        }
    }
}

/// The read service over an [`EventStore`].
#[derive(Debug, Clone)]
pub struct ReadApi {
    log: Arc<dyn EventLog>,
    known: Arc<KnownTypes>,
    config: ReadConfig,
    subscriptions: Arc<Semaphore>,
}

impl ReadApi {
    pub fn new(store: Arc<dyn EventStore>, known: KnownTypes, config: ReadConfig) -> Self {
        Self {
            log: Arc::new(StoreLog(store)),
            known: Arc::new(known),
            subscriptions: Arc::new(Semaphore::new(config.max_subscriptions)),
            config,
        }
    }

    pub fn into_service(self, max_message_bytes: usize) -> ReadServiceServer<Self> {
        ReadServiceServer::new(self).max_decoding_message_size(max_message_bytes)
    }

    /// How a request reads: its filter checked against the known types
    /// (the old ones too when it reads as stored), and the filter the store
    /// applies, which also takes the old types that read as a type asked for.
    fn reading(
        &self,
        filter: Option<pb::LogFilter>,
        as_stored: bool,
    ) -> Result<(LogFilter, Reading), String> {
        let filter = filter.unwrap_or_default();
        let known = &self.known;
        refuse_unknown(
            &filter.stream_types,
            "stream types",
            &known.stream_types,
            |t| known.stream_types.iter().any(|k| k == t),
        )?;
        refuse_unknown(
            &filter.event_types,
            "event types",
            &known.event_types,
            |t| {
                if as_stored {
                    known.stored(t)
                } else {
                    known.event_types.iter().any(|k| k == t)
                }
            },
        )?;
        let mut stored_types = filter.event_types.clone();
        if !as_stored {
            for current in &filter.event_types {
                for old in known.upcasters.read_as(current) {
                    if !stored_types.iter().any(|t| t == old) {
                        stored_types.push(old.to_owned());
                    }
                }
            }
        }
        let reading = Reading {
            known: Arc::clone(known),
            as_stored,
            event_types: filter.event_types,
        };
        Ok((
            LogFilter {
                stream_types: filter.stream_types,
                event_types: stored_types,
            },
            reading,
        ))
    }
}

/// How one request returns events: as stored, or as they read now (upcast,
/// and only the types it asked for).
#[derive(Debug, Clone)]
struct Reading {
    known: Arc<KnownTypes>,
    as_stored: bool,
    /// The event types asked for; empty: all.
    event_types: Vec<String>,
}

impl Reading {
    fn logged(&self, events: &[RecordedEvent]) -> Result<Vec<pb::LoggedEvent>, Status> {
        let mut logged = Vec::with_capacity(events.len());
        for event in events {
            if self.as_stored || !self.known.upcasters.reads(&event.event_type) {
                logged.push(as_logged(event));
                continue;
            }
            let parts = self
                .known
                .upcasters
                .read(event.event_type.clone(), event.payload.clone())
                .map_err(|error| {
                    status::unreadable_event(
                        &event.stream_id,
                        event.version,
                        event.position,
                        &error,
                    )
                })?;
            for (index, part) in parts.into_iter().enumerate() {
                if !self.event_types.is_empty() && !self.event_types.contains(&part.event_type) {
                    continue;
                }
                let mut envelope = event.to_envelope();
                envelope.event_id = part_id(event.event_id, index).to_string();
                envelope.event_type = part.event_type;
                envelope.payload = part.payload;
                logged.push(pb::LoggedEvent {
                    position: event.position,
                    event: Some(envelope),
                });
            }
        }
        Ok(logged)
    }
}

/// Refuses the `given` names that are not `known` (a typo would otherwise
/// match nothing, silently), listing the `listed` ones.
fn refuse_unknown(
    given: &[String],
    what: &str,
    listed: &[String],
    known: impl Fn(&str) -> bool,
) -> Result<(), String> {
    let unknown: Vec<&str> = given
        .iter()
        .map(String::as_str)
        .filter(|g| !known(g))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        // The known ones first: the unknown are the caller's, of any length,
        // and what a long refusal loses when it is cut.
        Err(format!(
            "unknown {what} (known: {}): {unknown:?}",
            listed.join(", ")
        ))
    }
}

fn page_limit(limit: u32) -> Result<usize, String> {
    match limit {
        0 => Ok(DEFAULT_PAGE as usize),
        n if n <= MAX_PAGE => Ok(n as usize),
        n => Err(format!("must be at most {MAX_PAGE}, got {n}")),
    }
}

/// Cuts `events` after the last one that fits in a page (see
/// [`page::within_bytes`]); says whether it cut.
fn within_page_bytes(events: &mut Vec<RecordedEvent>) -> bool {
    let all = events.len();
    // The envelope's fixed fields (ids, times, positions) stay under 256 bytes.
    let size = |event: &RecordedEvent| {
        event.payload.len() + event.stream_id.len() + event.event_type.len() + 256
    };
    *events = page::within_bytes(std::mem::take(events), size).collect();
    events.len() < all
}

fn as_logged(event: &RecordedEvent) -> pb::LoggedEvent {
    pb::LoggedEvent {
        position: event.position,
        event: Some(event.to_envelope()),
    }
}

type Subscription = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::read_service_server::ReadService for ReadApi {
    async fn read_stream(
        &self,
        request: Request<pb::ReadStreamRequest>,
    ) -> Result<Response<pb::ReadStreamResponse>, Status> {
        let body = request.into_inner();
        let mut violations = Violations::default();
        let stream_id = match body.stream_id.as_str() {
            "" => Err("must not be empty"),
            id if id.len() > 512 => Err("must be at most 512 bytes"),
            id => Ok(id),
        };
        let (Some(stream_id), Some(limit)) = (
            violations.check("stream_id", stream_id),
            violations.check("limit", page_limit(body.limit)),
        ) else {
            return Err(violations.into_status());
        };
        let from = body.from_version.max(1);
        // One more than asked tells whether the stream goes on.
        let mut events = self.log.read_stream(stream_id, from, limit + 1).await?;
        let mut end_of_stream = events.len() <= limit;
        events.truncate(limit);
        end_of_stream &= !within_page_bytes(&mut events);
        let next_version = events.last().map_or(from, |e| e.version + 1);
        let reading = Reading {
            known: Arc::clone(&self.known),
            as_stored: body.as_stored,
            event_types: Vec::new(),
        };
        Ok(Response::new(pb::ReadStreamResponse {
            events: reading.logged(&events)?,
            next_version,
            end_of_stream,
        }))
    }

    async fn read_all(
        &self,
        request: Request<pb::ReadAllRequest>,
    ) -> Result<Response<pb::ReadAllResponse>, Status> {
        let body = request.into_inner();
        let mut violations = Violations::default();
        let (Some(limit), Some((filter, reading))) = (
            violations.check("limit", page_limit(body.limit)),
            violations.check("filter", self.reading(body.filter, body.as_stored)),
        ) else {
            return Err(violations.into_status());
        };
        let mut page = self
            .log
            .read_all(body.from_position, limit, &filter)
            .await?;
        if within_page_bytes(&mut page.events) {
            page.next_position = page
                .events
                .last()
                .map_or(page.next_position, |e| e.position + 1);
        }
        Ok(Response::new(pb::ReadAllResponse {
            events: reading.logged(&page.events)?,
            next_position: page.next_position,
            head_position: page.head,
        }))
    }

    type SubscribeStream = Subscription;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let body = request.into_inner();
        let mut violations = Violations::default();
        let Some((filter, reading)) =
            violations.check("filter", self.reading(body.filter, body.as_stored))
        else {
            return Err(violations.into_status());
        };
        let permit = Arc::clone(&self.subscriptions)
            .try_acquire_owned()
            .map_err(|_| status::too_many_subscriptions(self.config.max_subscriptions))?;
        let follower = Follower::new(
            Arc::clone(&self.log),
            body.from_position,
            filter,
            MAX_PAGE as usize,
            self.config.poll,
        );
        let (sender, receiver) = mpsc::channel(self.config.buffer);
        let (ending, ended) = oneshot::channel();
        let config = self.config;
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(status) = feed(follower, reading, sender, config).await {
                let _ = ending.send(status);
            }
        });
        // What was buffered first, then the reason the feed stopped, if any.
        let reason =
            futures_util::stream::once(ended).filter_map(|ended| async { ended.ok().map(Err) });
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver)
            .map(Ok)
            .chain(reason);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Steps read ahead of the one being sent: reading the next page overlaps
/// sending this one, and a slow client holds up at most this many pages.
const READ_AHEAD: usize = 2;

/// Feeds one subscription until the client goes away (`None`), or it ends
/// with a status: the client was too slow, the log failed (the client
/// resumes from its last position), or an event cannot be read.
async fn feed(
    mut follower: Follower,
    reading: Reading,
    sender: mpsc::Sender<pb::SubscribeResponse>,
    config: ReadConfig,
) -> Option<Status> {
    use pb::subscribe_response::Kind;
    let (read, mut steps) = mpsc::channel(READ_AHEAD);
    // Ends with the feed (`steps` dropped), even while waiting at the head.
    tokio::spawn(async move {
        loop {
            let step = tokio::select! {
                () = read.closed() => return,
                step = follower.next() => step,
            };
            let failed = step.is_err();
            if read.send(step).await.is_err() || failed {
                return;
            }
        }
    });
    let mut live = false;
    loop {
        let step = tokio::select! {
            () = sender.closed() => return None,
            step = steps.recv() => step?,
        };
        let step = match step {
            Ok(step) => step,
            Err(error) => return Some(error.into()),
        };
        let events = match reading.logged(&step.events) {
            Ok(events) => events,
            Err(status) => return Some(status),
        };
        let mut messages: Vec<Kind> = events.into_iter().map(Kind::Event).collect();
        if !live && (step.events.is_empty() || step.caught_up) {
            messages.push(Kind::Checkpoint(pb::Checkpoint {
                next_position: step.next_position,
                caught_up: step.caught_up,
            }));
        }
        live = step.caught_up;
        for kind in messages {
            let message = pb::SubscribeResponse { kind: Some(kind) };
            // Only a full buffer arms a timer.
            let message = match sender.try_send(message) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Closed(_)) => return None,
                Err(mpsc::error::TrySendError::Full(message)) => message,
            };
            match sender.send_timeout(message, config.slow_subscriber).await {
                Ok(()) => {}
                Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                    return Some(status::subscriber_too_slow(
                        config.buffer,
                        config.slow_subscriber,
                    ));
                }
                Err(mpsc::error::SendTimeoutError::Closed(_)) => return None,
            }
        }
    }
}
