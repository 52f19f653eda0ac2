//! The outbox relay: publishes what the event store committed, in order,
//! and forgets a row only once the bus has confirmed it.
//!
//! Events and their outbox rows commit in one transaction, so an event is
//! never lost between the store and the bus: a row leaves the outbox only
//! after its publish was confirmed (a crash in between publishes it again,
//! which consumers skip by version). While the bus is away the relay backs
//! off and the command side keeps accepting commands; the rows wait.
//! Several processes can share one store: the store's outbox lease lets one
//! relay publish at a time, and the others stand by.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::bus::{BusMessage, Confirms, EventBus};
use crate::store::{EventStore, RecordedEvent};
use crate::telemetry::trace::TraceParent;

/// Batches sent to the bus whose confirms may be outstanding at once.
const WINDOW: usize = 2;

/// How the relay paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayConfig {
    /// Most rows published per round trip to the bus.
    pub batch: usize,
    /// How often an idle or standby relay looks for rows that other
    /// processes wrote (this process's own appends wake it at once).
    pub poll: Duration,
    /// Bounds of the pause after a failure, doubling in between.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch: 500,
            poll: Duration::from_millis(250),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// What the relay is doing, for health and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayState {
    Starting,
    /// Rows are flowing.
    Publishing,
    /// The outbox is empty.
    Idle,
    /// Another process holds the outbox lease.
    Standby,
    /// The bus refused or could not take the last batch; retrying.
    BusDown(String),
    /// The store could not be read or updated; retrying.
    StoreDown(String),
    Stopped,
}

impl RelayState {
    /// A short name, e.g. for a metric label.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Publishing => "publishing",
            Self::Idle => "idle",
            Self::Standby => "standby",
            Self::BusDown(_) => "bus_down",
            Self::StoreDown(_) => "store_down",
            Self::Stopped => "stopped",
        }
    }

    /// Whether events can flow to the bus from here.
    pub fn is_healthy(&self) -> bool {
        matches!(self, Self::Publishing | Self::Idle | Self::Standby)
    }
}

/// The relay between one store's outbox and one bus.
#[derive(Debug)]
pub struct Relay {
    store: Arc<dyn EventStore>,
    bus: Arc<dyn EventBus>,
    config: RelayConfig,
    state: watch::Sender<RelayState>,
}

enum Round {
    Published,
    Empty,
    Standby,
}

impl Relay {
    pub fn new(store: Arc<dyn EventStore>, bus: Arc<dyn EventBus>, config: RelayConfig) -> Self {
        Self {
            store,
            bus,
            config,
            state: watch::Sender::new(RelayState::Starting),
        }
    }

    /// Follows the relay's state.
    pub fn state(&self) -> watch::Receiver<RelayState> {
        self.state.subscribe()
    }

