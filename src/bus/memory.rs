//! The in-process bus: RabbitMQ's semantics inside one process.
//!
//! One queue per service type, fed by topic bindings; competing subscribers
//! take from the front; a requeued message goes to the back (as in a quorum
//! queue) with its delivery count raised; each subscriber holds at most
//! `prefetch` unsettled deliveries; a dead-letter list per service type.
//!
//! Memory is bounded the way a broker's disk is: a queue holds at most
//! [`QUEUE_CAPACITY`] messages, ready and parked alike (plus what its
//! subscribers hold unsettled, at most their prefetch), and past it refuses
//! more as [`BusError::Unavailable`]. The relay then keeps the events in the
//! store's durable outbox and tries again, so a stalled consumer costs
//! outbox rows, not this process's memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::topic;
use super::{
    BusError, BusMessage, Confirms, DeadLetter, DeadLetterPage, Delivery, EventBus, Settle,
    Subscriber, Subscription,
};

/// Messages a queue holds at most, ready and parked together.
pub const QUEUE_CAPACITY: usize = 100_000;

/// The in-process [`EventBus`].
#[derive(Debug, Clone)]
pub struct MemoryBus {
    queues: Arc<Mutex<HashMap<String, Queue>>>,
    capacity: usize,
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::with_capacity(QUEUE_CAPACITY)
    }
}

#[derive(Debug)]
struct Queue {
    bindings: Vec<String>,
    max_attempts: u32,
    /// Messages with how many times each was delivered before.
    ready: VecDeque<(BusMessage, u32)>,
    dead: Vec<DeadLetter>,
    arrived: Arc<Notify>,
}

impl Queue {
    /// Messages held, ready and parked.
    fn len(&self) -> usize {
        self.ready.len() + self.dead.len()
    }
}

impl MemoryBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// A bus whose queues hold at most `capacity` messages each.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            queues: Arc::default(),
            capacity,
        }
    }

    fn queues(&self) -> MutexGuard<'_, HashMap<String, Queue>> {
        // Every change to a queue is a single push or pop: a panicking holder
        // cannot leave one half-done.
        self.queues
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, service_type: &str, message: BusMessage, delivered: u32) {
        if let Some(queue) = self.queues().get_mut(service_type) {
            queue.ready.push_back((message, delivered));
            queue.arrived.notify_one();
        }
    }
}

impl MemoryBus {
    /// Puts each message into every queue its routing key reaches, or
    /// refuses it: unroutable, or a queue it reaches is full.
    fn deliver(&self, messages: &[BusMessage]) -> Vec<Result<(), BusError>> {
        let mut queues = self.queues();
        let capacity = self.capacity;
        messages
            .iter()
            .map(|message| {
                let routes = |queue: &Queue| {
                    queue
                        .bindings
                        .iter()
                        .any(|b| topic::matches(b, &message.routing_key))
                };
                if !queues.values().any(routes) {
                    return Err(BusError::Unroutable(message.routing_key.clone()));
                }
                // Into every queue it routes to, or into none.
                if let Some((full, _)) = queues
                    .iter()
                    .find(|(_, queue)| routes(queue) && queue.len() >= capacity)
                {
                    return Err(BusError::unavailable(format!(
                        "queue {full} holds {capacity} messages"
                    )));
                }
                for queue in queues.values_mut().filter(|queue| routes(queue)) {
                    queue.ready.push_back((message.clone(), 0));
                    queue.arrived.notify_one();
                }
                Ok(())
            })
            .collect()
    }
}

#[async_trait]
impl EventBus for MemoryBus {
    async fn send(&self, messages: &[BusMessage]) -> Confirms {
        Box::pin(std::future::ready(self.deliver(messages)))
    }

    async fn subscribe(
        &self,
        subscription: &Subscription,
    ) -> Result<Box<dyn Subscriber>, BusError> {
        let arrived = {
            let mut queues = self.queues();
            let queue = queues
                .entry(subscription.service_type.clone())
                .or_insert_with(|| Queue {
                    bindings: Vec::new(),
                    max_attempts: subscription.max_attempts,
                    ready: VecDeque::new(),
                    dead: Vec::new(),
                    arrived: Arc::new(Notify::new()),
                });
            for binding in &subscription.bindings {
                if !queue.bindings.contains(binding) {
                    queue.bindings.push(binding.clone());
                }
            }
            queue.max_attempts = subscription.max_attempts;
            Arc::clone(&queue.arrived)
        };
        Ok(Box::new(MemorySubscriber {
            bus: self.clone(),
            service_type: subscription.service_type.clone(),
            arrived,
            prefetch: Arc::new(Semaphore::new(usize::from(subscription.prefetch.max(1)))),
        }))
    }

