//! A delivered message and the three ways to settle it.

use async_trait::async_trait;

use super::{BusError, BusMessage};

/// How a backend settles one delivery.
#[async_trait]
pub trait Settle: Send + Sync + std::fmt::Debug {
    /// Done with it: remove it from the queue.
    async fn ack(self: Box<Self>) -> Result<(), BusError>;
    /// Put it back to be delivered again later (to this or another instance).
    async fn requeue(self: Box<Self>) -> Result<(), BusError>;
    /// Park it in the dead-letter queue with the reason, then remove it.
    async fn dead_letter(self: Box<Self>, reason: &str, attempts: u32) -> Result<(), BusError>;
}

/// A message handed to one subscriber, to be settled exactly once.
///
/// Dropping it unsettled (a cancelled task) hands it back the way a broker
/// does when a consumer goes away: RabbitMQ once the channel closes, the
/// in-process bus at once.
#[derive(Debug)]
pub struct Delivery {
    pub message: BusMessage,
    /// 1 on the first delivery, counting every earlier hand-back.
    pub attempt: u32,
    max_attempts: u32,
    settle: Box<dyn Settle>,
}

impl Delivery {
    pub fn new(
        message: BusMessage,
        attempt: u32,
        max_attempts: u32,
        settle: Box<dyn Settle>,
    ) -> Self {
        Self {
            message,
            attempt,
            max_attempts,
            settle,
        }
    }

    /// A message as a subscriber receives it: handed out, or, when its last
    /// attempt ended with no verdict (the consumer holding it died or lost
    /// its connection), parked here with its count and `None` (fetch the
    /// next). Left to RabbitMQ's own delivery limit it would be parked
    /// without a count; and it may well be what brought its consumers down.
    pub(crate) async fn arrive(
        message: BusMessage,
        attempt: u32,
        max_attempts: u32,
        settle: Box<dyn Settle>,
    ) -> Option<Self> {
        if attempt <= max_attempts {
            return Some(Self::new(message, attempt, max_attempts, settle));
        }
        let reason = format!(
            "handed back unsettled after its {max_attempts} attempts \
             (the consumer holding it died or lost its connection)"
        );
        if let Err(error) = settle.dead_letter(&reason, attempt).await {
            tracing::warn!(%error, message_id = %message.message_id, "could not park a message past its attempts");
        }
        None
    }

    /// Whether a [`Delivery::retry`] would park it rather than hand it back.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }

    pub async fn ack(self) -> Result<(), BusError> {
        self.settle.ack().await
    }

    /// Hands the message back for a later attempt, or parks it with `reason`
    /// once it has had its attempts.
    pub async fn retry(self, reason: &str) -> Result<(), BusError> {
        if self.is_last_attempt() {
            self.settle.dead_letter(reason, self.attempt).await
        } else {
            self.settle.requeue().await
        }
    }

    /// Parks the message now: it can never succeed (e.g. it does not decode).
    pub async fn dead_letter(self, reason: &str) -> Result<(), BusError> {
        self.settle.dead_letter(reason, self.attempt).await
    }
}