    /// Relays until `stopping` is cancelled.
    pub async fn run(self, stopping: CancellationToken) {
        let mut failures = 0u32;
        loop {
            // Registered before the outbox is read, so no append slips between.
            let appended = self.store.appended().notified();
            let (state, pause) = match self.drain(&stopping).await {
                Ok(Round::Published) => {
                    failures = 0;
                    self.set(RelayState::Publishing);
                    if stopping.is_cancelled() {
                        break;
                    }
                    continue;
                }
                Ok(Round::Empty) => (RelayState::Idle, self.config.poll),
                Ok(Round::Standby) => (RelayState::Standby, self.config.poll),
                Err(state) => {
                    failures += 1;
                    (state, self.backoff(failures))
                }
            };
            let idle = state == RelayState::Idle;
            if !idle && failures == 1 {
                tracing::warn!(?state, "outbox relay is blocked; retrying with backoff");
            }
            self.set(state);
            tokio::select! {
                () = stopping.cancelled() => break,
                () = appended, if idle => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        self.set(RelayState::Stopped);
    }

    /// Publishes the outbox until it is empty (or the relay stops), as a
    /// pipeline: the next batch is read while one awaits its confirms, and
    /// sent behind it before they are in (up to [`WINDOW`] batches in
    /// flight), so neither the store's round trips nor the bus's confirms
    /// leave the other idle. Batches go to the bus one after another, in
    /// order; each batch's confirmed rows are deleted once its confirms are
    /// in. After a refusal the next round reads the outbox from its start
    /// again (a batch sent behind the refused one is then sent again).
    async fn drain(&self, stopping: &CancellationToken) -> Result<Round, RelayState> {
        if !self.store.lease_outbox().await.map_err(store_down)? {
            return Ok(Round::Standby);
        }
        let batch = self.config.batch;
        let mut rows = self.store.read_outbox(0, batch).await.map_err(store_down)?;
        if rows.is_empty() {
            return Ok(Round::Empty);
        }
        let mut in_flight = VecDeque::with_capacity(WINDOW);
        loop {
            let after = rows.last().map_or(0, |row| row.position);
            in_flight.push_back(self.send(&rows).await);
            let oldest = if in_flight.len() == WINDOW {
                in_flight.pop_front()
            } else {
                None
            };
            let (next, settled) = tokio::join!(self.store.read_outbox(after, batch), async {
                match oldest {
                    Some(sent) => self.settle(sent).await,
                    None => Ok(()),
                }
            });
            settled?;
            rows = next.map_err(store_down)?;
            if rows.is_empty() || stopping.is_cancelled() {
                while let Some(sent) = in_flight.pop_front() {
                    self.settle(sent).await?;
                }
                return Ok(Round::Published);
            }
            self.set(RelayState::Publishing);
        }
    }

    /// Sends `rows` to the bus.
    async fn send(&self, rows: &[RecordedEvent]) -> Sent {
        let (messages, spans): (Vec<BusMessage>, Vec<tracing::Span>) =
            rows.iter().map(publishing).unzip();
        Sent {
            positions: rows.iter().map(|row| row.position).collect(),
            confirms: self.bus.send(&messages).await,
            _publishing: spans,
        }
    }

    /// Waits for a sent batch's confirms and forgets its confirmed rows; a
    /// refusal is the bus being down.
    async fn settle(&self, sent: Sent) -> Result<(), RelayState> {
        let results = sent.confirms.await;
        let mut refused = None;
        let mut confirmed = Vec::with_capacity(results.len());
        for (position, result) in sent.positions.into_iter().zip(results) {
            match result {
                Ok(()) => confirmed.push(position),
                Err(error) => refused = refused.or(Some(error)),
            }
        }
        self.delete(&confirmed).await.map_err(store_down)?;
        match refused {
            Some(error) => Err(RelayState::BusDown(error.to_string())),
            None => Ok(()),
        }
    }

    /// Forgets confirmed rows.
    async fn delete(&self, positions: &[u64]) -> Result<(), crate::store::StoreError> {
        if positions.is_empty() {
            return Ok(());
        }
        self.store.delete_outbox(positions).await
    }

    fn set(&self, state: RelayState) {
        self.state.send_if_modified(|current| {
            let changed = *current != state;
            if changed {
                tracing::debug!(from = ?current, to = ?state, "outbox relay");
                *current = state;
            }
            changed
        });
    }

    fn backoff(&self, failures: u32) -> Duration {
        Backoff::waiting(self.config.backoff_min, self.config.backoff_max).pause(failures)
    }
}

/// A batch sent to the bus, awaiting its confirms.
struct Sent {
    positions: Vec<u64>,
    confirms: Confirms,
    /// The batch's publish spans, which end once its confirms are in.
    _publishing: Vec<tracing::Span>,
}

fn store_down(error: crate::store::StoreError) -> RelayState {
    RelayState::StoreDown(error.to_string())
}

/// The message that carries `event`, and the span of its publish, which
/// continues the event's trace and is the parent the message carries (where
/// traces are exported; a disabled span otherwise).
fn publishing(event: &RecordedEvent) -> (BusMessage, tracing::Span) {
    let mut message = BusMessage::from_event(event);
    let span = tracing::debug_span!(
        "publish",
        otel.kind = "producer",
        messaging.destination = %message.routing_key,
        messaging.message.id = %message.message_id,
    );
    if !span.is_disabled() {
        BusMessage::trace_of(event).adopt(&span);
        if let Some(trace) = TraceParent::of_span(&span) {
            message.traceparent = trace.to_string();
        }
    }
    (message, span)
}
