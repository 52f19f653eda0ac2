//! The RabbitMQ bus, through lapin.
//!
//! Topology, declared idempotently by whoever needs it first:
//!
//! | name | kind | role |
//! | --- | --- | --- |
//! | `{prefix}.events` | durable topic exchange | every event, keyed `stream_type.event_type` |
//! | `{prefix}.{service}` | durable quorum queue | one per service type; `x-delivery-limit`, dead-letters to the next row |
//! | `{prefix}.dead-letter` | durable direct exchange | keyed by service type |
//! | `{prefix}.{service}.dead-letter` | durable classic queue | parked messages, listed and replayed in order |
//!
//! Messages are persistent and published `mandatory` on a confirm channel: a
//! publish counts only once the broker acks it, and an unroutable one comes
//! back as [`BusError::Unroutable`] to be retried by the caller.
//!
//! Recovery is explicit rather than lapin's automatic recovery, so that what
//! happens after a broker restart is ours to test: a publish or settle on a
//! dead connection fails (the caller retries: the outbox keeps the row, the
//! broker redelivers the unacked message), and the next call reconnects. A
//! subscriber whose channel dies re-declares and re-consumes with backoff.
//!
//! A handler that keeps failing is parked by the consumer with its reason
//! (published to the dead-letter exchange, then acked); the quorum queue's
//! delivery limit is the backstop for a message that crashes its consumer
//! before it can settle.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use super::{
    BusError, BusMessage, CONTENT_TYPE, Confirms, DeadLetter, DeadLetterPage, Delivery, EventBus,
    Settle, Subscriber, Subscription,
};
use crate::backoff::Backoff;
use crate::telemetry::trace::TRACEPARENT;

/// Longest a connect or a declaration may take before the broker counts as away.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// The default of [`RabbitConfig::with_publish_timeout`].
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

const ROUTING_KEY_HEADER: &str = "x-scaleout-routing-key";
const REASON_HEADER: &str = "x-scaleout-reason";
const ATTEMPTS_HEADER: &str = "x-scaleout-attempts";
/// Set by quorum queues: how many times the message was handed back before.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// Set by the broker when it dead-letters a message itself.
const DEATH_HEADER: &str = "x-death";

/// Where the broker is and what to call things.
#[derive(Clone)]
pub struct RabbitConfig {
    url: String,
    prefix: String,
    publish_timeout: Duration,
    /// PEM certificates an `amqps://` broker's chain may end in, beside
    /// the system's.
    ca: Option<String>,
}

impl std::fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &crate::config::redact(&self.url))
            .field("prefix", &self.prefix)
            .field("publish_timeout", &self.publish_timeout)
            .field("ca", &self.ca.is_some())
            .finish()
    }
}

impl RabbitConfig {
    /// Names prefixed `scaleout`.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: "scaleout".to_owned(),
            publish_timeout: PUBLISH_TIMEOUT,
            ca: None,
        }
    }

    /// Trusts the CA certificates in `pem` (beside the system's) for an
    /// `amqps://` URL; the broker's name is checked against the URL's host.
    pub fn with_ca(mut self, pem: String) -> Self {
        self.ca = Some(pem);
        self
    }

    /// How long a batch of publishes may wait for the broker's confirms
    /// before they count as unavailable (default 10 s): a half-dead
    /// connection would otherwise hold the relay, and its health, forever.
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Prefixes every exchange and queue name, so deployments (or tests)
    /// can share a broker.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Also names this process's connection (`{prefix}@{pid}`), so an
    /// operator can tell them apart in the management UI.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead-letter", self.prefix)
    }

    pub fn queue(&self, service_type: &str) -> String {
        format!("{}.{service_type}", self.prefix)
    }

    pub fn dead_letter_queue(&self, service_type: &str) -> String {
        format!("{}.{service_type}.dead-letter", self.prefix)
    }
}

/// The RabbitMQ [`EventBus`].
#[derive(Debug, Clone)]
pub struct RabbitBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: RabbitConfig,
    connection: Mutex<Option<Arc<Connection>>>,
    /// The confirm channel publishes share; replaced when it dies.
    publisher: Mutex<Option<Channel>>,
}

impl RabbitBus {
    /// A bus that connects on first use (and again after every loss), so a
    /// process can start while the broker is away.
    pub fn new(config: RabbitConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                connection: Mutex::new(None),
                publisher: Mutex::new(None),
            }),
        }
    }

    /// [`RabbitBus::new`], then a first connection to check the broker.
    pub async fn connect(config: RabbitConfig) -> Result<Self, BusError> {
        let bus = Self::new(config);
        bus.inner.connection().await?;
        Ok(bus)
    }

    pub fn config(&self) -> &RabbitConfig {
        &self.inner.config
    }
}

