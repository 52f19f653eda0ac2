//! The event bus port: publish with confirmation, subscribe as a service
//! type, settle each delivery (ack, retry later, dead-letter with a reason).
//!
//! Instances that subscribe with the same service type compete for messages;
//! every service type gets every event its bindings match. A message whose
//! handling keeps failing is dead-lettered after [`Subscription::max_attempts`]
//! deliveries, with the reason, and can be listed and replayed: nothing is
//! acked silently and nothing loops forever.
//!
//! Chosen at run time from config, so the trait is object safe and held as
//! `Arc<dyn EventBus>`; [`memory`] is the embedded default, [`rabbitmq`] the
//! production engine. Both pass one conformance suite.

mod delivery;
pub mod memory;
mod message;
pub mod rabbitmq;
mod topic;

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Cause;

pub use self::delivery::{Delivery, Settle};
pub use self::message::{BusMessage, CONTENT_TYPE};

/// Everything a bus operation can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// The broker cannot be reached or did not answer in time; try again
    /// later.
    #[error("event bus unavailable: {context}")]
    Unavailable {
        context: String,
        #[source]
        cause: Option<Cause>,
    },
    /// No queue is bound for the message: it must wait, not be dropped.
    #[error("no queue is bound for routing key {0}")]
    Unroutable(String),
    /// The broker refused the message (a negative confirm).
    #[error("the broker refused message {0}")]
    Nacked(String),
    /// No consumer of this service type has ever subscribed: it has no
    /// queues, and asking about it creates none.
    #[error("no service type {0} has subscribed to this bus")]
    UnknownServiceType(String),
    #[error("event bus failure: {context}")]
    Backend {
        context: String,
        #[source]
        cause: Option<Cause>,
    },
}

impl BusError {
    pub fn unavailable(context: impl Into<String>) -> Self {
        Self::Unavailable {
            context: context.into(),
            cause: None,
        }
    }

    pub fn backend(context: impl Into<String>) -> Self {
        Self::Backend {
            context: context.into(),
            cause: None,
        }
    }

    /// The same error, caused by `cause`.
    pub fn caused_by(mut self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        if let Self::Unavailable { cause: kept, .. } | Self::Backend { cause: kept, .. } = &mut self
        {
            *kept = Some(Cause::new(cause));
        }
        self
    }

    /// Whether trying again later may succeed: the broker was away, or
    /// refused or could not route the message for now.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::Unroutable(_) | Self::Nacked(_)
        )
    }
}

/// How a service type consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Instances with the same service type share one queue and compete.
    pub service_type: String,
    /// Topic patterns over routing keys `stream_type.event_type`, e.g.
    /// `file.#`; `#` takes every event.
    pub bindings: Vec<String>,
    /// Deliveries held unsettled at once by one subscriber.
    pub prefetch: u16,
    /// Deliveries of one message before a retry dead-letters it.
    pub max_attempts: u32,
}

/// A message parked in a service type's dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub message: BusMessage,
    /// Why it was parked: the handler's last error, or the broker's reason.
    pub reason: String,
    /// How many times it was delivered before it was parked.
    pub attempts: u32,
}

/// Part of a service type's dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetter>,
    /// How many messages were parked when the page was read.
    pub parked: usize,
}

/// The confirms of messages sent, answered in the order they were sent.
pub type Confirms = futures_util::future::BoxFuture<'static, Vec<Result<(), BusError>>>;

/// Where events are published and consumed.
#[async_trait]
pub trait EventBus: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes messages and waits for the bus to confirm each one; the
    /// answers line up with `messages`. A message that is not confirmed may
    /// or may not have been delivered: publish it again (consumers skip
    /// duplicates by version).
    async fn publish(&self, messages: &[BusMessage]) -> Vec<Result<(), BusError>> {
        self.send(messages).await.await
    }

    /// Sends messages in order, returning once they are on their way with
    /// what waits for their confirms (as [`EventBus::publish`] answers): a
    /// publisher can send its next messages behind them before these are
    /// confirmed, keeping a window of confirms in flight.
    async fn send(&self, messages: &[BusMessage]) -> Confirms;

    /// Joins the competing consumers of `subscription.service_type`,
    /// declaring its queue and bindings first (idempotently).
    async fn subscribe(&self, subscription: &Subscription)
    -> Result<Box<dyn Subscriber>, BusError>;

    /// Up to `limit` messages parked for a service type, oldest first,
    /// after the first `skip`, left where they are;
    /// [`BusError::UnknownServiceType`] for a service type that never
    /// subscribed.
    async fn dead_letters(
        &self,
        service_type: &str,
        skip: usize,
        limit: usize,
    ) -> Result<DeadLetterPage, BusError>;

    /// Moves the messages parked for a service type when the call starts
    /// back to its queue, with a fresh attempt count; returns how many. What
    /// is parked again meanwhile stays parked (no chasing its own tail).
    async fn replay_dead_letters(&self, service_type: &str) -> Result<usize, BusError>;

    /// Checks that the bus answers, for health reporting.
    async fn ping(&self) -> Result<(), BusError>;
}

/// One consumer of a service type's queue.
#[async_trait]
pub trait Subscriber: Send {
    /// The next delivery; `None` once the subscription has ended for good.
    async fn next(&mut self) -> Option<Delivery>;
}

/// Opens the bus an `--event-bus` value names: `memory` or an `amqp://` or
/// `amqps://` URL (connected on first use, so a process can start while the
/// broker is away), its exchanges and queues named with `prefix`; an
/// `amqps://` broker's certificate may chain to the PEM CA at `ca` as well
/// as to the system's.
pub fn open(
    spec: &str,
    prefix: &str,
    ca: Option<&std::path::Path>,
) -> Result<Arc<dyn EventBus>, BusError> {
    if spec == "memory" {
        Ok(Arc::new(memory::MemoryBus::new()))
    } else if spec.starts_with("amqp://") || spec.starts_with("amqps://") {
        let mut config = rabbitmq::RabbitConfig::new(spec).with_prefix(prefix);
        if let Some(path) = ca {
            let pem = std::fs::read_to_string(path).map_err(|e| {
                BusError::backend(format!("reading the CA {}: {e}", path.display()))
            })?;
            config = config.with_ca(pem);
        }
        Ok(Arc::new(rabbitmq::RabbitBus::new(config)))
    } else {
        Err(BusError::backend(format!(
            "unknown event bus {spec:?}: expected memory, amqp://… or amqps://…"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bus_this_build_cannot_reach_is_refused_when_opened() {
        let error = open("kafka://x", "scaleout", None).unwrap_err();
        assert!(matches!(error, BusError::Backend { .. }), "{error}");
        let missing = std::path::Path::new("/nonexistent/ca.crt");
        let error = open("amqps://127.0.0.1:5671/%2f", "scaleout", Some(missing)).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/ca.crt"), "{error}");
        assert!(open("amqp://guest:guest@127.0.0.1:5672/%2f", "scaleout", None).is_ok());
        assert!(open("amqps://guest:guest@localhost:5671/%2f", "scaleout", None).is_ok());
    }
}
