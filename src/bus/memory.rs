//! The in-process bus: RabbitMQ's semantics inside one process.
//!
//! One queue per service type, fed by topic bindings; competing subscribers
//! take from the front; a requeued message goes to the back (as in a quorum
//! queue) with its delivery count raised; each subscriber holds at most
//! `prefetch` unsettled deliveries; a dead-letter list per service type.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::topic;
use super::{
    BusError, BusMessage, DeadLetter, DeadLetterPage, Delivery, EventBus, Settle, Subscriber,
    Subscription,
};

/// The in-process [`EventBus`].
#[derive(Debug, Clone, Default)]
pub struct MemoryBus {
    queues: Arc<Mutex<HashMap<String, Queue>>>,
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

impl MemoryBus {
    pub fn new() -> Self {
        Self::default()
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

#[async_trait]
impl EventBus for MemoryBus {
    async fn publish(&self, messages: &[BusMessage]) -> Vec<Result<(), BusError>> {
        let mut queues = self.queues();
        messages
            .iter()
            .map(|message| {
                let mut routed = false;
                for queue in queues.values_mut() {
                    if queue
                        .bindings
                        .iter()
                        .any(|b| topic::matches(b, &message.routing_key))
                    {
                        queue.ready.push_back((message.clone(), 0));
                        queue.arrived.notify_one();
                        routed = true;
                    }
                }
                if routed {
                    Ok(())
                } else {
                    Err(BusError::Unroutable(message.routing_key.clone()))
                }
            })
            .collect()
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