impl Inner {
    /// The live connection, opening a new one if there is none.
    async fn connection(&self) -> Result<Arc<Connection>, BusError> {
        let mut current = self.connection.lock().await;
        if let Some(connection) = current.as_ref().filter(|c| c.status().connected()) {
            return Ok(Arc::clone(connection));
        }
        let name = format!("{}@{}", self.config.prefix, std::process::id());
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.config.ca.clone(),
        };
        let runtime = lapin::runtime::default_runtime().map_err(unavailable)?;
        let connection = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect_with_config(&self.config.url, properties, tls, runtime),
        )
        .await
        .map_err(|_| BusError::unavailable(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(unavailable)?;
        let connection = Arc::new(connection);
        *current = Some(Arc::clone(&connection));
        Ok(connection)
    }

    async fn channel(&self) -> Result<Channel, BusError> {
        let connection = self.connection().await?;
        bounded(connection.create_channel()).await
    }

    /// The shared confirm channel, with the events exchange declared.
    async fn publisher(&self) -> Result<Channel, BusError> {
        let mut current = self.publisher.lock().await;
        if let Some(channel) = current.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self.channel().await?;
        bounded(channel.confirm_select(ConfirmSelectOptions::default())).await?;
        self.declare_exchanges(&channel).await?;
        *current = Some(channel.clone());
        Ok(channel)
    }

    async fn declare_exchanges(&self, channel: &Channel) -> Result<(), BusError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let events = self.config.events_exchange();
        let dead = self.config.dead_letter_exchange();
        bounded(channel.exchange_declare(
            events.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        ))
        .await?;
        bounded(channel.exchange_declare(
            dead.into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        ))
        .await
    }

    /// Declares a service type's queues and bindings on `channel`.
    async fn declare_service(
        &self,
        channel: &Channel,
        subscription: &Subscription,
    ) -> Result<(), BusError> {
        self.declare_exchanges(channel).await?;
        let service = &subscription.service_type;
        self.declare_dead_letter_queue(channel, service).await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let limit = i64::from(subscription.max_attempts);
        arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.config.dead_letter_exchange().into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(service.as_str().into()),
        );
        let queue = self.config.queue(service);
        // An existing queue is used as it is: declaring it again with other
        // arguments (a changed --max-attempts) would be refused, and the
        // subscriber parks by its own count anyway (`Delivery::arrive`); the
        // queue's delivery limit is only the broker's backstop. Looked up on
        // a channel of its own, which a missing queue closes.
        let probe = self.channel().await?;
        match existing_queue(&probe, &queue, service).await {
            Ok(_) => {
                let _ = bounded(probe.close(200, "looked up".into())).await;
            }
            Err(BusError::UnknownServiceType(_)) => {
                bounded(channel.queue_declare(queue.as_str().into(), durable_queue(), arguments))
                    .await?;
            }
            Err(error) => return Err(error),
        }
        for binding in &subscription.bindings {
            bounded(channel.queue_bind(
                queue.as_str().into(),
                self.config.events_exchange().into(),
                binding.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ))
            .await?;
        }
        Ok(())
    }

    async fn declare_dead_letter_queue(
        &self,
        channel: &Channel,
        service: &str,
    ) -> Result<String, BusError> {
        let queue = self.config.dead_letter_queue(service);
        bounded(channel.queue_declare(
            queue.as_str().into(),
            durable_queue(),
            FieldTable::default(),
        ))
        .await?;
        bounded(channel.queue_bind(
            queue.as_str().into(),
            self.config.dead_letter_exchange().into(),
            service.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        Ok(queue)
    }

    /// Publishes on the confirm channel and waits for every confirm.
    async fn publish_confirmed(
        self: &Arc<Self>,
        exchange: &str,
        publishes: Vec<(String, BasicProperties, &[u8])>,
    ) -> Vec<Result<(), BusError>> {
        self.send_confirmed(exchange, publishes).await.await
    }

    /// Sends `publishes` in order on the publisher channel; what it returns
    /// waits for their confirms.
    async fn send_confirmed(
        self: &Arc<Self>,
        exchange: &str,
        publishes: Vec<(String, BasicProperties, &[u8])>,
    ) -> Confirms {
        let channel = match self.publisher().await {
            Ok(channel) => channel,
            Err(error) => {
                let refused = publishes.iter().map(|_| Err(error.clone())).collect();
                return Box::pin(std::future::ready(refused));
            }
        };
        let mandatory = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        // Sends and confirms share one deadline.
        let timeout = self.config.publish_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let late =
            move || BusError::unavailable(format!("no confirm from RabbitMQ within {timeout:?}"));
        let mut pending = Vec::with_capacity(publishes.len());
        for (routing_key, properties, body) in publishes {
            let sent = tokio::time::timeout_at(
                deadline,
                channel.basic_publish(
                    exchange.into(),
                    routing_key.as_str().into(),
                    mandatory,
                    body,
                    properties,
                ),
            )
            .await
            .map_err(|_| late())
            .and_then(|sent| sent.map_err(unavailable));
            pending.push((routing_key, sent));
        }
        let inner = Arc::clone(self);
        Box::pin(async move {
            let mut results = Vec::with_capacity(pending.len());
            for (routing_key, sent) in pending {
                let result = match sent {
                    Err(error) => Err(error),
                    Ok(confirm) => match tokio::time::timeout_at(deadline, confirm)
                        .await
                        .map_err(|_| late())
                        .and_then(|confirmed| confirmed.map_err(unavailable))
                    {
                        Err(error) => Err(error),
                        Ok(confirmation) if confirmation.is_nack() => {
                            Err(BusError::Nacked(routing_key))
                        }
                        Ok(confirmation) => match confirmation.take_message() {
                            Some(_) => Err(BusError::Unroutable(routing_key)),
                            None => Ok(()),
                        },
                    },
                };
                results.push(result);
            }
            if results
                .iter()
                .any(|r| matches!(r, Err(BusError::Unavailable { .. })))
            {
                // Start afresh next time rather than reuse a channel in doubt.
                *inner.publisher.lock().await = None;
            }
            results
        })
    }
}

#[async_trait]
impl EventBus for RabbitBus {
    async fn send(&self, messages: &[BusMessage]) -> Confirms {
        let publishes = messages
            .iter()
            .map(|m| (m.routing_key.clone(), properties(m), m.body.as_slice()))
            .collect();
        let exchange = self.inner.config.events_exchange();
        self.inner.send_confirmed(&exchange, publishes).await
    }

    async fn subscribe(
        &self,
        subscription: &Subscription,
    ) -> Result<Box<dyn Subscriber>, BusError> {
        let mut subscriber = RabbitSubscriber {
            bus: self.clone(),
            subscription: subscription.clone(),
            consumer: None,
            failures: 0,
        };
        // Declaring now makes the queue (and so routing) exist on return.
        subscriber.consumer = Some(subscriber.consume().await?);
        Ok(Box::new(subscriber))
    }

    async fn dead_letters(
        &self,
        service_type: &str,
        skip: usize,
        limit: usize,
    ) -> Result<DeadLetterPage, BusError> {
        let channel = self.inner.channel().await?;
        let (queue, parked) = existing_queue(
            &channel,
            &self.inner.config.dead_letter_queue(service_type),
            service_type,
        )
        .await?;
        let mut dead_letters = Vec::new();
        let mut last_tag = None;
        let mut taken = 0;
        // Held unacked until the end, so each get yields the next message.
        while taken < skip + limit {
            let Some(got) =
                bounded(channel.basic_get(queue.as_str().into(), BasicGetOptions::default()))
                    .await?
            else {
                break;
            };
            last_tag = Some(got.delivery.delivery_tag);
            if taken >= skip {
                dead_letters.push(dead_letter(&got.delivery));
            }
            taken += 1;
        }
        if let Some(tag) = last_tag {
            // Hand them all back, in place: listing is not consuming.
            let all = BasicNackOptions {
                multiple: true,
                requeue: true,
            };
            bounded(channel.basic_nack(tag, all)).await?;
        }
        let _ = bounded(channel.close(200, "listed".into())).await;
        Ok(DeadLetterPage {
            dead_letters,
            parked: parked as usize,
        })
    }

    async fn replay_dead_letters(&self, service_type: &str) -> Result<usize, BusError> {
        let channel = self.inner.channel().await?;
        let (dead_queue, parked) = existing_queue(
            &channel,
            &self.inner.config.dead_letter_queue(service_type),
            service_type,
        )
        .await?;
        let queue = self.inner.config.queue(service_type);
        let mut replayed = 0;
        while replayed < parked as usize
            && let Some(got) =
                bounded(channel.basic_get(dead_queue.as_str().into(), BasicGetOptions::default()))
                    .await?
        {
            let message = message(&got.delivery);
            // Straight to the service's queue (default exchange), attempts afresh.
            let republished = self
                .inner
                .publish_confirmed(
                    "",
                    vec![(queue.clone(), properties(&message), message.body.as_slice())],
                )
                .await;
            if let Some(Err(error)) = republished.into_iter().next() {
                return Err(error);
            }
            bounded(got.delivery.acker.ack(BasicAckOptions::default())).await?;
            replayed += 1;
        }
        let _ = bounded(channel.close(200, "replayed".into())).await;
        Ok(replayed)
    }

    async fn ping(&self) -> Result<(), BusError> {
        self.inner.connection().await.map(drop)
    }
}

/// One consumer of a service type's queue, re-established after failures.
struct RabbitSubscriber {
    bus: RabbitBus,
    subscription: Subscription,
    consumer: Option<(Channel, lapin::Consumer)>,
    failures: u32,
}

impl RabbitSubscriber {
    async fn consume(&self) -> Result<(Channel, lapin::Consumer), BusError> {
        let inner = &self.bus.inner;
        let channel = inner.channel().await?;
        inner.declare_service(&channel, &self.subscription).await?;
        bounded(channel.basic_qos(self.subscription.prefetch, BasicQosOptions::default())).await?;
        let queue = inner.config.queue(&self.subscription.service_type);
        let consumer = bounded(channel.basic_consume(
            queue.into(),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        Ok((channel, consumer))
    }
}

#[async_trait]
impl Subscriber for RabbitSubscriber {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            let Some((_, consumer)) = self.consumer.as_mut() else {
                match self.consume().await {
                    Ok(consumer) => self.consumer = Some(consumer),
                    Err(error) => {
                        let pause = backoff(self.failures);
                        tracing::warn!(%error, ?pause, service = %self.subscription.service_type, "cannot consume; retrying");
                        self.failures += 1;
                        tokio::time::sleep(pause).await;
                    }
                }
                continue;
            };
            match consumer.next().await {
                Some(Ok(delivery)) => {
                    self.failures = 0;
                    let attempt = header_count(&delivery.properties, DELIVERY_COUNT_HEADER)
                        .map_or(1, |n| n + 1);
                    let settle = RabbitSettle {
                        inner: Arc::clone(&self.bus.inner),
                        service_type: self.subscription.service_type.clone(),
                        delivery,
                    };
                    let message = message(&settle.delivery);
                    let max_attempts = self.subscription.max_attempts;
                    match Delivery::arrive(message, attempt, max_attempts, Box::new(settle)).await {
                        Some(delivery) => return Some(delivery),
                        None => continue,
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, service = %self.subscription.service_type, "consumer failed; reconnecting");
                    self.consumer = None;
                }
                None => {
                    tracing::warn!(service = %self.subscription.service_type, "consumer cancelled; reconnecting");
                    self.consumer = None;
                }
            }
        }
    }
}

#[derive(Debug)]
struct RabbitSettle {
    inner: Arc<Inner>,
    service_type: String,
    delivery: lapin::message::Delivery,
}

#[async_trait]
impl Settle for RabbitSettle {
    async fn ack(self: Box<Self>) -> Result<(), BusError> {
        settled(self.delivery.acker.ack(BasicAckOptions::default())).await
    }

    async fn requeue(self: Box<Self>) -> Result<(), BusError> {
        // `reject` (not `nack`) is what counts toward the delivery limit.
        let requeue = BasicRejectOptions { requeue: true };
        settled(self.delivery.acker.reject(requeue)).await
    }

    async fn dead_letter(self: Box<Self>, reason: &str, attempts: u32) -> Result<(), BusError> {
        let message = message(&self.delivery);
        let mut properties = properties(&message);
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        headers.insert(
            ATTEMPTS_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        properties = properties.with_headers(headers);
        let exchange = self.inner.config.dead_letter_exchange();
        let parked = self
            .inner
            .publish_confirmed(
                &exchange,
                vec![(
                    self.service_type.clone(),
                    properties,
                    message.body.as_slice(),
                )],
            )
            .await;
        match parked.into_iter().next() {
            Some(Ok(())) => settled(self.delivery.acker.ack(BasicAckOptions::default())).await,
            Some(Err(error)) => {
                // Not parked: hand it back rather than lose it.
                let requeue = BasicRejectOptions { requeue: true };
                let _ = settled(self.delivery.acker.reject(requeue)).await;
                Err(error)
            }
            None => Err(BusError::backend("no confirm for the dead-letter publish")),
        }
    }
}

/// An ack or reject that did not reach a live channel leaves the message
/// with the broker, which redelivers it: the caller must know. Bounded like
/// every broker call: on a connection that died under it, lapin can wait
/// forever, and a worker stuck in an ack consumes nothing more.
async fn settled(settle: impl Future<Output = lapin::Result<bool>>) -> Result<(), BusError> {
    match bounded(settle).await? {
        true => Ok(()),
        false => Err(BusError::unavailable("the delivery's channel is gone")),
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// The AMQP properties that carry a message's metadata.
fn properties(message: &BusMessage) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ROUTING_KEY_HEADER.into(),
        AMQPValue::LongString(message.routing_key.as_str().into()),
    );
    headers.insert(
        TRACEPARENT.into(),
        AMQPValue::LongString(message.traceparent.as_str().into()),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(message.message_id.as_str().into())
        .with_type(message.event_type.as_str().into())
        .with_correlation_id(message.correlation_id.as_str().into())
        .with_headers(headers)
}

/// Reads a delivered message back from its properties.
fn message(delivery: &lapin::message::Delivery) -> BusMessage {
    let properties = &delivery.properties;
    let text = |value: &Option<ShortString>| {
        value
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default()
    };
    BusMessage {
        message_id: text(properties.message_id()),
        event_type: text(properties.kind()),
        routing_key: header_text(properties, ROUTING_KEY_HEADER)
            .unwrap_or_else(|| delivery.routing_key.as_str().to_owned()),
        correlation_id: text(properties.correlation_id()),
        traceparent: header_text(properties, TRACEPARENT).unwrap_or_default(),
        body: delivery.data.clone(),
    }
}

/// A parked message with why and after how many attempts.
fn dead_letter(delivery: &lapin::message::Delivery) -> DeadLetter {
    let properties = &delivery.properties;
    let broker_death = || {
        let deaths = properties.headers().as_ref()?.inner().get(DEATH_HEADER)?;
        let AMQPValue::FieldArray(deaths) = deaths else {
            return None;
        };
        let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
            return None;
        };
        let reason = first.inner().get("reason").and_then(text_value)?;
        Some(if reason == "delivery_limit" {
            "dead-lettered by the broker: delivered more times than the queue's delivery \
             limit (RabbitMQ does not record how many)"
                .to_owned()
        } else {
            format!("dead-lettered by the broker: {reason}")
        })
    };
    DeadLetter {
        message: message(delivery),
        reason: header_text(properties, REASON_HEADER)
            .or_else(broker_death)
            .unwrap_or_else(|| "unknown".to_owned()),
        // Only our own count: an `x-delivery-count` on a parked message is
        // whatever its publisher put there, the broker's is not kept.
        attempts: header_count(properties, ATTEMPTS_HEADER).unwrap_or(0),
    }
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    header(properties, name).and_then(text_value)
}

fn text_value(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn header_count(properties: &BasicProperties, name: &str) -> Option<u32> {
    let count = match header(properties, name)? {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        _ => return None,
    };
    u32::try_from(count).ok()
}

/// Bounds a broker round trip: lapin waits forever on a half-dead connection.
async fn bounded<T>(operation: impl Future<Output = lapin::Result<T>>) -> Result<T, BusError> {
    tokio::time::timeout(CONNECT_TIMEOUT, operation)
        .await
        .map_err(|_| {
            BusError::unavailable(format!(
                "no answer from RabbitMQ within {CONNECT_TIMEOUT:?}"
            ))
        })?
        .map_err(unavailable)
}

/// A queue that exists, with the messages it holds: looked up passively,
/// so asking about an unknown service type declares nothing.
async fn existing_queue(
    channel: &Channel,
    queue: &str,
    service_type: &str,
) -> Result<(String, u32), BusError> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = tokio::time::timeout(
        CONNECT_TIMEOUT,
        channel.queue_declare(queue.into(), passive, FieldTable::default()),
    )
    .await
    .map_err(|_| {
        BusError::unavailable(format!(
            "no answer from RabbitMQ within {CONNECT_TIMEOUT:?}"
        ))
    })?;
    match declared {
        Ok(declared) => Ok((queue.to_owned(), declared.message_count())),
        Err(error) => match error.kind() {
            lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404 => {
                Err(BusError::UnknownServiceType(service_type.to_owned()))
            }
            _ => Err(unavailable(error)),
        },
    }
}

fn unavailable(error: lapin::Error) -> BusError {
    BusError::unavailable(error.to_string()).caused_by(error)
}

fn backoff(failures: u32) -> Duration {
    Backoff::waiting(RECONNECT_MIN, RECONNECT_MAX).pause(failures)
}