    async fn dead_letters(
        &self,
        service_type: &str,
        skip: usize,
        limit: usize,
    ) -> Result<DeadLetterPage, BusError> {
        self.queues()
            .get(service_type)
            .map(|queue| DeadLetterPage {
                dead_letters: queue.dead.iter().skip(skip).take(limit).cloned().collect(),
                parked: queue.dead.len(),
            })
            .ok_or_else(|| BusError::UnknownServiceType(service_type.to_owned()))
    }

    async fn replay_dead_letters(&self, service_type: &str) -> Result<usize, BusError> {
        let mut queues = self.queues();
        let Some(queue) = queues.get_mut(service_type) else {
            return Err(BusError::UnknownServiceType(service_type.to_owned()));
        };
        let replayed = queue.dead.len();
        for dead in queue.dead.drain(..) {
            queue.ready.push_back((dead.message, 0));
            queue.arrived.notify_one();
        }
        Ok(replayed)
    }

    async fn ping(&self) -> Result<(), BusError> {
        Ok(())
    }
}

#[derive(Debug)]
struct MemorySubscriber {
    bus: MemoryBus,
    service_type: String,
    arrived: Arc<Notify>,
    prefetch: Arc<Semaphore>,
}

#[async_trait]
impl Subscriber for MemorySubscriber {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            let (message, attempt, max_attempts, settle) = self.take().await?;
            if let Some(delivery) =
                Delivery::arrive(message, attempt, max_attempts, Box::new(settle)).await
            {
                return Some(delivery);
            }
        }
    }
}

impl MemorySubscriber {
    /// The next message with its delivery count, once a prefetch permit is free.
    async fn take(&mut self) -> Option<(BusMessage, u32, u32, MemorySettle)> {
        let permit = Arc::clone(&self.prefetch).acquire_owned().await.ok()?;
        loop {
            // Register interest before looking, so an arrival in between is not missed.
            let arrived = self.arrived.notified();
            let taken = {
                let mut queues = self.bus.queues();
                let queue = queues.get_mut(&self.service_type)?;
                queue
                    .ready
                    .pop_front()
                    .map(|(message, delivered)| (message, delivered, queue.max_attempts))
            };
            if let Some((message, delivered, max_attempts)) = taken {
                let settle = MemorySettle {
                    bus: self.bus.clone(),
                    service_type: self.service_type.clone(),
                    message: Some((message.clone(), delivered + 1)),
                    _permit: permit,
                };
                return Some((message, delivered + 1, max_attempts, settle));
            }
            arrived.await;
        }
    }
}

/// One unsettled delivery; holds a prefetch permit until settled.
#[derive(Debug)]
struct MemorySettle {
    bus: MemoryBus,
    service_type: String,
    /// The message and its delivery count, until settled.
    message: Option<(BusMessage, u32)>,
    _permit: OwnedSemaphorePermit,
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(mut self: Box<Self>) -> Result<(), BusError> {
        self.message = None;
        Ok(())
    }

    async fn requeue(mut self: Box<Self>) -> Result<(), BusError> {
        if let Some((message, delivered)) = self.message.take() {
            self.bus.push(&self.service_type, message, delivered);
        }
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str, attempts: u32) -> Result<(), BusError> {
        if let Some((message, _)) = self.message.take()
            && let Some(queue) = self.bus.queues().get_mut(&self.service_type)
        {
            queue.dead.push(DeadLetter {
                message,
                reason: reason.to_owned(),
                attempts,
            });
        }
        Ok(())
    }
}

impl Drop for MemorySettle {
    fn drop(&mut self) {
        if let Some((message, delivered)) = self.message.take() {
            self.bus.push(&self.service_type, message, delivered);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(version: u64) -> BusMessage {
        BusMessage {
            message_id: format!("m{version}"),
            event_type: "test.Happened".into(),
            routing_key: "test.test.Happened".into(),
            correlation_id: String::new(),
            traceparent: String::new(),
            body: version.to_be_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn a_full_queue_refuses_what_it_cannot_hold_and_takes_it_once_there_is_room() {
        let bus = MemoryBus::with_capacity(2);
        let mut subscriber = bus
            .subscribe(&Subscription {
                service_type: "s".into(),
                bindings: vec!["#".into()],
                prefetch: 10,
                max_attempts: 3,
            })
            .await
            .unwrap();
        let published = bus.publish(&[message(1), message(2), message(3)]).await;
        assert!(published[0].is_ok() && published[1].is_ok());
        assert!(
            matches!(&published[2], Err(error @ BusError::Unavailable { .. }) if error.is_transient()),
            "{published:?}"
        );
        subscriber.next().await.unwrap().ack().await.unwrap();
        assert!(bus.publish(&[message(3)]).await[0].is_ok());
    }
}
